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

This module holds the measurement and the backend registry (``@backend``, the built-ins); the
report's rows are in ``fxprune.verify.latency_report``, the CPU runners and :class:`RunContext`
in ``fxprune.verify.latency_runners``, the GPU runners in ``fxprune.verify.gpu``.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxprune._util import eval_mode, lookup, progress_bar, registrar
from fxprune.errors import ConfigError, MissingExtraError
from fxprune.graph.trace import as_args

# re-exported: fxprune.verify and callers import these from here
from fxprune.verify.latency_report import (
    MIN_WINDOW_S,
    LatencyReport,
    LatencyRow,
    noise_reasons,
    verdict,
)
from fxprune.verify.latency_runners import (
    CompiledRunner,
    CpuMonitor,
    EagerRunner,
    OrtRunner,
    RunContext,
    cpu_source,
    machine_cpus,
)


def _batch(args: tuple, b: int) -> tuple:
    """The example inputs with batch size ``b`` (rows repeated, or cut)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.ndim:
            reps = -(-b // a.shape[0])
            out.append(a.repeat(reps, *([1] * (a.ndim - 1)))[:b].contiguous())
        else:
            out.append(a)
    return tuple(out)


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


class Backend:
    """A latency backend: how a model is prepared once and run per call.

    Register a subclass with ``@backend("name")`` and ``fxprune.verify.latency(...,
    backend="name")`` (and ``fxprune verify --backend name``) times on it.

    ``check()`` runs before anything is prepared: a missing package or device raises a typed
    error (``MissingExtraError``, ``ConfigError``) naming the backend. ``runner(module, args,
    ctx)`` returns an object with ``prepare(args)`` (one batch made ready, outside the timed
    region), ``run(prepared)`` (one forward; its outputs are compared with PyTorch eager for
    the parity column) and ``notes`` (what the backend did: sparse layers, ...). ``gpu``: the
    report names the GPU.
    """

    name: ClassVar[str] = ""
    gpu: ClassVar[bool] = False

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

        big = _batch(args, ctx.max_batch)  # the decision is timed at the largest batch
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


BACKENDS = tuple(REGISTRY)  # the built-in names (registered backends join REGISTRY)


def resolve(name) -> Backend:
    """The backend ``name`` names (a registered name) or is (an instance)."""
    return lookup(REGISTRY, Backend, name, "backend")


def _macs(module, args) -> int:
    from fxprune.graph import trace
    from fxprune.stats import layer_stats

    return sum(r["macs"] for r in layer_stats(trace(module, args).gm).values())


def _time(call: Callable[[object], object], prepared, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call(prepared)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _rounds(runners: dict, ready: dict, repeats: int, bar) -> dict[str, list[list[float]]]:
    """``repeats`` timed calls per model in about ten rounds of alternating order (dense first,
    then pruned first, ...): the samples of each round, per model."""
    per_round = max(1, repeats // 10)
    out: dict[str, list[list[float]]] = {"dense": [], "pruned": []}
    for k in range(-(-repeats // per_round)):
        order = ("dense", "pruned") if k % 2 == 0 else ("pruned", "dense")
        for name in order:
            out[name].append(_time(runners[name].run, ready[name], per_round))
            bar.update(per_round)
    return out


def _spread(values: list[float]) -> float:
    """(p90 - p10) / median of ``values`` (0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    lo, hi = np.percentile(values, [10, 90])
    med = statistics.median(values)
    return float(hi - lo) / med if med else 0.0


def _row(b: int, rounds: dict, mac_ratio: float, parity: float, other, secs: float) -> LatencyRow:
    """One batch size's row from its per-round samples (noise is judged later, by _judge)."""
    flat = {k: [x for r in v for x in r] for k, v in rounds.items()}
    d, p = _stats(flat["dense"]), _stats(flat["pruned"])
    speedup = d[0] / p[0] if p[0] else float("inf")
    eff = speedup * mac_ratio
    med = {k: [statistics.median(r) for r in v] for k, v in rounds.items()}
    per_round = [a / z for a, z in zip(med["dense"], med["pruned"], strict=True) if z]
    lo, hi = np.percentile(per_round, [10, 90]) if per_round else (speedup, speedup)
    row = LatencyRow(b, *d, *p, speedup, mac_ratio, eff, parity, verdict(speedup, eff))
    row.speedup_p10, row.speedup_p90 = float(lo), float(hi)
    row.round_spread = max(_spread(med["dense"]), _spread(med["pruned"]))
    row.other_cpu, row.timed_s = other, secs
    return row


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


def _stats(samples: list[float]) -> tuple[float, float, float]:
    q = np.percentile(samples, [10, 90])
    return statistics.median(samples), float(q[0]), float(q[1])


def _numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t)


def _parity(runner, prepared, module, args) -> float:
    """Max relative error of the backend's output against PyTorch eager fp32 on the CPU."""
    got = runner.run(prepared)
    got = [_numpy(t) for t in (got if isinstance(got, list) else _tensors(got))]
    with torch.no_grad(), eval_mode(module):
        ref = [t.detach().double().numpy() for t in _tensors(module(*args))]
    err = 0.0
    for r, g in zip(ref, got, strict=False):
        scale = float(np.abs(r).max()) if r.size else 0.0
        diff = float(np.abs(r - g.astype(np.float64)).max()) if r.size else 0.0
        err = max(err, diff / scale if scale else diff)
    return err


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
        batch_sizes: batch sizes to measure.
        warmup: untimed calls per model and batch before timing.
        repeats: timed calls per model and batch (in rounds of alternating order).
        threads: intra-op threads for both models (default: all cores).
        workdir: where ONNX files go (default: a temporary folder, removed after).
        progress: show a progress bar on stderr (needs ``tqdm``; silently off without it).

    Returns:
        A :class:`LatencyReport`; each row has ``speedup``, ``mac_ratio`` and ``efficiency``,
        and how much to trust them: ``speedup_p10`` / ``speedup_p90`` (per-round speedups),
        ``round_spread``, ``other_cpu`` (cores other processes used while it timed) and
        ``noisy`` with its reasons in ``noise``; the report has the run's ``other_cpu``,
        ``cpus`` and ``noisy``.

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
    )
    masks = getattr(pruned, "nm_masks", None) or {}
    tmp = tempfile.TemporaryDirectory(prefix="fxprune-latency-") if workdir is None else None
    wd = Path(tmp.name if tmp else workdir)
    wd.mkdir(parents=True, exist_ok=True)
    try:
        with eval_mode(dense), eval_mode(module):
            top = max(batch_sizes)
            runners = {
                "dense": be.runner(dense, args, RunContext(threads, wd, "dense", {}, top)),
                "pruned": be.runner(module, args, RunContext(threads, wd, "pruned", masks, top)),
            }
            for r in runners.values():
                rep.notes += r.notes
            bar = progress_bar(
                progress, len(batch_sizes) * 2 * (warmup + repeats), f"timing on {be.name}"
            )
            monitor = CpuMonitor()
            for b in batch_sizes:
                xb = _batch(args, b)
                ready = {name: r.prepare(xb) for name, r in runners.items()}
                for name, r in runners.items():
                    for _ in range(warmup):
                        r.run(ready[name])
                        bar.update()
                monitor.start()
                rounds = _rounds(runners, ready, repeats, bar)
                other, secs = monitor.stop()
                parity = _parity(runners["pruned"], ready["pruned"], module, xb)
                rep.rows.append(_row(b, rounds, mac_ratio, parity, other, secs))
            bar.close()
            _judge(rep, monitor)
    finally:
        torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()
    return rep
