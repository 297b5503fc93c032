"""How much faster the pruned model really runs than the dense one, on the backend it will be
deployed to, measured side by side.

Method: each model is prepared once per backend (exported to ONNX for ONNX Runtime, compiled for
``torch-compile``), warmed up, then timed in rounds that alternate dense and pruned (the order
flips every round) so that drift of the machine (thermal, other processes) hits both. Every call
is timed on its own; the report gives the median and p10 / p90 per model and batch size, the
speedup of the medians, the MAC ratio, and **efficiency = speedup x MAC ratio**: 1.0 means time
fell exactly as much as the MAC count, 0.5 that half the removed MACs bought nothing. Threads are
fixed (``threads``; ONNX Runtime intra-op threads and ``torch.set_num_threads``).

How much to trust the numbers is measured too: other processes' CPU use during the timed
rounds (``/proc/stat`` minus this process, in cores) and the spread of each model's per-round
medians; a row past the thresholds of ``fxprune.verify.latency_report`` is flagged noisy, and
so is the run (``LatencyReport.noisy``, the table's noise column and note).

A decode backend (``onnxruntime-genai``) times generation instead: time to the first token and
decode tokens/s, with **efficiency = decode speedup x weight-bytes ratio** (decode reads every
weight once per token), in the same rounds and under the same noise judgement
(``fxprune.verify.decode``).

This module holds the entry point, the backend registry (``@backend``, the built-ins) and the
noise judgement; the forward timing is ``fxprune.verify.forward``, the report's rows are in
``fxprune.verify.latency_report``, the CPU runners and :class:`RunContext` in
``fxprune.verify.latency_runners``, the GPU runners in ``fxprune.verify.gpu``.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch

from fxprune._util import eval_mode, lookup, progress_bar, registrar
from fxprune.errors import ConfigError, MissingExtraError
from fxprune.graph.trace import as_args
from fxprune.verify.forward import forward_rows, repeat_batch

# re-exported: fxprune.verify and callers import these from here
from fxprune.verify.latency_report import (  # noqa: F401
    MIN_WINDOW_S,
    LatencyReport,
    LatencyRow,
    noise_reasons,
    verdict,
)
from fxprune.verify.latency_runners import (  # noqa: F401
    CompiledRunner,
    CpuMonitor,
    EagerRunner,
    OrtRunner,
    RunContext,
    cpu_source,
    machine_cpus,
)


class Backend:
    """A latency backend: how a model is prepared once and run per call.

    Register a subclass with ``@backend("name")`` and ``fxprune.verify.latency(...,
    backend="name")`` (and ``fxprune verify --backend name``) times on it.

    ``check()`` runs before anything is prepared: a missing package or device raises a typed
    error (``MissingExtraError``, ``ConfigError``) naming the backend. ``runner(module, args,
    ctx)`` returns an object with ``prepare(args)`` (one batch made ready, outside the timed
    region), ``run(prepared)`` (one forward; its outputs are compared with PyTorch eager for
    the parity column) and ``notes`` (what the backend did: sparse layers, ...). ``gpu``: the
    report names the GPU. ``decode``: the backend times generation instead of a forward
    (``fxprune.verify.decode``: its runner gets the dense model and the compile result).
    """

    name: ClassVar[str] = ""
    gpu: ClassVar[bool] = False
    decode: ClassVar[bool] = False

    def check(self) -> None:
        """Raise when this backend cannot run here."""

    def runner(self, module, args: tuple, ctx: RunContext):
        raise NotImplementedError


REGISTRY: dict[str, Backend] = {}
"""Latency backends by name, in registration order (the built-ins below first)."""


backend = registrar(__name__, "REGISTRY", Backend, "backend")
"""``@backend("name")``: register a :class:`Backend` subclass under ``name``."""


@backend("onnxruntime")
class OnnxRuntime(Backend):
    """Both models exported to ONNX, timed on ONNX Runtime's CPU execution provider."""

    def check(self) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:  # pragma: no cover - a core dependency
            raise MissingExtraError("onnxruntime", "onnx", "the onnxruntime backend") from e

    def runner(self, module, args, ctx):
        return OrtRunner(module, args, ctx)


@backend("torch")
class Torch(Backend):
    """PyTorch eager on the CPU."""

    def runner(self, module, args, ctx):
        return EagerRunner(module)


@backend("torch-compile")
class TorchCompile(Backend):
    """``torch.compile`` (inductor) on the CPU, compiled before timing (``CompiledRunner``)."""

    def runner(self, module, args, ctx):
        return CompiledRunner(module)


