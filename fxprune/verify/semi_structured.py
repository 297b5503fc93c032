"""2:4 semi-structured sparse weights on CUDA, swapped in only where they were measured faster.

PyTorch's ``to_sparse_semi_structured`` runs a 2:4-masked Linear weight on sparse tensor cores
(cuSPARSELt or CUTLASS). It is not free: in eager fp16 on an H100 it ran BERT-base's GEMMs at
0.04-0.06x of dense, and 1.1-1.5x only on large GEMMs. So no weight is swapped on faith:

1. :func:`linear_inputs` runs one forward of the real inputs and records the input shape of
   each masked weight's ``F.linear`` call (eager ``nn.Linear``, fxprune's graph modules and the
   graphs dynamo hands ``fxprune.backend`` all call it);
2. :func:`plan_semi_structured` times that Linear at that shape dense (layer timer
   ``"torch-cuda"``) and as a 2:4 sparse tensor (``"torch-cuda-2:4"``), through
   :func:`fxprune.layer_timing.time_layer` (cached per GPU, dtype and shape), and marks the
   weight for the swap only when sparse is at least ``min_speedup`` times faster;
3. :func:`swap_semi_structured` converts the marked weights. A shape or dtype the kernels
   refuse (cuSPARSELt takes fp16 / bf16 / int8 with sides on its tile, so fp32 models and
   ResNet-50's 1000-wide classifier stay dense) fails the sparse timing or the conversion; the
   plan records why and the weight stays dense.

The timings are of each Linear alone in eager mode, synchronised after every call: the kernel
choice, not what a compiler may fuse around it.

The :class:`SwapPlan` says per weight what was measured and why it was or was not swapped;
weights that cannot be semi-structured at all (convolutions, ``[in, out]`` Conv1D weights, a
mask that is not 2:4 along the input dim, a weight no ``F.linear`` read) are listed with the
reason. Timing needs a CUDA device (ConfigError otherwise); deciding from given timings and
every refusal are tested on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fxprune._util import Report
from fxprune.errors import ConfigError
from fxprune.layer_timing import LayerShape, LayerTimer, fastest_ms, layer_timer, time_layer
from fxprune.verify.gpu import require_cuda, semi_structured_plan

MODES = ("measured", "all", "off")
MIN_SPEEDUP = 1.05  # sparse must beat dense by 5 %: a tie is not worth a second kernel path
_LINEAR = {F.linear, torch._C._nn.linear}


def check_options(mode: str, min_speedup: float | None) -> tuple[str, float]:
    """``(mode, min_speedup)`` checked, the default margin filled in: a mode of :data:`MODES`,
    a positive ``min_speedup``, given only with ``"measured"`` (the others time nothing)."""
    if mode not in MODES:
        raise ConfigError(f"semi_structured={mode!r}: choose one of {MODES}")
    if min_speedup is not None and mode != "measured":
        raise ConfigError(
            f"min_speedup={min_speedup!r} applies to semi_structured='measured' only; "
            f"semi_structured={mode!r} times nothing"
        )
    if min_speedup is not None and not min_speedup > 0:
        raise ConfigError(f"min_speedup={min_speedup!r}: give a positive ratio")
    return mode, MIN_SPEEDUP if min_speedup is None else float(min_speedup)


class _CudaTimer(LayerTimer):
    """One fp16 layer on the GPU, synchronised after every call."""

    dtype = torch.float16

    def check(self) -> None:
        require_cuda(self.name)

    def versions(self) -> str:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda"
        return f"torch {torch.__version__} | {gpu} | {self.dtype}"

    def layer(self, shape: LayerShape) -> nn.Module:
        return shape.module().to("cuda", self.dtype).eval()

    def measure(self, shape: LayerShape, threads: int) -> float:
        m = self.layer(shape)
        x = torch.randn(shape.input, device="cuda", dtype=self.dtype)

        def call():
            m(x)
            torch.cuda.synchronize()

        with torch.inference_mode():
            return fastest_ms(call)


@layer_timer("torch-cuda")
class CudaLinearTimer(_CudaTimer):
    """A dense fp16 Conv / Linear on the GPU (also ``round_backend="torch-cuda"``)."""


class CudaSparseTimer(_CudaTimer):
    """The same Linear with a 2:4 mask, its weight a semi-structured sparse tensor (not a
    ``round_backend``: it times Linears only, so it is not registered)."""

    name = "torch-cuda-2:4"

    def layer(self, shape: LayerShape) -> nn.Module:
        from torch.sparse import to_sparse_semi_structured

        if shape.kind != "linear":
            raise ConfigError(f"layer timer {self.name!r} times Linear layers only, not {shape}")
        m = super().layer(shape)
        keep = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device="cuda")
        w = m.weight.detach() * keep.repeat(m.weight.shape[1] // 4)
        m.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        return m


class _LinearShapes(TorchFunctionMode):
    """Records the input shape of every ``F.linear`` call whose weight is one of ``weights``."""

    def __init__(self, weights: dict[int, str]):
        super().__init__()
        self.weights, self.seen = weights, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR and len(args) > 1:
            name = self.weights.get(id(args[1]))
            if name is not None and name not in self.seen:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                self.seen[name] = (tuple(args[0].shape), bias is not None)
        return func(*args, **kwargs)


def linear_inputs(module: nn.Module, args: tuple, names) -> dict[str, tuple[tuple, bool]]:
    """``{weight name: (input shape, has bias)}`` of each named weight's first ``F.linear``
    call in one forward of ``module(*args)``; weights no ``F.linear`` reads are absent."""
    weights = {id(module.get_parameter(n)): n for n in names}
    mode = _LinearShapes(weights)
    with torch.inference_mode(), mode:
        module(*args)
    return mode.seen


@dataclass
class SwapRow:
    """One eligible weight: its Linear's shape, the two timings and the decision."""

    name: str
    input: list[int]
    out_features: int
    dense_ms: float | None = None
    sparse_ms: float | None = None
    swap: bool = False
    reason: str = ""

    @property
    def speedup(self) -> float | None:
        if not self.dense_ms or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class SwapPlan(Report):
    """Per weight, whether it becomes a semi-structured sparse tensor and why (``rows``: the
    eligible ones with their timings; ``skipped``: weight -> why it cannot be one)."""

    mode: str
    min_speedup: float
    rows: list[SwapRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def swapped(self) -> list[str]:
        return [r.name for r in self.rows if r.swap]

    def note(self, tag: str) -> str:
        """One line for a latency report's notes."""
        slow = [r for r in self.rows if not r.swap]
        line = f"{tag}: {len(self.swapped)} of {len(self.rows) + len(self.skipped)} N:M weights "
        line += "as 2:4 semi-structured sparse tensors"
        if self.mode == "measured":
            line += f" (those measured >= {self.min_speedup:g}x faster than dense)"
        if slow:
            line += "; dense: " + "; ".join(f"{r.name} ({r.reason})" for r in slow[:3])
        if self.skipped:
            line += "; ineligible: " + "; ".join(
                f"{k} ({v})" for k, v in list(self.skipped.items())[:3]
            )
        return line

    def table(self) -> str:
        lines = [
            f"semi-structured swap ({self.mode}, min speedup {self.min_speedup:g}x)",
            "",
            "| weight | input | out | dense ms | 2:4 ms | speedup | swapped | why |",
            "|---|---|---:|---:|---:|---:|---|---|",
        ]
        for r in self.rows:
            d = f"{r.dense_ms:.4f}" if r.dense_ms is not None else "-"
            s = f"{r.sparse_ms:.4f}" if r.sparse_ms is not None else "-"
            x = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
            yes = "yes" if r.swap else "no"
            lines.append(
                f"| {r.name} | {r.input} | {r.out_features} | {d} | {s} | {x} | {yes} | {r.reason} |"
            )
        lines += [f"| {k} | | | | | | no | {v} |" for k, v in self.skipped.items()]
        return "\n".join(lines)


_BY_DTYPE: dict[torch.dtype, tuple[LayerTimer, LayerTimer]] = {}


def cuda_timers(dtype: torch.dtype) -> tuple[LayerTimer, LayerTimer]:
    """The (dense, 2:4 sparse) CUDA layer timers in ``dtype`` (one pair per dtype, so their
    in-memory cache lives as long as the process)."""
    if dtype not in _BY_DTYPE:
        pair = (CudaLinearTimer(), CudaSparseTimer())
        for t in pair:
            t.dtype = dtype
        _BY_DTYPE[dtype] = pair
    return _BY_DTYPE[dtype]


def plan_semi_structured(
    module: nn.Module,
    masks: dict[str, torch.Tensor],
    args: tuple,
    mode: str = "measured",
    min_speedup: float | None = None,
    dense=None,
    sparse=None,
    cache=None,
) -> SwapPlan:
    """Which of ``module``'s N:M-masked weights to make semi-structured sparse tensors.

    Args:
        module: the pruned model, on the device and in the dtype it will run in.
        masks: its N:M masks (``CompileResult.nm_masks``).
        args: inputs of the size that will run (their Linear shapes are what is timed).
        mode: ``"measured"`` (swap a weight only when its Linear ran at least ``min_speedup``
            times faster sparse than dense), ``"all"`` (every eligible weight, unmeasured) or
            ``"off"`` (none).
        dense, sparse: the layer timers (names or :class:`fxprune.layer_timing.LayerTimer`;
            default: :func:`cuda_timers` in each weight's dtype).
        cache: a JSON file keeping the timings (see :func:`fxprune.layer_timing.time_layer`).

    Raises:
        ConfigError: an unknown mode, ``min_speedup`` not positive or given without
            ``"measured"``, or (when measuring) no CUDA device.
    """
    mode, min_speedup = check_options(mode, min_speedup)
    plan = SwapPlan(mode, min_speedup)
    if mode == "off" or not masks:
        plan.skipped = {k: "semi_structured='off'" for k in masks} if mode == "off" else {}
        return plan
    names, plan.skipped = semi_structured_plan(module, masks)
    seen = linear_inputs(module, args, names) if names else {}
    for name in names:
        if name not in seen:
            plan.skipped[name] = "no F.linear call reads it (a matmul?): its shape is unknown"
            continue
        shape, bias = seen[name]
        w = module.get_parameter(name)
        row = SwapRow(name, list(shape), int(w.shape[0]))
        plan.rows.append(row)
        if mode == "all":
            row.swap, row.reason = True, "semi_structured='all' (not measured)"
            continue
        ls = LayerShape("linear", tuple(shape), int(w.shape[0]), bias=bias)
        on_gpu = cuda_timers(w.dtype)
        row.dense_ms = time_layer(ls, dense or on_gpu[0], cache=cache)
        try:
            row.sparse_ms = time_layer(ls, sparse or on_gpu[1], cache=cache)
        except ConfigError:
            raise  # no GPU, a bad option: the user's to fix
        except Exception as e:  # noqa: BLE001 - the kernels' shape / dtype limits
            row.reason = f"the 2:4 kernels refused it ({w.dtype}): {_first_line(e)}"
            continue
        row.swap = row.speedup is not None and row.speedup >= min_speedup
        row.reason = f"measured {row.speedup:.2f}x" if row.speedup is not None else "no timing"
    return plan


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, _, attr = name.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), attr


