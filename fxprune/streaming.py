"""Prune a Hugging Face decoder checkpoint layer by layer, in the memory of one layer.

``fxprune.compile`` holds the whole model (and a working copy of it). A 7B model in bf16 is
12.6 GiB of weights, so that needs ~31 GiB. :func:`stream` never builds the model: it

1. reads ``config.json`` and builds the model on the meta device (no memory), to know its
   classes and the decoder stack (:data:`FAMILIES` says where the stack, its rotary embedding
   and its token embedding live for each ``model_type``);
2. captures block 0 once (torch.export) and reuses that graph for every other block
   (:func:`fxprune.graph.trace.retarget`): the blocks repeat;
3. for each block: loads its tensors from the safetensors shards (only that block's, the shard
   unmapped after), runs ``fxprune.compile`` on it with the same options (heads / KV heads, FFN,
   N:M by magnitude, Wanda or SparseGPT; ``uniform=True``), proves the pruned block against the
   dense one with the removed structures zeroed, and writes the pruned tensors to the output
   shards as it goes;
4. copies every tensor outside the stack (embeddings, final norm, lm_head) through unchanged,
   writes ``config.json`` with the new counts and copies the tokenizer files.

Data-driven choices (``importance="activation"``, Wanda, SparseGPT) calibrate sequentially, as
SparseGPT's and Wanda's own code do: block i is measured on the hidden states that the pruned
blocks 0..i-1 produced from the calibration tokens.

The output folder opens with ``AutoModelForCausalLM.from_pretrained`` in a process that never
imports fxprune; ``tests/test_streaming.py`` checks it equals ``compile(...).save_pretrained``.
"""

from __future__ import annotations

import copy
import gc
import json
import resource
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from fxprune._util import Report
from fxprune.errors import (
    CheckpointError,
    ConfigError,
    FileAccessError,
    PassError,
    UnsupportedModelError,
)
from fxprune.hf import TOKENIZER_FILES, check_config_valid
from fxprune.importance import name_of, resolve

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
    """Lazy access to a folder's safetensors weights: a tensor is read when asked for, and the
    shard is unmapped after each read, so resident memory is what the caller holds."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        self._open = safe_open
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                self.where = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"{folder}: no safetensors weights (model.safetensors or "
                    "model.safetensors.index.json); stream reads safetensors only (save the "
                    "model with save_pretrained(..., safe_serialization=True))"
                )
            self.where = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    self.where.update(dict.fromkeys(h.keys(), f.name))
        missing = sorted({f for f in self.where.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{folder}: the index names missing shard(s) {missing[:3]}")
        self.nbytes = sum((folder / f).stat().st_size for f in set(self.where.values()))

    def keys(self) -> list[str]:
        return list(self.where)

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with self._open(self.folder / f, "pt") as h:  # unmapped when the block ends
                for k in ks:
                    out[k] = h.get_tensor(k)
        return out


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


@dataclass
class LayerReport:
    index: int
    seconds: float
    params_before: int
    params_after: int
    max_rel_err: float | None  # the block's proof (None when prove=False)
    nm_layers: int = 0


@dataclass
class StreamResult(Report):
    """What :func:`stream` did: the folder, the counts before and after, one row per block,
    the time, the bytes read and written, and the process's peak resident memory."""

    path: Path
    before: dict
    after: dict
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    peak_rss_bytes: int = 0
    options: dict = field(default_factory=dict)

    def table(self) -> str:
        def g(b):
            return f"{b / 1024**3:.2f} GiB"

        lines = [
            f"streamed {len(self.layers)} blocks in {self.seconds:.1f} s: "
            + ", ".join(f"{k} {self.before[k]} -> {self.after[k]}" for k in self.before),
            f"weights {g(self.bytes_in)} -> {g(self.bytes_out)}; peak RSS {g(self.peak_rss_bytes)}"
            f" ({self.peak_rss_bytes / max(self.bytes_in, 1):.2f}x the input weights)",
        ]
        errs = [r.max_rel_err for r in self.layers if r.max_rel_err is not None]
        if errs:
            lines.append(
                f"every block proved equal to its dense twin with the removed parts zeroed "
                f"(worst max_rel_err {max(errs):.2e})"
            )
        return "\n".join(lines)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _counts(cfg) -> dict:
    heads = cfg.num_attention_heads
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "intermediate_size": cfg.intermediate_size,
    }


