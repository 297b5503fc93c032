"""What runs during the latency verifier's timing: its CPU runners (a model prepared once, run
per call), the :class:`RunContext` every backend's runner is built with, and the
:class:`CpuMonitor` that measures what other processes did with the CPU meanwhile. The GPU
runners are in ``fxprune.verify.gpu``, the backends that choose them in
``fxprune.verify.latency``.

Other processes' CPU use over a window is the machine's busy time (``/proc/stat``: user, nice,
system, irq, softirq and steal, over all CPUs) minus this process's own (``/proc/self/stat``
utime + stime: every thread of the process, ONNX Runtime's and PyTorch's intra-op threads
included), divided by the window's wall time: in cores, 1.0 = one other core kept busy. Steal
counts as other use: a hypervisor giving the CPU to another guest slows the timing as much as
a local process does. Without ``/proc`` (not Linux) psutil is used when installed, else the
reading is None.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class RunContext:
    """What a backend's runner may need besides the model and its example."""

    threads: int
    workdir: Path  # scratch files (ONNX, engines), removed afterwards
    tag: str  # "dense" or "pruned": a file name stem
    masks: dict  # the pruned model's N:M masks ({} for the dense one)
    max_batch: int  # the largest batch that will be timed


class EagerRunner:
    """PyTorch in-process: ``fn(*args)`` under inference mode."""

    notes: tuple[str, ...] = ()

    def __init__(self, fn):
        self.fn = fn

    def prepare(self, args: tuple):
        return args

    def run(self, prepared):
        with torch.inference_mode():
            return self.fn(*prepared)


class CompiledRunner(EagerRunner):
    """``torch.compile(module, **options)``, compiled in ``prepare`` (outside the timed region)
    with inductor's ``compile_threads=1``: by default inductor starts a pool of compile-worker
    processes whose start-up kept a core busy for seconds after the compile, and timings taken
    meanwhile ran up to 3x slow (measured: ResNet-50 at 112 px, 59 ms pruned right after the
    compile, 10 ms five seconds later)."""

    def __init__(self, module, **options):
        super().__init__(torch.compile(module, **options))

    def prepare(self, args: tuple):
        import torch._inductor.config as inductor

        with inductor.patch(compile_threads=1):
            self.run(args)  # compiles for these shapes (a new batch size may recompile)
        return args


class OrtRunner:
    """A model exported to ONNX, run on ONNX Runtime's CPU execution provider."""

    notes: tuple[str, ...] = ()

    def __init__(self, module, args, ctx: RunContext):
        import onnxruntime as ort

        from fxprune.exporters.onnx import DEFAULT_OPSET, write_onnx

        path = ctx.workdir / f"{ctx.tag}.onnx"
        write_onnx(module, args, path, DEFAULT_OPSET, dynamic_batch=True)
        so = ort.SessionOptions()
        so.intra_op_num_threads = ctx.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]

    def prepare(self, args: tuple):
        tensors = [a for a in args if a is not None]  # ONNX drops None positionals
        return {n: a.numpy() for n, a in zip(self.names, tensors, strict=False)}

    def run(self, prepared):
        return self.sess.run(None, prepared)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds at one instant: the whole machine's busy time and this process's."""

    wall: float
    busy: float
    own: float


def _proc_sample() -> CpuSample | None:
    try:
        with open("/proc/stat") as f:
            cpu = f.readline().split()
        with open("/proc/self/stat") as f:
            own = f.read().rpartition(")")[2].split()  # the name in parentheses may hold spaces
    except OSError:
        return None
    if not cpu or cpu[0] != "cpu" or len(own) < 13:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    v = [int(x) for x in cpu[1:9]] + [0] * 8
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    return CpuSample(time.monotonic(), busy / tick, (int(own[11]) + int(own[12])) / tick)


def _psutil_sample() -> CpuSample | None:
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    busy = sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))
    own = psutil.Process().cpu_times()
    return CpuSample(time.monotonic(), busy, own.user + own.system)


def cpu_sample() -> CpuSample | None:
    """The machine's and this process's CPU seconds now; None where neither ``/proc`` nor
    psutil can tell."""
    return _proc_sample() or _psutil_sample()


def machine_cpus() -> int | None:
    """CPUs the busy time of :func:`cpu_sample` is summed over (``/proc/stat``'s cpuN lines,
    which a container may show for the whole host), else ``os.cpu_count()``."""
    try:
        with open("/proc/stat") as f:
            n = sum(1 for line in f if line.startswith("cpu") and line[3:4].isdigit())
        return n or os.cpu_count()
    except OSError:
        return os.cpu_count()


def cpu_source() -> str:
    """Where :func:`cpu_sample` reads: ``"/proc"``, ``"psutil"`` or ``"unavailable"``."""
    if _proc_sample() is not None:
        return "/proc"
    return "psutil" if _psutil_sample() is not None else "unavailable"


def other_cores(a: CpuSample | None, b: CpuSample | None) -> float | None:
    """Cores other processes kept busy between samples ``a`` and ``b`` (>= 0), or None."""
    if a is None or b is None or b.wall <= a.wall:
        return None
    return max(0.0, ((b.busy - a.busy) - (b.own - a.own)) / (b.wall - a.wall))


_BUSY: list[torch.Tensor] = []


def busy_work() -> None:
    """About a millisecond of a matrix product on PyTorch's intra-op threads: the demand a
    timed model puts on the CPU, for :meth:`CpuMonitor.top_up`."""
    if not _BUSY:
        _BUSY.append(torch.randn(128, 128))
    a = _BUSY[0]
    with torch.inference_mode():
        for _ in range(4):
            torch.mm(a, a)


class CpuMonitor:
    """Other processes' CPU use over the timed windows: ``start()`` / ``stop()`` around each
    (``stop`` returns that window's cores and seconds); ``total()`` over all of them."""

    def __init__(self):
        self._start: CpuSample | None = None
        self._t0 = 0.0
        self._other = 0.0  # core-seconds of other processes, summed over windows
        self._wall = 0.0
        self._measured = True

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = cpu_sample()

    def stop(self) -> tuple[float | None, float]:
        cores = other_cores(self._start, cpu_sample())
        wall = time.monotonic() - self._t0
        self._wall += wall
        if cores is None:
            self._measured = False
        else:
            self._other += cores * wall
        return cores, wall

    def top_up(self, min_s: float, work=None) -> float:
        """Keep reading until the windows cover ``min_s`` seconds, running ``work()`` (default
        :func:`busy_work`) meanwhile: a run too short to read on its own is judged by the load
        right after it, under the same demand for CPU (an idle reading would see other
        processes spread onto the cores the timing used). The seconds added."""
        gap = min_s - self._wall
        if gap <= 0 or not self._measured:
            return 0.0
        work = work or busy_work
        self.start()
        end = time.monotonic() + gap
        while time.monotonic() < end:
            work()
        return self.stop()[1]

    def total(self) -> tuple[float | None, float]:
        """(other cores averaged over every window, seconds timed)."""
        if not self._measured or not self._wall:
            return None, self._wall
        return self._other / self._wall, self._wall
