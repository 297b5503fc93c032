"""Keep a Hugging Face ``model.config`` consistent with what the passes removed.

The pruned graph module's shapes live in the graph; the config is what tools around the model
read (``num_attention_heads``, ``intermediate_size``, ``num_hidden_layers``) and what
``from_pretrained`` builds the pruned ``result.model`` from. A count is written when it is
uniform across layers; per-layer counts are in the plan (``units`` of each head / FFN pass entry)
and a Hugging Face folder cannot hold them (``save_pretrained`` refuses them).

``save_pretrained`` is atomic: it writes into a staging folder beside the target
(``.<name>.<pid>.<random>``), carries the user's files of an existing folder over (hard links,
else copies) and swaps the two with one ``renameat2(RENAME_EXCHANGE)`` on Linux (elsewhere two
renames, the old folder aside as ``.<name>.<pid>.<random>.old`` in between), so a kill leaves the
old folder whole. The next save to it removes a staging folder whose pid no longer runs or that
is untouched for ``fxprune.atomic.STALE_AFTER_S`` (fxprune/atomic.py does the writing). A mount
point is written in place, with a warning.

Over an existing folder a save replaces or removes the files a Hugging Face save owns
(:data:`OWNED`: ``config.json``, ``generation_config.json``, ``model.safetensors``,
``pytorch_model.bin``, their ``-0000i-of-0000n`` shards and ``.index.json``), written anew or not:
a sharded save leaves no stale ``model.safetensors``. Everything else there is the user's and stays.
"""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
from pathlib import Path

import torch.nn as nn

from fxprune.atomic import write_folder
from fxprune.errors import ConfigError, FileAccessError, UnsupportedModelError

# what a model folder holds besides config + weights, copied next to the pruned weights
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)

LAYERS = ("num_hidden_layers", "n_layer")
HEADS = ("num_attention_heads", "n_head")
KV_HEADS = ("num_key_value_heads", "num_kv_heads")
FFN = (
    "intermediate_size",
    "n_inner",
    "ffn_hidden_size",
    "hidden_dim",
    "d_ff",
)  # Falcon, DistilBERT, T5
EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts")
# The FFN widths a config holds, by the role of the layer that the ffn pass shrank (first match
# of a name part): a mixture-of-experts block's shared expert (Qwen2-MoE), its routed experts
# (one 3-D parameter per projection; Qwen3-MoE's moe_intermediate_size, Mixtral's and OLMoE's
# intermediate_size), and every other MLP.
FFN_ROLES = (
    ("shared expert", ("shared_expert", "shared_experts"), ("shared_expert_intermediate_size",)),
    ("experts", ("experts",), ("moe_intermediate_size", *FFN)),
    ("MLP", (), FFN),
)


def ffn_role(layer: str) -> tuple[str, tuple[str, ...]]:
    """``(role, config attributes that may hold its width)`` of an FFN layer, by its name."""
    parts = set(layer.split("."))
    for role, names, attrs in FFN_ROLES:
        if not names or parts & set(names):
            return role, attrs
    raise AssertionError("FFN_ROLES ends with a catch-all")


def _attr(cfg, names):
    return next((n for n in names if hasattr(cfg, n)), None)