def _block_counts(layer: nn.Module, fam: Family, head_dim: int) -> dict:
    q, k = layer.get_submodule(fam.q), layer.get_submodule(fam.k)
    return {
        "num_attention_heads": q.weight.shape[0] // head_dim,
        "num_key_value_heads": k.weight.shape[0] // head_dim,
        "head_dim": head_dim,
        "intermediate_size": layer.get_submodule(fam.ffn).weight.shape[0],
    }


def _token_batches(calibration, limit: int, vocab: int) -> list[torch.Tensor]:
    out = []
    for i, b in enumerate(calibration):
        if i == limit:
            break
        if isinstance(b, dict):
            mask = b.get("attention_mask")
            if mask is not None and not bool((mask == 1).all()):
                raise ConfigError(
                    f"calibration batch {i} is padded (attention_mask holds zeros); stream "
                    "calibrates on unpadded token batches of equal length"
                )
            b = b.get("input_ids")
        if not isinstance(b, torch.Tensor) or b.ndim != 2 or b.is_floating_point():
            raise ConfigError(
                f"calibration batch {i} must be a [batch, seq] tensor of token ids (or a dict "
                f"with 'input_ids'), got {type(b).__name__}"
                + (f" of shape {tuple(b.shape)}" if isinstance(b, torch.Tensor) else "")
            )
        if int(b.min()) < 0 or int(b.max()) >= vocab:
            raise ConfigError(
                f"calibration batch {i} holds token ids outside [0, {vocab}) of the vocabulary"
            )
        out.append(b)
    if not out:
        raise ConfigError("calibration gave no batches")
    return out


