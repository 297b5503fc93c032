"""Time one layer shape on a backend: how many milliseconds a Conv / Linear of given widths
takes there, cached in memory and (optionally) on disk.

A :class:`LayerShape` says what runs: the layer kind, its input shape, output width, kernel,
stride, padding, dilation and groups. :func:`layer_shape` reads one off a captured graph's node
(module, functional or ATen form, shapes from the nodes' ``meta["val"]``) and
:meth:`LayerShape.with_channels` gives the same layer at other widths (a depthwise conv keeps
``groups == in == out``). :func:`time_layer` runs it on a registered :class:`LayerTimer`
(``"torch"``: eager on the CPU; ``"onnxruntime"``: a one-node ONNX graph on ORT's CPU provider;
more with ``@layer_timer("name")``) and returns the milliseconds of its fastest call
(:func:`fastest_ms`: on a shared CPU other work only ever adds time).

Results are cached per timer instance in memory, and in a JSON file when ``cache=`` (or the
environment variable ``FXPRUNE_LAYER_CACHE``) names one, keyed by backend, threads, the
timer's library versions and the shape. The file belongs to one machine: copy it elsewhere and
its numbers describe the wrong CPU.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune._util import lookup, registrar
from fxprune.graph.trace import tensor_meta
from fxprune.graph.weighted import weighted_layer

CACHE_ENV = "FXPRUNE_LAYER_CACHE"
"""Environment variable naming a JSON file that keeps layer timings across runs."""

BUDGET_S = 0.05  # timed seconds per shape (at least MIN_CALLS calls, at most MAX_CALLS)
MIN_CALLS, MAX_CALLS, WARMUP = 5, 200, 2


@dataclass(frozen=True)
class LayerShape:
    """One Conv / Linear call: ``kind`` ``"conv"`` or ``"linear"``, ``input`` its input's
    shape (channels on dim 1 of a batched conv input, last for a Linear), ``out_channels``,
    and for convs ``kernel``, ``stride``, ``padding`` (ints or ``"same"`` / ``"valid"``),
    ``dilation`` and ``groups``."""

    kind: str
    input: tuple[int, ...]
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True

    @property
    def channel_dim(self) -> int:
        return (
            len(self.input) - 1 if self.kind == "linear" else len(self.input) - len(self.kernel) - 1
        )

    @property
    def in_channels(self) -> int:
        return self.input[self.channel_dim]

    @property
    def depthwise(self) -> bool:
        return (
            self.kind == "conv"
            and self.groups > 1
            and self.groups == self.in_channels == self.out_channels
        )

    def with_channels(self, out: int | None = None, inp: int | None = None) -> LayerShape | None:
        """The same layer with ``out`` output and ``inp`` input channels (None: unchanged); a
        depthwise conv stays depthwise (one width for all three). None when a grouped conv
        cannot take the widths."""
        if self.depthwise:
            c = out if out is not None else inp if inp is not None else self.out_channels
            return self._resized(c, c, c)
        out = self.out_channels if out is None else out
        inp = self.in_channels if inp is None else inp
        if out < 1 or inp < 1 or inp % self.groups or out % self.groups:
            return None
        return self._resized(out, inp, self.groups)

    def _resized(self, out: int, inp: int, groups: int) -> LayerShape:
        shape = list(self.input)
        shape[self.channel_dim] = inp
        return replace(self, input=tuple(shape), out_channels=out, groups=groups)

    def key(self) -> str:
        """A stable text key (the disk cache's)."""
        if self.kind == "linear":
            return f"linear in{list(self.input)} out{self.out_channels} b{int(self.bias)}"
        pad = self.padding if isinstance(self.padding, str) else list(self.padding)
        return (
            f"conv in{list(self.input)} out{self.out_channels} k{list(self.kernel)} "
            f"s{list(self.stride)} p{pad} "
            f"d{list(self.dilation)} g{self.groups} b{int(self.bias)}"
        )

    def module(self) -> nn.Module:
        """A freshly initialised layer of this shape."""
        if self.kind == "linear":
            return nn.Linear(self.in_channels, self.out_channels, bias=self.bias)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(self.kernel)]
        return conv(
            self.in_channels,
            self.out_channels,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
        )


