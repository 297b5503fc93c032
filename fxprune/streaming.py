"""Prune a Hugging Face decoder checkpoint layer by layer, in the memory of one layer.

``fxprune.compile`` holds the whole model (and a working copy of it). A 7B model in bf16 is
12.6 GiB of weights, so that needs ~31 GiB. :func:`stream` never builds the model: it

1. reads ``config.json`` and builds the model on the meta device (no memory), to know its
   classes and the decoder stack (:data:`FAMILIES` says where the stack, its rotary embedding
   and its token embedding live for each ``model_type``), and checks, before writing anything,
   that every shard's header reads, that the index names the shard holding each tensor, and that
   the config describes the shards (its layer count, every shape; a count key it leaves to a
   default the weights contradict is named); code an ``auto_map`` names runs only with
   ``trust=True``;
2. captures block 0 once (torch.export) and reuses that graph for every other block
   (:func:`fxprune.graph.trace.retarget`): the blocks repeat;
3. for each block: loads its tensors from the safetensors shards (only that block's, the shard
   unmapped after), runs ``fxprune.compile`` on it with the same options (heads / KV heads, FFN,
   N:M by magnitude, Wanda or SparseGPT; ``uniform=True``), proves the pruned block against the
   dense one with the removed structures zeroed (on :data:`PROOF_TOKENS` tokens and a fresh
   draw at batch + 1), and writes the pruned tensors to the output shards as it goes;
4. copies every tensor outside the stack (embeddings, final norm, lm_head) through unchanged,
   writes ``config.json`` with the new counts and copies the tokenizer files.

Data-driven choices (``importance="activation"``, Wanda, SparseGPT) calibrate sequentially, as
SparseGPT's and Wanda's own code do: block i is measured on the hidden states that the pruned
blocks 0..i-1 produced from the calibration tokens. Wanda and SparseGPT go further, in one
forward of each block (``NM.sequential``): each layer is chosen on what the block's layers
before it, already pruned, give (SparseGPT's "true sequential" order), and that forward's
outputs are the next block's hidden states, so no second pass runs.

The output folder opens with ``AutoModelForCausalLM.from_pretrained`` in a process that never
imports fxprune; ``tests/test_streaming.py`` checks it equals ``compile(...).save_pretrained``.

This module holds the pruning (steps 2-3, the options, the result); the checkpoint side (the
families' layouts, the source read from its shards, the shards written, the config's counts) is
``fxprune.streaming_io``, whose public names are importable from here too.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fxprune._util import Report, frozen_gc
from fxprune.errors import (
    CheckpointError,
    ConfigError,
    FileAccessError,
    PassError,
    UnsupportedModelError,
)
from fxprune.hf import TOKENIZER_FILES, check_config_valid
from fxprune.importance import auto_importance, name_of, resolve
from fxprune.models import remote_code_files
from fxprune.streaming_io import (
    FAMILIES,  # noqa: F401 - re-exported
    SHARD_BYTES,
    Block,
    Family,  # noqa: F401 - re-exported
    Shards,  # noqa: F401 - re-exported
    ShardWriter,
    Source,
    block_counts,
    check_builds,
    config_counts,
    family,  # noqa: F401 - re-exported
    peak_rss_bytes,
    with_counts,
)

PROOF_TOKENS = 8
"""Tokens of the example each block's proof runs on (the first ones of the first calibration
batch when there is one, else random hidden states), plus one fresh draw of them at batch + 1
(a second draw of a hidden-state input would have the same shape again). Enough to be as strict
as a longer input: the pruning changes weights, never how a block mixes positions, so a removed
head, neuron or masked weight that changes the result changes it at every position whose input
is non-zero in its dims, and hidden states are dense.
The calibration's 128-token batch made the proof of a Wanda / SparseGPT stream 16x the work of
a magnitude one's (0.5B shape: 36 s of a 90 s run against 16 s)."""


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
    importance="auto",
    calibration=None,
    calibration_batches: int = 8,
    min_heads: int = 1,
    round_to: int | None = None,
    prove: bool = True,
    max_shard_bytes: int = SHARD_BYTES,
    trust: bool = False,
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
            (``"activation"``, ``"entropy"``, ``"confidence"``); ``"auto"`` is ``"activation"``
            with ``calibration``, else ``"l1"`` (as in ``compile``).
        calibration: token-id batches (``[batch, seq]`` tensors, or dicts with ``input_ids``
            and an all-ones ``attention_mask``) for data-driven choices; block i sees the hidden
            states the pruned blocks before it made from them.
        calibration_batches: how many batches to take from ``calibration``.
        prove: prove each pruned block against its dense twin with the removed parts zeroed
            (:func:`fxprune.verify.equivalence`); a block that fails stops the run.
        max_shard_bytes: size of each output safetensors shard.
        trust: run the Python files ``config.json``'s ``auto_map`` names (transformers'
            ``trust_remote_code``); without it a config that needs them is refused, and one
            whose ``model_type`` transformers knows is built with transformers' own classes.
        log: ``log(str)`` for progress lines (default: silent).

    Returns:
        A :class:`StreamResult` (``table()`` prints it).

    Raises:
        ConfigError: an option is out of range, nothing is asked for, ``out`` is not empty, or
            the config needs the folder's code and ``trust`` is False.
        CheckpointError: ``source`` has no config or no safetensors weights (the index, else
            ``model.safetensors``), a shard is truncated or garbled, the index names a shard
            that does not hold the tensor, or ``config.json`` does not describe the shards (its
            layer count, a key it leaves to a default the weights contradict, a shape); all
            before anything is written.
        UnsupportedModelError: the model type has no registered :class:`Family`.
        PassError: a pruned block fails its proof, or blocks came out with different counts.
    """
    t0 = time.perf_counter()
    src, dst = Path(source), Path(out)
    importance = auto_importance(importance, "ffn", calibration is not None)
    measured = sparsity_method != "magnitude" or bool(resolve(importance).needs and (heads or ffn))
    _check_options(
        src, dst, heads, ffn, sparsity, sparsity_method, importance, measured, calibration
    )
    run = _Stack(src, log or (lambda s: None), trust)
    options = dict(heads=heads, ffn=ffn, sparsity=sparsity, sparsity_method=sparsity_method)
    options.update(importance=importance, min_heads=min_heads, round_to=round_to, uniform=True)
    from fxprune.verify.inputs import reused_copies

    hidden = None  # the calibration's hidden states entering the next block
    if measured:
        hidden = run.embed(_token_batches(calibration, calibration_batches, run.cfg.vocab_size))
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        result = StreamResult(
            dst, config_counts(run.cfg), {}, bytes_in=run.shards.nbytes, options=options
        )
        writer = ShardWriter(dst, max_shard_bytes)
        shapes: dict[str, tuple] = {}
        with frozen_gc(), reused_copies():  # every block's proof copies in the last one's memory
            for i in range(len(run.stack)):
                hidden = run.prune_block(i, options, hidden, prove, result, writer, shapes)
        for k in run.shards.keys():  # embeddings, final norm, lm_head: unchanged
            if not k.startswith(run.prefix):
                writer.add(k, run.shards.load([k])[k])
        writer.close()
        new = with_counts(run.cfg, result.after)
        check_builds(new, shapes, run.trust)
        new.save_pretrained(dst)
        # the auto_map's code too (copied, not run), so that the config's auto_map resolves
        for name in ("generation_config.json", *TOKENIZER_FILES, *remote_code_files(run.raw)):
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
    if resolve(importance).needs == "learned":
        raise ConfigError(
            "stream: importance='learned' trains gates with your train_fn on the whole model; a "
            "block-by-block pass has no such loop: use fxprune.compile"
        )
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


class _Stack(Source):
    """The source model (:class:`fxprune.streaming_io.Source`), the one capture of its
    repeated block, and the pruning of each block."""

    def __init__(self, src: Path, log, trust: bool = False):
        super().__init__(src, trust, log)
        self.log = log
        self.template = None

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
        from fxprune.materialize import proved_by_caller
        from fxprune.options import sequential_nm
        from fxprune.verify import equivalence

        ti = time.perf_counter()
        block = self.load_block(i)
        stored = next(block.layer.parameters()).dtype  # the shards' dtype, whatever the config says
        if self.example.dtype != stored:
            self.example = self.example.to(stored)
        # a data-driven N:M pass calibrates layer by layer in its one forward, and that
        # forward's outputs (the pruned block's) are the next block's hidden states
        recipe, _ = sequential_nm(block, hidden is not None, **options)
        with proved_by_caller() if prove else contextlib.nullcontext():  # (proved below)
            res = compile_block(
                block,
                self.example,
                recipe,
                calibration=hidden,
                calibration_batches=len(hidden) if hidden else None,
                capture=self.capture(block),
                dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},),
            )
        if res.model is res.module:
            raise UnsupportedModelError(
                f"stream: block {i} ({type(block.layer).__name__}) cannot be rebuilt as its "
                f"own class: {res.model_note}"
            )
        err = None
        if prove:
            short = self.example[:, :PROOF_TOKENS]
            rep = equivalence(block, res, short, target="model", fresh_inputs=1)
            if not rep.ok:
                raise PassError(f"stream: pruned block {i} fails its proof: {rep.message}")
            err = rep.max_rel_err
        pruned = res.model.layer
        counts = block_counts(pruned, self.fam, result.before["head_dim"])
        if not result.after:
            result.after = counts
            check_config_valid(with_counts(self.cfg, counts), "stream")  # before any writing
        elif counts != result.after:
            raise PassError(
                f"stream: block {i} came out with {counts}, block 0 with {result.after}; a "
                "Hugging Face config holds one count for every block"
            )
        if hidden is not None:
            ran = getattr(res.passes[-1], "outputs", None)  # a sequential N:M's, if last
            with torch.no_grad():
                hidden = ran if ran is not None else [res.model(h) for h in hidden]
        # a tensor the passes left as it was is the shard's own (read zero-copy from its
        # mapping): the writer gets a copy, or its pending shard would keep the whole mapping,
        # the dense weights the passes replaced included, resident until it flushes
        mapped = {t.untyped_storage().data_ptr() for t in block.layer.state_dict().values()}
        state = {
            n: t.clone() if t.untyped_storage().data_ptr() in mapped else t
            for n, t in pruned.state_dict().items()
        }
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