def pruned_config(model, results) -> tuple[object | None, dict]:
    """``(updated copy of model.config, notes)``; ``(None, {})`` for models without one."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None, {}
    new, notes = copy.deepcopy(cfg), {}
    layers_attr, heads_attr = _attr(cfg, LAYERS), _attr(cfg, HEADS)
    n_layers = getattr(cfg, layers_attr) if layers_attr else None
    gone = [b for r in results for b in r.bypassed]  # removed blocks: their layers are no peers
    for r in results:
        if not r.changed:
            continue
        if r.name == "blocks" and layers_attr:
            n_layers = n_layers - len(r.bypassed)
            setattr(new, layers_attr, n_layers)
        units = r.units
        counts = {after for _, after in units.values()}
        # every layer: an encoder-decoder's units also hold the decoder's and cross-attention
        # layers (T5: 3 x num_layers); check_config_builds catches a stack left whole
        uniform = len(counts) == 1 and n_layers is not None and _covered(model, units) >= n_layers
        if r.name == "heads" and heads_attr:
            if not uniform:
                notes["heads"] = "differs per layer: see the plan's 'units'"
                continue
            heads, kv_attr = getattr(cfg, heads_attr), _attr(cfg, KV_HEADS)
            kv = (getattr(cfg, kv_attr) if kv_attr else None) or heads
            before = next(iter(units.values()))[0]
            per_unit = heads // before  # query heads per unit (GQA)
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            after = counts.pop()
            setattr(new, heads_attr, after * per_unit)
            if kv_attr and (kv == heads or before == kv):  # a unit is a KV head, its queries
                setattr(new, kv_attr, after * per_unit if kv == heads else after)
            # else one KV head serves every query head (multi-query): the units were queries
            with contextlib.suppress(AttributeError):  # FalconConfig derives it (read-only):
                new.head_dim = head_dim  # check_config_builds refuses what it cannot hold
        if r.name == "ffn":
            _ffn_config(model, new, units, notes, gone)
        if r.name == "experts":
            kept = {n - len(r.removed.get(p, ())) for p, n in r.experts_before.items()}
            attr = _attr(new, EXPERTS)
            if attr and len(kept) == 1:
                setattr(new, attr, kept.pop())
            else:
                notes["experts"] = "differs per layer: see the plan's 'removed'"
    return new, notes


def _covered(model, units: dict) -> int:
    """How many layers ``units`` speaks for: a group named by a whole stack (T5's heads share
    one relative-position table per stack: ``encoder.block``) counts each of its layers."""
    n = 0
    for name in units:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            m = None
        n += len(m) if isinstance(m, (nn.ModuleList, nn.Sequential)) else 1
    return n


def _peers(model, name: str) -> set[str]:
    """Modules of ``name``'s class at the same path with any layer numbers: the layers a
    config count speaks for (DeepSeek's dense ``layers.0.mlp`` is not a peer of the MoE
    ``layers.1.mlp``)."""
    try:
        cls = type(model.get_submodule(name))
    except AttributeError:
        return {name}
    pat = re.compile(re.sub(r"\\\.\d+(?=\\\.|$)", r"\\.\\d+", re.escape(name)) + "$")
    return {n for n, m in model.named_modules() if type(m) is cls and pat.match(n)}


# A role whose width the config derives instead of holding it: DeepSeek's shared experts are
# n_shared_experts x moe_intermediate_size wide
DERIVED = {"shared expert": ("n_shared_experts", "moe_intermediate_size")}


def _ffn_config(model, new, units: dict, notes: dict, gone: list[str]) -> None:
    """Each FFN role's width into the config attribute that holds it, where every layer of the
    role kept the same count and no peer layer was left whole."""
    by_role: dict[str, tuple[tuple[str, ...], dict]] = {}
    for layer, v in units.items():
        role, attrs = ffn_role(layer)
        by_role.setdefault(role, (attrs, {}))[1][layer] = v
    derived = {}
    for role, (attrs, mine) in by_role.items():
        attr = _attr(new, attrs)
        counts = {after for _, after in mine.values()}
        whole = {p for layer in mine for p in _peers(model, layer)} - set(mine)
        whole = {p for p in whole if not any(p.startswith(b + ".") for b in gone)}
        if attr is None and role in DERIVED and all(hasattr(new, a) for a in DERIVED[role]):
            derived[role] = counts
        elif attr is None:
            notes[f"ffn {role}"] = f"no config attribute holds it ({' / '.join(attrs)})"
        elif len(counts) == 1 and not whole:
            setattr(new, attr, counts.pop())
        else:
            notes["ffn" if role == "MLP" else f"ffn {role}"] = (
                "differs per layer: see the plan's 'units'"
            )
    for role, counts in derived.items():  # after the width they derive from is set
        n, width = (getattr(new, a) for a in DERIVED[role])
        if counts != {n * width}:
            notes[f"ffn {role}"] = (
                f"{type(new).__name__} derives its width as {DERIVED[role][0]} x "
                f"{DERIVED[role][1]} = {n * width}; the pass left {sorted(counts)}"
            )


def source_folder(model) -> Path | None:
    """The local folder ``model`` was loaded from (``from_pretrained(dir)``), if any."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(name) if name else None
    return path if path is not None and path.is_dir() else None


