"""A decoder checkpoint on disk as :func:`fxprune.stream` reads and writes it: where each
family keeps its parts (:data:`FAMILIES`), the source read lazily from its safetensors shards
(:class:`Shards`, :class:`Source`: one block at a time over a meta-device skeleton, every shard's
header, the index and the config checked against each other first, with
``fxprune.streaming_checks``), the output written in shards (:class:`ShardWriter`), the head and
FFN counts its config holds (and whether a pruned config describes the weights written), and the
memory that took (:func:`peak_rss_bytes`)."""

from __future__ import annotations

import copy
import json
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fxprune.errors import CheckpointError, PassError, UnsupportedModelError

SHARD_BYTES = 1024**3  # output shard size: a pending shard is held in memory until written


@dataclass(frozen=True)
class Family:
    """Where a decoder family keeps its parts (module paths in ``AutoModelForCausalLM``)."""

    layers: str = "model.layers"  # the ModuleList of repeated blocks
    rotary: str = "model.rotary_emb"  # the model-level rotary embedding every block reads
    embed: str = "model.embed_tokens"
    q: str = "self_attn.q_proj"  # in a block: what the new head counts are read from
    k: str = "self_attn.k_proj"
    ffn: str = "mlp.up_proj"


FAMILIES: dict[str, Family] = {}


def family(*model_types: str, **paths: str) -> None:
    """Register how the decoder families ``model_types`` are laid out (see :class:`Family`)."""
    for t in model_types:
        FAMILIES[t] = Family(**paths)


family("llama", "mistral", "qwen2", "qwen3")