def swap_semi_structured(module: nn.Module, plan: SwapPlan) -> list[str]:
    """Turn the weights ``plan`` marks into semi-structured sparse parameters, in place; a
    weight the kernels refuse (shape, dtype, device) stays dense, its row says why. Returns the
    names swapped."""
    from torch.sparse import to_sparse_semi_structured

    done = []
    for row in plan.rows:
        if not row.swap:
            continue
        owner, attr = _owner(module, row.name)
        try:
            sparse = to_sparse_semi_structured(getattr(owner, attr).detach())
        except Exception as e:  # noqa: BLE001 - the kernels' shape / dtype / device limits
            row.swap, row.reason = False, f"conversion refused: {_first_line(e)}"
            continue
        owner._parameters[attr] = nn.Parameter(sparse, requires_grad=False)
        done.append(row.name)
    if plan.mode == "all" and (plan.rows or plan.skipped) and not done:
        raise ConfigError(
            "semi_structured='all': no N:M weight could become a semi-structured sparse "
            f"tensor: {plan.note('')[2:]}"
        )
    return done


def restore_dense(module: nn.Module, originals: dict[str, nn.Parameter]) -> None:
    """Put the dense parameters ``originals`` (name -> parameter, taken before the swap) back."""
    for name, p in originals.items():
        owner, attr = _owner(module, name)
        owner._parameters[attr] = p