def check_config_valid(cfg, what: str = "save_pretrained") -> None:
    """Run the config class's own validation (transformers' ``@strict`` validators) on the
    pruned counts, and refuse with the reason: ``LlamaConfig`` requires ``hidden_size`` to be a
    multiple of ``num_attention_heads`` even when ``head_dim`` is explicit, so a Llama pruned
    from 32 to 24 heads of 128 has no Llama config (16 heads does; Mistral / Qwen2 configs take
    any count)."""
    validate = getattr(cfg, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as e:  # noqa: BLE001 - the validators raise what they like
        cause = getattr(e, "__cause__", None) or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        heads = getattr(cfg, "num_attention_heads", None)
        hidden = getattr(cfg, "hidden_size", None)
        if heads and hidden and hidden % heads:
            why = (
                f"{heads} attention heads: it needs hidden_size ({hidden}) to be a multiple of "
                "num_attention_heads even with head_dim set; prune to a head count that "
                f"divides {hidden}"
            )
        else:
            why = f"the pruned counts ({first})"
        raise ConfigError(f"{what}: {type(cfg).__name__} refuses {why}") from e


def accepted_head_units(cfg) -> tuple[int, int, list[int]] | None:
    """(key/value units, query heads per unit, the unit counts ``type(cfg)``'s own validation
    accepts) for a config with ``num_attention_heads``; None without one. Asked of the config
    class itself (copies with each count, validated), so the day transformers accepts more
    counts, fxprune does too."""
    heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1 or getattr(cfg, "validate", None) is None:
        return None
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % kv:
        return None
    ok = []
    for k in range(1, kv + 1):
        c = copy.deepcopy(cfg)
        c.num_attention_heads = k * (heads // kv)
        if getattr(cfg, "num_key_value_heads", None):
            c.num_key_value_heads = k
        try:
            check_config_valid(c)
        except ConfigError:
            continue
        ok.append(k)
    return kv, heads // kv, ok


def check_config_builds(model) -> None:
    """Build ``type(model)`` from its pruned config on the meta device (no memory) and refuse
    when a weight would come out another shape: ``from_pretrained`` would re-initialise it.
    GPT-2, BERT and ViT derive ``head_dim`` from ``hidden_size / num_attention_heads``, so
    their configs cannot hold fewer heads of the same size."""
    import torch

    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception as e:  # noqa: BLE001 - the config itself is inconsistent
        raise ConfigError(
            f"save_pretrained: {type(model).__name__} cannot be built from the pruned config "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    bad = [
        f"{k} is {tuple(v.shape)}, the config builds {want[k]}"
        for k, v in model.state_dict().items()
        if k in want and tuple(v.shape) != want[k]
    ]
    if bad:
        heads = [b for b in bad if any(w in b for w in ("attn", "attention", "query", "qkv"))]
        why = (
            f"; {type(model.config).__name__} derives the head size from hidden_size / "
            "num_attention_heads, so it cannot describe fewer heads (prune FFN and blocks for a "
            "Hugging Face folder, or save the fxprune checkpoint with result.save(path))"
            if heads
            else "; save the fxprune checkpoint with result.save(path)"
        )
        raise ConfigError(
            f"save_pretrained: from_pretrained would not rebuild this pruned "
            f"{type(model).__name__}: {bad[0]}"
            + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
            + why
        )


def check_heads_reload(model) -> None:
    """Refuse a tree whose attention layers select their kept heads of a per-head constant the
    model builds for its original head count (``fxprune.materialize_alibi``: Bloom's and Falcon's
    ALiBi slopes): the stock class rebuilds that constant from the config's count, and no config
    field it reads says which heads were kept, so ``from_pretrained`` would give the kept heads
    other slopes."""
    layers = [n for n, m in model.named_modules() if getattr(m, "selects_kept_heads", False)]
    if layers:
        raise ConfigError(
            f"save_pretrained: {type(model).__name__} builds its ALiBi slopes from the config's "
            f"head count, and {layers[0]}"
            + (f" (+{len(layers) - 1} more)" if len(layers) > 1 else "")
            + " selects its kept heads' own slopes from those built for the original count; no "
            f"{type(model.config).__name__} field says which heads were kept, so from_pretrained "
            "would give them other slopes (save the fxprune checkpoint with result.save(path))"
        )


def save_pretrained(result, path, tokenizer_from=None, overwrite: bool = False, **kwargs) -> Path:
    """Write ``result.model`` as a Hugging Face folder (config.json with the pruned counts +
    safetensors weights, tokenizer files of the source folder copied), atomically (see the
    module docstring); see :meth:`fxprune.plan.CompileResult.save_pretrained`."""
    model = result.model
    if result.model is result.module:
        raise UnsupportedModelError(
            "save_pretrained needs result.model as the model's own class, but: "
            f"{result.model_note}; save the fxprune checkpoint with result.save(path)"
        )
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(
            f"save_pretrained: {type(model).__name__} is not a Hugging Face model; save the "
            "fxprune checkpoint with result.save(path)"
        )
    uneven = result.plan.config.get("hf_config_notes") or {}
    if uneven:
        what = "; ".join(f"{k} {v}" for k, v in uneven.items())
        raise ConfigError(
            f"save_pretrained: {what}, and a Hugging Face config holds one count for every "
            "layer; compile with uniform=True (the same count removed from each layer), or save "
            "the fxprune checkpoint with result.save(path)"
        )
    if tokenizer_from is not None and not Path(tokenizer_from).is_dir():
        raise ConfigError(
            f"save_pretrained: tokenizer_from={str(tokenizer_from)!r} is not a folder"
        )
    check_heads_reload(model)
    check_config_valid(model.config)
    check_config_builds(model)
    out = Path(path)
    out = out.resolve() if out.is_symlink() else out  # swap the folder, not the link
    if out.exists() and not out.is_dir():
        raise ConfigError(f"save_pretrained: {out} is a file; give a folder")
    src = Path(tokenizer_from) if tokenizer_from is not None else source_folder(model)
    loaded_from = source_folder(model)
    if loaded_from is not None and out.is_dir() and out.samefile(loaded_from) and not overwrite:
        raise FileAccessError(
            f"save_pretrained: {out} is the folder the model was loaded from; saving there "
            "replaces its dense weights: save to another folder, or pass overwrite=True (--overwrite)"
        )
    if kwargs.get("push_to_hub"):  # transformers names the repo after the folder it writes
        kwargs.setdefault("repo_id", out.name)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), **kwargs)
        copy_tokenizer(src, tmp)

    write_folder(out, write, owned=OWNED, what="save_pretrained")
    return out


# the files of a folder that a Hugging Face save owns (see the module docstring)
OWNED = re.compile(
    r"config\.json|generation_config\.json"
    r"|(?:pytorch_)?model(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)"
    r"|(?:pytorch_)?model\.(?:safetensors|bin)\.index\.json"
)


def copy_tokenizer(src: Path | None, out: Path) -> list[str]:
    """Copy the :data:`TOKENIZER_FILES` of folder ``src`` (None: nothing) into ``out``; the
    names copied."""
    if src is None or src.resolve() == out.resolve():
        return []
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copy2(src / name, out / name)
    return copied