class Block(nn.Module):
    """One decoder block as the model's forward calls it: rotary position embeddings from the
    model-level rotary module, positions 0..T-1, causal attention (SDPA with no mask)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module):
        super().__init__()
        self.layer = layer
        self.rotary = rotary

    def forward(self, hidden_states):
        pos = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
        out = self.layer(
            hidden_states,
            attention_mask=None,
            position_ids=pos,
            position_embeddings=self.rotary(hidden_states, pos),
        )
        return out[0] if isinstance(out, tuple) else out


class Shards:
    """Lazy access to a folder's safetensors weights (the index ``from_pretrained`` reads, else
    ``model.safetensors``; other files are not the model's): a tensor is read when asked for,
    and the shard is unmapped after each read, so resident memory is what the caller holds.
    Every shard's header is read up front: a truncated or garbled shard, or an index naming a
    shard that does not hold the tensor, is refused before anything is written."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        from fxprune.models import hf_weights

        self.folder = folder
        self._open = safe_open
        kind, files = hf_weights(folder)
        if kind != "safetensors":
            raise CheckpointError(_no_safetensors(folder, kind, files))
        if files[0].name.endswith(".json"):
            try:
                self.where = dict(json.loads(files[0].read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{files[0]}: not a safetensors index ({e})") from e
        else:
            self.where = None
        missing = sorted({f for f in (self.where or {}).values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{folder}: the index names missing shard(s) {missing[:3]}")
        names = sorted(set(self.where.values())) if self.where else [files[0].name]
        self.shapes: dict[str, tuple] = {}  # every tensor each shard holds, from its header
        held: dict[str, str] = {}
        for f in names:
            with self._opened(f) as h:
                for k in h.keys():
                    self.shapes[k] = tuple(h.get_slice(k).get_shape())
                    held[k] = f
        if self.where is None:
            self.where = held
        wrong = [(k, f) for k, f in self.where.items() if held.get(k) != f]
        if wrong:
            k, f = wrong[0]
            where = f"it is in {held[k]}" if k in held else "no shard holds it"
            raise CheckpointError(
                f"{files[0]}: maps {k} to {f}, which does not hold it ({where}; "
                f"{len(wrong)} entr{'y' if len(wrong) == 1 else 'ies'} wrong): the index is "
                "not this folder's; copy the shards and their index together"
            )
        self.nbytes = sum((folder / f).stat().st_size for f in names)

    def _opened(self, name: str):
        """The shard ``name`` opened, its failure (a truncated or garbled file) typed."""
        from safetensors import SafetensorError

        path = self.folder / name
        try:
            return self._open(path, "pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt: "
                "copy it again"
            ) from e

    def keys(self) -> list[str]:
        return list(self.where)

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError

        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with self._opened(f) as h:  # unmapped when the block ends
                try:
                    for k in ks:
                        out[k] = h.get_tensor(k)
                except (SafetensorError, OSError) as e:  # changed since it was opened
                    raise CheckpointError(f"{self.folder / f}: cannot read {k}: {e}") from e
        return out


def _no_safetensors(folder: Path, kind: str | None, files: list[Path]) -> str:
    if kind == "pickle":
        return (
            f"{folder}: the weights are {files[0].name}, a pickle; stream reads safetensors only "
            "(transformers' from_pretrained then save_pretrained writes them)"
        )
    if files:
        names = ", ".join(f.name for f in files[:3])
        why = (
            "shards without their index: copy model.safetensors.index.json too"
            if any("-of-" in f.name for f in files)
            else "not the model's weights"
        )
        return f"{folder}: no model.safetensors (or model.safetensors.index.json); {names}: {why}"
    return (
        f"{folder}: no safetensors weights (model.safetensors or "
        "model.safetensors.index.json); stream reads safetensors only (save the "
        "model with save_pretrained(..., safe_serialization=True))"
    )


class ShardWriter:
    """Write tensors to ``model-0000i-of-0000n.safetensors`` shards of at most ``max_bytes``
    (one shard: ``model.safetensors``) and the index ``from_pretrained`` reads."""

    def __init__(self, folder: Path, max_bytes: int = SHARD_BYTES):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self.flush()
        self.pending[name] = t.detach().contiguous()
        self.pending_bytes += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        tmp = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.folder / tmp), metadata={"format": "pt"})
        self.files.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        self.flush()
        n = len(self.files)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        weight_map = {}
        for (tmp, keys), name in zip(self.files, names, strict=True):
            (self.folder / tmp).rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
        return names


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Source:
    """The source model as a meta-device skeleton over its lazy shards: its config, its decoder
    family, and each block (or the token embedding) loaded from the shards when asked for.
    ``trust`` runs the code a config's ``auto_map`` names (:func:`fxprune.models.hf_config`);
    everything the folder holds is checked against the config before a block is pruned."""

    def __init__(self, src: Path, trust: bool = False, log=None):
        import transformers

        from fxprune.models import hf_config, remote_code_files
        from fxprune.streaming_checks import check_config_fits

        self.src = src
        cfg = hf_config(src / "config.json", trust, "stream", log)
        self.raw = json.loads((src / "config.json").read_text())  # as written: which keys it gives
        self.trust = bool(trust and remote_code_files(self.raw))  # run the folder's code
        self.fam = FAMILIES.get(cfg.model_type)
        if self.fam is None:
            raise UnsupportedModelError(
                f"stream: no decoder layout registered for model_type {cfg.model_type!r} "
                f"(known: {sorted(FAMILIES)}); register it with fxprune.streaming.family(...) or "
                "use fxprune.compile"
            )
        self.shards = Shards(src)
        cfg._attn_implementation = "sdpa"  # causal with no mask; eager would need one
        self.cfg = cfg
        with torch.device("meta"):
            self.skeleton = transformers.AutoModelForCausalLM.from_config(
                cfg, trust_remote_code=self.trust
            )
        check_config_fits(src, cfg, self.raw, self.skeleton, self.fam, self.shards)
        self.stack = self.skeleton.get_submodule(self.fam.layers)
        # the model-level rotary embedding, built for real (its buffers are computed, not saved)
        self.rotary = type(self.skeleton.get_submodule(self.fam.rotary))(config=cfg)
        self.dtype = next(self.stack[0].parameters()).dtype
        self.prefix = self.fam.layers + "."
        gen = torch.Generator().manual_seed(0)
        self.example = (torch.randn(1, 8, cfg.hidden_size, generator=gen) * 0.02).to(self.dtype)

    def embed(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """The hidden states the token embedding makes of each calibration batch."""
        path = self.fam.embed
        embed = copy.deepcopy(self.skeleton.get_submodule(path))
        keys = [f"{path}.{n}" for n, _ in embed.named_parameters()]
        loaded = self.shards.load(keys)
        embed.load_state_dict({k[len(path) + 1 :]: v for k, v in loaded.items()}, assign=True)
        with torch.no_grad():
            hidden = [embed(b) for b in ids]
        self.example = hidden[0]
        return hidden

    def load_block(self, i: int) -> Block:
        layer = copy.deepcopy(self.stack[i])  # meta: no memory until its tensors are assigned
        pre = f"{self.prefix}{i}."
        names = [pre + n for n in layer.state_dict()]
        missing = [n for n in names if n not in self.shards.where]
        if missing:
            raise CheckpointError(f"{self.src}: block {i} lacks {missing[:3]} in its shards")
        loaded = self.shards.load(names)
        layer.load_state_dict({k[len(pre) :]: v for k, v in loaded.items()}, assign=True)
        meta = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
        if meta:
            raise UnsupportedModelError(
                f"stream: block {i} has state the checkpoint does not hold: {meta[:3]}"
            )
        return Block(layer, self.rotary).eval()


def config_counts(cfg) -> dict:
    """The head and FFN counts a Hugging Face config holds."""
    heads = cfg.num_attention_heads
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "intermediate_size": cfg.intermediate_size,
    }


def block_counts(layer: nn.Module, fam: Family, head_dim: int) -> dict:
    """The same counts, read off a (pruned) block's weights."""
    q, k = layer.get_submodule(fam.q), layer.get_submodule(fam.k)
    return {
        "num_attention_heads": q.weight.shape[0] // head_dim,
        "num_key_value_heads": k.weight.shape[0] // head_dim,
        "head_dim": head_dim,
        "intermediate_size": layer.get_submodule(fam.ffn).weight.shape[0],
    }


def with_counts(cfg, counts: dict):
    """A copy of the config ``cfg`` holding ``counts``."""
    new = copy.deepcopy(cfg)
    for k, v in counts.items():
        setattr(new, k, v)
    return new


def check_builds(cfg, shapes: dict[str, tuple], trust: bool = False) -> None:
    """The pruned config builds (on the meta device; ``trust``: with the folder's code) every
    block weight in the shape written: otherwise ``from_pretrained`` would re-initialise it."""
    import transformers

    with torch.device("meta"):
        fresh = transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    bad = [
        f"{k} is {s}, the config builds {want.get(k)}"
        for k, s in shapes.items()
        if want.get(k) != s
    ]
    if bad:
        raise PassError(f"stream: the pruned config does not describe the weights: {bad[0]}")