@backend("torch-cuda")
class TorchCuda(Backend):
    """PyTorch fp16 on the GPU; N:M-masked Linear weights as semi-structured sparse tensors
    where measured faster at the largest batch's shapes (``backend=TorchCuda("all" | "off")``
    changes that; see :mod:`fxprune.verify.semi_structured`)."""

    gpu = True

    def __init__(self, semi_structured: str = "measured", min_speedup: float | None = None):
        from fxprune.verify.semi_structured import check_options

        check_options(semi_structured, min_speedup)
        self.options = (semi_structured, min_speedup)

    def check(self) -> None:
        from fxprune.verify.gpu import require_cuda

        require_cuda(self.name)

    def runner(self, module, args, ctx):
        from fxprune.verify.gpu import TorchCudaRunner

        big = repeat_batch(args, ctx.max_batch)  # the decision is timed at the largest batch
        return TorchCudaRunner(module, ctx.masks, ctx.tag, big, *self.options)


@backend("tensorrt")
class TensorRT(Backend):
    """A TensorRT engine per model (sparse weights when the N:M pass ran)."""

    gpu = True

    def check(self) -> None:
        from fxprune.exporters.tensorrt import import_tensorrt
        from fxprune.verify.gpu import require_cuda

        import_tensorrt()
        require_cuda(self.name)

    def runner(self, module, args, ctx):
        from fxprune.verify.gpu import TensorRTRunner

        return TensorRTRunner(module, args, ctx.workdir, ctx.tag, bool(ctx.masks), ctx.max_batch)


@backend("onnxruntime-genai")
class OnnxRuntimeGenai(Backend):
    """Decode on ONNX Runtime GenAI's CPU provider: both Hugging Face causal LMs built into
    GenAI folders (KV cache; ``precision`` "fp32" or "int4"; tokenizer files from
    ``tokenizer_from``, else the folder the model was loaded from), time to the first token and
    decode tokens/s timed (``fxprune.verify.decode``)."""

    decode = True

    def __init__(self, precision: str = "fp32", tokenizer_from: str | Path | None = None):
        from fxprune.exporters.genai_build import check_precision

        check_precision(precision)
        self.precision, self.tokenizer_from = precision, tokenizer_from

    def check(self) -> None:
        from fxprune.exporters.genai_build import import_genai

        import_genai(f"the {self.name} backend")

    def runner(self, model, args, ctx):
        from fxprune.verify.decode import GenaiRunner

        return GenaiRunner(model, ctx, self.precision, self.tokenizer_from)


BACKENDS = tuple(REGISTRY)  # the built-in names (registered backends join REGISTRY)


def resolve(name) -> Backend:
    """The backend ``name`` names (a registered name) or is (an instance)."""
    return lookup(REGISTRY, Backend, name, "backend")


def _macs(module, args) -> int:
    from fxprune.graph import trace
    from fxprune.stats import layer_stats

    return sum(r["macs"] for r in layer_stats(trace(module, args).gm).values())


def _judge(rep: LatencyReport, monitor: CpuMonitor) -> None:
    """Flag noisy rows and the run: other processes' CPU use while timing (a row's own reading
    when it covers ``MIN_WINDOW_S``, else the whole run's, topped up by sampling right after
    the timing) and the spread of each row's rounds."""
    rep.cpus, rep.cpu_source = machine_cpus(), cpu_source()
    rep.topped_up_s = monitor.top_up(MIN_WINDOW_S)
    rep.other_cpu, rep.timed_s = monitor.total()
    for r in rep.rows:
        if r.timed_s < MIN_WINDOW_S:
            r.other_cpu = None  # a few ticks of /proc/stat: the run's reading stands for it
        cpu, window = (
            (r.other_cpu, r.timed_s) if r.other_cpu is not None else (rep.other_cpu, rep.timed_s)
        )
        r.noise = noise_reasons(cpu, r.round_spread, rep.spare_cores, window)
        r.noisy = bool(r.noise)
    rep.noise = noise_reasons(rep.other_cpu, None, rep.spare_cores, rep.timed_s)
    rep.noisy = bool(rep.noise) or any(r.noisy for r in rep.rows)