def stream(
    source: str | Path,
    out: str | Path,
    *,
    heads: float | int = 0.0,
    ffn: float = 0.0,
    sparsity: str | None = None,
    sparsity_method: str = "magnitude",
    importance="l1",
    calibration=None,
    calibration_batches: int = 8,
    min_heads: int = 1,
    round_to: int | None = None,
    prove: bool = True,
    max_shard_bytes: int = SHARD_BYTES,
    log=None,
) -> StreamResult:
    """Prune the Hugging Face causal LM in folder ``source`` block by block and write the
    pruned model to folder ``out`` (``from_pretrained`` opens it), holding about one block of
    weights at a time.

    Args:
        source: a folder with ``config.json`` and safetensors weights (a Llama, Mistral, Qwen2
            or Qwen3 causal LM; :func:`family` registers others).
        out: the folder to write (created; an existing non-empty folder is refused).
        heads, ffn, sparsity, sparsity_method, importance, min_heads, round_to: as for
            :func:`fxprune.compile`, applied to every block (so every block keeps the same
            counts, as a Hugging Face config holds). ``importance`` is a weight criterion
            (``"l1"``, ``"l2"``, ``"random"``) or one measured on the block's inputs
            (``"activation"``, ``"entropy"``, ``"confidence"``).
        calibration: token-id batches (``[batch, seq]`` tensors, or dicts with ``input_ids``
            and an all-ones ``attention_mask``) for data-driven choices; block i sees the hidden
            states the pruned blocks before it made from them.
        calibration_batches: how many batches to take from ``calibration``.
        prove: prove each pruned block against its dense twin with the removed parts zeroed
            (:func:`fxprune.verify.equivalence`); a block that fails stops the run.
        max_shard_bytes: size of each output safetensors shard.
        log: ``log(str)`` for progress lines (default: silent).

    Returns:
        A :class:`StreamResult` (``table()`` prints it).

    Raises:
        ConfigError: an option is out of range, nothing is asked for, or ``out`` is not empty.
        CheckpointError: ``source`` has no config or no safetensors weights.
        UnsupportedModelError: the model type has no registered :class:`Family`.
        PassError: a pruned block fails its proof, or blocks came out with different counts.
    """
    t0 = time.perf_counter()
    src, dst = Path(source), Path(out)
    measured = sparsity_method != "magnitude" or bool(resolve(importance).needs and (heads or ffn))
    _check_options(
        src, dst, heads, ffn, sparsity, sparsity_method, importance, measured, calibration
    )
    run = _Stack(src, log or (lambda s: None))
    options = dict(
        heads=heads,
        ffn=ffn,
        sparsity=sparsity,
        sparsity_method=sparsity_method,
        importance=importance,
        min_heads=min_heads,
        round_to=round_to,
        uniform=True,
    )
    hidden = None  # the calibration's hidden states entering the next block
    if measured:
        hidden = run.embed(_token_batches(calibration, calibration_batches, run.cfg.vocab_size))
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        result = StreamResult(
            dst, _counts(run.cfg), {}, bytes_in=run.shards.nbytes, options=options
        )
        writer = ShardWriter(dst, max_shard_bytes)
        shapes: dict[str, tuple] = {}
        for i in range(len(run.stack)):
            hidden = run.prune_block(i, options, hidden, prove, result, writer, shapes)
        for k in run.shards.keys():  # embeddings, final norm, lm_head: unchanged
            if not k.startswith(run.prefix):
                writer.add(k, run.shards.load([k])[k])
        writer.close()
        new = _with_counts(run.cfg, result.after)
        _check_builds(new, shapes)
        new.save_pretrained(dst)
        for name in ("generation_config.json", *TOKENIZER_FILES):
            if (src / name).is_file():
                try:
                    shutil.copy2(src / name, dst / name)
                except OSError as e:
                    raise FileAccessError(f"stream: cannot copy {src / name}: {e}") from e
    except BaseException:
        # no half-written folder is left looking like a model
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        else:
            for f in dst.iterdir():
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        raise
    result.bytes_out = writer.total
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _check_options(src, dst, heads, ffn, sparsity, method, importance, measured, calibration):
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: no config.json (stream needs a Hugging Face model folder)")
    if not (heads or ffn or sparsity):
        raise ConfigError("stream: nothing to do (give heads=, ffn= or sparsity=)")
    if resolve(importance).needs == "taylor":  # resolve: a ConfigError for an unknown name
        raise ConfigError(
            f"stream: importance={name_of(importance)!r} reads gradients, and taylor needs the "
            "model's loss, which a block-by-block pass never computes; use fxprune.compile"
        )
    if measured and calibration is None:
        what = (
            f"sparsity_method={method!r}" if method != "magnitude" else f"importance={importance!r}"
        )
        raise ConfigError(f"stream: {what} measures on data: give calibration= token batches")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"stream: {dst} exists and is not an empty folder")


def _with_counts(cfg, counts: dict):
    new = copy.deepcopy(cfg)
    for k, v in counts.items():
        setattr(new, k, v)
    return new