def _tuple(v, k: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * k


def layer_shape(gm: fx.GraphModule, node: fx.Node) -> LayerShape | None:
    """The :class:`LayerShape` of a Conv / Linear node of a captured graph; None for anything
    else (transposed convs, layers whose weight or input shape is unknown)."""
    wl = weighted_layer(gm, node)
    if wl is None or wl.transposed:
        return None
    owner, _, attr = wl.param.rpartition(".")
    try:
        w = getattr(gm.get_submodule(owner) if owner else gm, attr)
    except AttributeError:
        return None
    x = tensor_meta(node.args[1 if wl.reduce_dim == 0 else 0]) if node.args else None
    if x is None or not isinstance(w, torch.Tensor):
        return None
    if wl.kind == "linear":
        out = w.shape[1] if wl.reduce_dim == 0 else w.shape[0]
        return LayerShape("linear", tuple(x.shape), int(out))
    k = w.ndim - 2
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        opts = (m.stride, m.padding, m.dilation, m.groups, m.bias is not None)
    else:
        a = list(node.args) + [None] * 7
        opts = (a[3] or 1, a[4] or 0, a[5] or 1, a[6] or 1, a[2] is not None)
    stride, padding, dilation, groups, bias = opts
    return LayerShape(
        "conv",
        tuple(x.shape),
        int(w.shape[0]),
        tuple(w.shape[2:]),
        _tuple(stride, k),
        padding if isinstance(padding, str) else _tuple(padding, k),
        _tuple(dilation, k),
        int(groups),
        bool(bias),
    )


class LayerTimer:
    """A backend that times one layer shape. Register a subclass with ``@layer_timer("name")``.

    ``check()`` raises a typed error when the backend cannot run here; ``versions()`` names
    what its numbers depend on (part of the disk cache key); ``measure(shape, threads)``
    returns the milliseconds of one call (the fastest of several)."""

    name: ClassVar[str] = ""

    def check(self) -> None:
        """Raise when this backend cannot run here."""

    def versions(self) -> str:
        return f"torch {torch.__version__}"

    def measure(self, shape: LayerShape, threads: int) -> float:
        raise NotImplementedError

    def layout_multiple(self) -> int:
        """Conv channel counts that are not a multiple of this leave the backend's fast
        whole-graph layout (layout changes around the layer, which one layer timed alone never
        shows); ``round_to="auto"`` prices only multiples of it for groups with convs. 1: none.
        """
        return 1


TIMERS: dict[str, LayerTimer] = {}
"""Layer timers by name (``"torch"``, ``"onnxruntime"`` and the registered ones)."""

layer_timer = registrar(__name__, "TIMERS", LayerTimer, "layer_timer")
"""``@layer_timer("name")``: register a :class:`LayerTimer` subclass under ``name``."""


def fastest_ms(call, *args) -> float:
    """Milliseconds of the fastest of about ``BUDGET_S`` seconds of timed ``call(*args)``
    after a few warm-up calls: other processes and the scheduler only ever add time, so the
    fastest call is the best estimate of the layer's own cost on a shared CPU."""
    for _ in range(WARMUP):
        call(*args)
    t0 = time.perf_counter()
    call(*args)
    first = time.perf_counter() - t0
    n = max(MIN_CALLS, min(MAX_CALLS, int(BUDGET_S / max(first, 1e-6))))
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call(*args)
        out.append((time.perf_counter() - t0) * 1e3)
    return min(out)


@layer_timer("torch")
class TorchTimer(LayerTimer):
    """PyTorch eager on the CPU, under inference mode, with ``threads`` intra-op threads."""

    def measure(self, shape: LayerShape, threads: int) -> float:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            m = shape.module().eval()
            x = torch.randn(shape.input)
            with torch.inference_mode():
                return fastest_ms(m, x)
        finally:
            torch.set_num_threads(old)


_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # timer -> {key: ms}


def resolve_timer(name) -> LayerTimer:
    """The layer timer ``name`` names (a registered name) or is (an instance)."""
    return lookup(TIMERS, LayerTimer, name, "round_backend")


def time_layer(
    shape: LayerShape,
    backend: str | LayerTimer = "torch",
    threads: int | None = None,
    cache: str | Path | None = None,
) -> float:
    """Milliseconds of one call of ``shape`` on ``backend`` (the fastest of several) with
    ``threads`` intra-op threads (default: ``torch.get_num_threads()``); measured once per
    timer, shape and thread count, then read from the memory cache (and from ``cache`` /
    ``$FXPRUNE_LAYER_CACHE``, a JSON file, when given).

    Raises:
        ConfigError: an unknown backend. MissingExtraError: its package is missing.
    """
    timer = resolve_timer(backend)
    threads = threads or torch.get_num_threads()
    key = f"{timer.name} | {threads} threads | {timer.versions()} | {shape.key()}"
    memo = _MEMO.setdefault(timer, {})
    if key in memo:
        return memo[key]
    path = cache or os.environ.get(CACHE_ENV)
    disk = _read(Path(path)) if path else {}
    if key in disk:
        memo[key] = float(disk[key])
        return memo[key]
    timer.check()
    memo[key] = ms = float(timer.measure(shape, threads))
    if path:
        disk[key] = ms
        _write(Path(path), disk)
    return ms


def clear_cache() -> None:
    """Forget every in-memory timing (the disk file stays)."""
    _MEMO.clear()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    """Best effort: a cache that cannot be written costs a re-measurement, not the run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass


from fxprune.layer_timing_ort import OrtTimer, nchwc_multiple, onnx_layer  # noqa: E402

__all__ = [
    "CACHE_ENV",
    "LayerShape",
    "LayerTimer",
    "OrtTimer",
    "TIMERS",
    "TorchTimer",
    "clear_cache",
    "fastest_ms",
    "layer_shape",
    "layer_timer",
    "nchwc_multiple",
    "onnx_layer",
    "resolve_timer",
    "time_layer",
]