def latency(
    dense: torch.nn.Module,
    pruned,
    example_inputs,
    backend: str = "onnxruntime",
    batch_sizes: Sequence[int] = (1, 8),
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    workdir: str | Path | None = None,
    progress: bool = False,
    prompt_len: int | None = None,
    new_tokens: int | None = None,
) -> LatencyReport:
    """Time ``pruned`` against ``dense`` on ``backend``, interleaved, per batch size.

    Args:
        dense: the dense model (not modified).
        pruned: a :class:`fxprune.plan.CompileResult` (its MAC ratio is used) or a module.
        example_inputs: a tensor or tuple of tensors; their rows are repeated to each batch size.
        backend: ``"onnxruntime"`` (CPU execution provider; both models exported to ONNX),
            ``"torch"`` (eager), ``"torch-compile"``, ``"torch-cuda"`` (fp16 on the GPU; the
            pruned model's N:M-masked Linear weights become 2:4 semi-structured sparse tensors
            where each was measured faster at its shape)
            or ``"tensorrt"`` (an engine per model from its ONNX; the pruned one built with
            SPARSE_WEIGHTS when the N:M pass ran). GPU backends need CUDA (ConfigError if none).
            ``"onnxruntime-genai"`` times generation of Hugging Face causal LMs instead: time to
            the first token and decode tokens/s (``fxprune.verify.decode``).
        batch_sizes: batch sizes to measure.
        warmup: untimed calls (generations) per model and batch before timing.
        repeats: timed calls (generations) per model and batch (in rounds of alternating order).
        threads: intra-op threads for both models (default: all cores).
        workdir: where ONNX files go, ``dense.onnx`` and ``pruned.onnx`` (default: a temporary
            folder, removed after).
        progress: show a progress bar on stderr (needs ``tqdm``; silently off without it).
        prompt_len, new_tokens: decode backends: random prompt tokens per row (default 128)
            and greedy tokens generated after it (default 64, at least 2).

    Returns:
        A :class:`LatencyReport`; each row has ``speedup``, ``mac_ratio`` and ``efficiency``,
        and how much to trust them: ``speedup_p10`` / ``speedup_p90`` (per-round speedups),
        ``round_spread``, ``other_cpu`` (cores other processes used while it timed) and
        ``noisy`` with its reasons in ``noise``; the report has the run's ``other_cpu``,
        ``cpus`` and ``noisy``. Decode rows also have ``ttft_*_ms``, ``*_tokens_s`` and
        ``bytes_ratio`` (``fxprune.verify.latency_report``).

    Raises:
        ConfigError: an unknown backend or a bad count. MissingExtraError: the backend's
            package is missing.

    Example:
        >>> rep = fxprune.verify.latency(model, result, x, batch_sizes=(1, 8))
        >>> print(rep.table()); rep.rows[-1].efficiency
    """
    be = resolve(backend)
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ConfigError(f"batch_sizes={batch_sizes!r}: give positive integers")
    if repeats < 2 or warmup < 0:
        raise ConfigError(f"repeats={repeats}, warmup={warmup}: need repeats >= 2, warmup >= 0")
    decode = _decode_settings(be, prompt_len, new_tokens)
    be.check()
    args = as_args(example_inputs, dense)
    module = getattr(pruned, "module", pruned)
    summary = getattr(pruned, "summary", None)
    mac_ratio = (
        summary.macs_ratio
        if summary is not None
        else _macs(module, args) / max(_macs(dense, args), 1)
    )
    threads = threads or os.cpu_count() or 1
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rep = LatencyReport(
        be.name,
        threads,
        warmup,
        repeats,
        machine=f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if be.gpu else ""),
        **decode,
    )
    tmp = tempfile.TemporaryDirectory(prefix="fxprune-latency-") if workdir is None else None
    wd = Path(tmp.name if tmp else workdir)
    wd.mkdir(parents=True, exist_ok=True)
    try:
        with eval_mode(dense), eval_mode(module):
            monitor = CpuMonitor()
            total = len(batch_sizes) * 2 * (warmup + repeats)
            bar = progress_bar(progress, total, f"timing on {be.name}")
            if be.decode:
                from fxprune.verify.decode import decode_rows

                decode_rows(be, dense, pruned, rep, batch_sizes, wd, mac_ratio, monitor, bar)
            else:
                forward_rows(be, dense, pruned, args, rep, batch_sizes, wd, mac_ratio, monitor, bar)
            bar.close()
            _judge(rep, monitor)
    finally:
        torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()
    return rep


def _decode_settings(be: Backend, prompt_len, new_tokens) -> dict:
    """The report's decode fields for a decode backend (defaults 128 / 64); prompt_len or
    new_tokens given to a forward backend is a ConfigError."""
    if not be.decode:
        if prompt_len is not None or new_tokens is not None:
            raise ConfigError(
                f"prompt_len / new_tokens time generation: backend {be.name!r} times a forward "
                f"(decode backends: {[n for n, b in REGISTRY.items() if b.decode]})"
            )
        return {}
    prompt_len = 128 if prompt_len is None else prompt_len
    new_tokens = 64 if new_tokens is None else new_tokens
    for name, v, low in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 2)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"{name}={v!r}: give an integer >= {low}")
    return {"mode": "decode", "prompt_len": prompt_len, "new_tokens": new_tokens}