class _Stack:
    """The source model as a meta-device skeleton over its lazy shards, and the one capture
    of its repeated block."""

    def __init__(self, src: Path, log):
        import transformers

        self.src, self.log = src, log
        self.shards = Shards(src)
        cfg = transformers.AutoConfig.from_pretrained(src)
        self.fam = FAMILIES.get(cfg.model_type)
        if self.fam is None:
            raise UnsupportedModelError(
                f"stream: no decoder layout registered for model_type {cfg.model_type!r} "
                f"(known: {sorted(FAMILIES)}); register it with fxprune.streaming.family(...) or "
                "use fxprune.compile"
            )
        cfg._attn_implementation = "sdpa"  # causal with no mask; eager would need one
        self.cfg = cfg
        with torch.device("meta"):
            self.skeleton = transformers.AutoModelForCausalLM.from_config(cfg)
        self.stack = self.skeleton.get_submodule(self.fam.layers)
        # the model-level rotary embedding, built for real (its buffers are computed, not saved)
        self.rotary = type(self.skeleton.get_submodule(self.fam.rotary))(config=cfg)
        self.dtype = next(self.stack[0].parameters()).dtype
        self.prefix = self.fam.layers + "."
        self.template = None
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

    def capture(self, block: Block):
        """Block 0's graph, kept over meta tensors (no memory) for every block to reuse."""
        from torch.export import Dim

        from fxprune.graph import retarget, trace

        if self.template is None:
            free = ({0: Dim.AUTO, 1: Dim.AUTO},)  # any batch and length
            t = trace(copy.deepcopy(block), self.example, mode="export", dynamic_shapes=free)
            self.template = retarget(t, Block(copy.deepcopy(self.stack[0]), self.rotary))
        return self.template

    def prune_block(self, i, options, hidden, prove, result, writer, shapes):
        """Prune block i, prove it, write it; returns the calibration's next hidden states."""
        from fxprune.api import compile as compile_block
        from fxprune.verify import equivalence

        ti = time.perf_counter()
        block = self.load_block(i)
        stored = next(block.layer.parameters()).dtype  # the shards' dtype, whatever the config says
        if self.example.dtype != stored:
            self.example = self.example.to(stored)
        res = compile_block(
            block,
            self.example,
            calibration=hidden,
            calibration_batches=len(hidden) if hidden else None,
            capture=self.capture(block),
            dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},),
            **options,
        )
        if res.model is res.module:
            raise UnsupportedModelError(
                f"stream: block {i} ({type(block.layer).__name__}) cannot be rebuilt as its "
                f"own class: {res.model_note}"
            )
        err = None
        if prove:
            rep = equivalence(block, res, self.example, target="model")
            if not rep.ok:
                raise PassError(f"stream: pruned block {i} fails its proof: {rep.message}")
            err = rep.max_rel_err
        pruned = res.model.layer
        counts = _block_counts(pruned, self.fam, result.before["head_dim"])
        if not result.after:
            result.after = counts
            check_config_valid(_with_counts(self.cfg, counts), "stream")  # before any writing
        elif counts != result.after:
            raise PassError(
                f"stream: block {i} came out with {counts}, block 0 with {result.after}; a "
                "Hugging Face config holds one count for every block"
            )
        if hidden is not None:
            with torch.no_grad():
                hidden = [res.model(h) for h in hidden]
        state = pruned.state_dict()
        for n, t in state.items():
            shapes[f"{self.prefix}{i}.{n}"] = tuple(t.shape)
            writer.add(f"{self.prefix}{i}.{n}", t)
        nm = sum(len(p.get("layers", ())) for p in res.plan.passes if p.get("name") == "nm")
        row = LayerReport(
            i,
            time.perf_counter() - ti,
            sum(t.numel() for t in block.layer.state_dict().values()),
            sum(t.numel() for t in state.values()),
            err,
            nm,
        )
        result.layers.append(row)
        self.log(f"block {i}: {row.seconds:.1f} s, {counts}")
        del res, block, pruned, state
        gc.collect()
        return hidden


def _check_builds(cfg, shapes: dict[str, tuple]) -> None:
    """The pruned config builds (on the meta device) every block weight in the shape written:
    otherwise ``from_pretrained`` would re-initialise it."""
    import transformers

    with torch.device("meta"):
        fresh = transformers.AutoModelForCausalLM.from_config(cfg)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    bad = [
        f"{k} is {s}, the config builds {want.get(k)}"
        for k, s in shapes.items()
        if want.get(k) != s
    ]
    if bad:
        raise PassError(f"stream: the pruned config does not describe the weights: {bad[0]}")
