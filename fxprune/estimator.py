"""Price unstructured, 2:4 and structured pruning before doing any of it: parameters, bytes in
fp32 / fp16 / int8 (with the index overhead of each storage format), FLOPs, and the speedup a
piece of hardware will really give, each figure with its formula and the user's numbers.

The cost model (docs/estimator.md) is a roofline per layer, read off the traced graph:

    t(layer) = max(FLOPs / peak, bytes / bandwidth)        bytes = weights + inputs + outputs

summed over every conv / linear / matmul and every other op that moves memory (element-wise,
norms, pooling; views cost nothing). Speedups are ratios of these sums, so the absolute kernel
efficiency (real kernels reach 50-80 % of the roof) cancels; what does not cancel is stated:

- unstructured sparsity s: dense kernels run over the zeros, so the GPU time is unchanged below
  ``hw.unstructured_threshold`` (~95 %); above it a sparse kernel on CUDA cores (fp32 peak, CSR
  bytes) is assumed. CPUs: stock runtimes (ONNX Runtime, PyTorch) use dense kernels: 1.0x.
- 2:4: Amdahl's law over the share ``f`` of dense time spent in eligible GEMMs, which run
  ``k_eff`` times faster (``hw.sparse_factor`` on the math, compressed weights on the bytes;
  GEMMs with fewer than ``hw.sparse_min_rows`` rows gain nothing):
  ``S = 1 / ((1 - f) + f / k_eff)``.
- structured: the pruned model is a smaller dense model; it is actually built (``fxprune.compile``
  on a copy) and costed with the same roofline, so its numbers are exact counts, not guesses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

from fxprune.errors import ConfigError, FxPruneError
from fxprune.graph.trace import as_args, tensor_meta
from fxprune.graph.weighted import weighted_layer
from fxprune.stats import node_macs

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
INDEX_BYTES = 4  # int32 column indices and row pointers in CSR
NM_META_BITS = 2  # a 2-bit position index per kept value of a 2:4 group


@dataclass(frozen=True)
class Hardware:
    """A hardware profile: dense peak math per dtype (TFLOP/s), memory bandwidth (GB/s), and
    what sparsity it can exploit. Figures are dense (no-sparsity) datasheet numbers."""

    name: str
    kind: str  # "gpu" or "cpu"
    tflops: Mapping[str, float]  # dense peak per dtype (tensor cores on GPUs)
    cuda_tflops: float  # fp32 peak without tensor cores (where unstructured kernels run)
    bandwidth_gbs: float
    sparse_24: bool  # has 2:4 sparse math
    sparse_factor: float  # speedup of a compute-bound 2:4 GEMM's math
    sparse_min_rows: int  # GEMMs with fewer rows (tokens / pixels x batch) gain nothing
    unstructured_threshold: float | None  # sparsity above which sparse kernels may pay (GPU)
    source: str

    def ridge(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) where memory-bound turns compute-bound."""
        return self.tflops[dtype] * 1e12 / (self.bandwidth_gbs * 1e9)


HARDWARE: dict[str, Hardware] = {
    "A100": Hardware(
        "A100",
        "gpu",
        {"fp32": 156.0, "fp16": 312.0, "int8": 624.0},  # fp32 = TF32 tensor cores
        19.5,
        2039.0,
        True,
        1.6,
        4096,
        0.95,
        "NVIDIA A100 SXM4 80GB datasheet (dense figures; the sparse ones are 2x); 2:4 factor 1.6 "
        "from the seed calculator (~1.5-1.7x); min rows 4096 as measured on the H100 (no A100 "
        "measurement yet)",
    ),
    "H100": Hardware(
        "H100",
        "gpu",
        {"fp32": 495.0, "fp16": 989.0, "int8": 1979.0},
        67.0,
        3350.0,
        True,
        1.5,
        4096,
        0.95,
        "NVIDIA H100 SXM5 datasheet (dense; the seed guide's 2000 TFLOPS fp16 is the sparse "
        "figure); 2:4 factor 1.5 and min rows 4096 measured by fxprune (docs/benchmarks-gpu.md: "
        "cuSPARSELt 1.51x on 8192^3, 1.12-1.32x on BERT-size GEMMs at M>=4096, slower below)",
    ),
    "L4": Hardware(
        "L4",
        "gpu",
        {"fp32": 60.0, "fp16": 121.0, "int8": 242.0},
        30.3,
        300.0,
        True,
        1.6,
        4096,
        0.95,
        "NVIDIA L4 datasheet (dense; the sparse figures are 2x); 2:4 factor 1.6 from the seed "
        "calculator; min rows 4096 as measured on the H100 (no L4 measurement yet)",
    ),
    "cpu": Hardware(
        "cpu",
        "cpu",
        {"fp32": 0.77, "fp16": 0.77, "int8": 1.54},
        0.77,
        50.0,
        False,
        1.0,
        0,
        None,
        "generic 8-core AVX2/FMA CPU at 3 GHz (8 x 32 FLOP/cycle; fp16 computed in fp32; int8 "
        "with VNNI 2x) and dual-channel DDR4-3200 (~50 GB/s); stock runtimes have no 2:4 or "
        "unstructured sparse kernels",
    ),
}


@dataclass
class LayerCost:
    """One op of the traced graph at the example batch: FLOPs, weight size and activations."""

    name: str
    op: str  # conv, linear, matmul or other
    flops: float  # 2 x MACs for products, one per output element for other ops
    weight: int  # weight elements (0 for activation x activation products and other ops)
    rows: int  # GEMM M: output elements / output features (pixels or tokens x batch)
    out_features: int  # weight rows (CSR row pointers)
    act: int  # input + output activation elements
    nm_reason: str | None  # None when the weight can carry 2:4


@dataclass
class RooflineRow:
    layer: str
    op: str
    flops: float
    bytes: float
    intensity: float
    bound: str  # "memory" or "compute"
    ms: float


@dataclass
class Scenario:
    """One way of pruning, priced: counts, bytes per dtype and format, FLOPs, speedups."""

    name: str
    params: int
    bytes: dict[str, dict[str, float]]  # format -> dtype -> bytes
    flops: float  # FLOPs actually executed per example batch
    nominal_flops: float  # FLOPs on non-zero weights
    speedup: dict[str, dict[int, float]] = field(default_factory=dict)  # hardware -> batch -> x
    formulas: list[str] = field(default_factory=list)
    skipped: str | None = None


@dataclass
class EstimateReport:
    """What :func:`estimate` priced; ``table()`` for people, ``to_json()`` for machines."""

    model: str
    example_batch: int
    batch_sizes: list[int]
    hardware: list[str]
    dtypes: dict[str, str]
    scenarios: list[Scenario]
    roofline: dict[str, dict[int, list[RooflineRow]]]  # hardware -> batch -> rows (dense)
    notes: list[str]
    comparisons: list[dict] = field(default_factory=list)

    def scenario(self, name: str) -> Scenario:
        for s in self.scenarios:
            if s.name == name or s.name.startswith(name):
                return s
        raise KeyError(name)

    def compare(self, measured, hardware: str = "cpu", scenario: str = "structured") -> list[dict]:
        """Put the estimate next to a :class:`fxprune.verify.LatencyReport` of the same pruned
        model (one row per batch size both have); the rows are also kept in ``comparisons``."""
        s = self.scenario(scenario)
        rows = []
        for r in measured.rows:
            est = s.speedup.get(hardware, {}).get(r.batch)
            if est is None:
                continue
            rows.append(
                {
                    "scenario": s.name,
                    "hardware": hardware,
                    "backend": measured.backend,
                    "batch": r.batch,
                    "estimated": est,
                    "measured": r.speedup,
                    "measured_over_estimated": r.speedup / est if est else float("nan"),
                }
            )
        self.comparisons += rows
        return rows

    def table(self, roofline_top: int = 8) -> str:
        out = [f"{self.model}: estimate from the traced graph (example batch {self.example_batch})"]
        out.append("")
        out.append("| scenario | params | fp32 | fp16 | int8 | GFLOPs run | GFLOPs non-zero |")
        out.append("|---|---|---|---|---|---|---|")
        for s in self.scenarios:
            if s.skipped:
                out.append(f"| {s.name} | skipped: {s.skipped} | | | | | |")
                continue
            for fmt, by in s.bytes.items():
                label = s.name if fmt == "dense" else f"{s.name} ({fmt})"
                out.append(
                    f"| {label} | {_n(s.params)} | {_mb(by['fp32'])} | {_mb(by['fp16'])} "
                    f"| {_mb(by['int8'])} | {s.flops / 1e9:.2f} | {s.nominal_flops / 1e9:.2f} |"
                )
        out.append("")
        head = " | ".join(
            f"{h} ({self.dtypes[h]}) b{b}" for h in self.hardware for b in self.batch_sizes
        )
        out.append(f"| speedup vs dense | {head} |")
        out.append("|---" * (1 + len(self.hardware) * len(self.batch_sizes)) + "|")
        for s in self.scenarios:
            if s.skipped or s.name == "dense":
                continue
            cells = [f"{s.speedup[h][b]:.2f}x" for h in self.hardware for b in self.batch_sizes]
            out.append(f"| {s.name} | " + " | ".join(cells) + " |")
        for s in self.scenarios:
            if s.formulas:
                out.append("")
                out.append(f"{s.name}:")
                out += [f"  {f}" for f in s.formulas]
        for h in self.hardware:
            for b in self.batch_sizes:
                rows = self.roofline[h][b]
                hw = HARDWARE.get(h)
                total = sum(r.ms for r in rows) or 1.0
                mem = sum(r.ms for r in rows if r.bound == "memory")
                ridge = hw.ridge(self.dtypes[h]) if hw else float("nan")
                out.append("")
                out.append(
                    f"roofline {h} {self.dtypes[h]}, batch {b}: ridge point {ridge:.0f} FLOP/byte; "
                    f"{100 * mem / total:.0f} % of the modelled time is memory-bound"
                )
                if roofline_top:
                    out.append("| layer | op | GFLOPs | MB moved | FLOP/byte | bound | share |")
                    out.append("|---|---|---|---|---|---|---|")
                    for r in sorted(rows, key=lambda r: -r.ms)[:roofline_top]:
                        out.append(
                            f"| {r.layer} | {r.op} | {r.flops / 1e9:.3f} | {r.bytes / 1e6:.2f} "
                            f"| {r.intensity:.1f} | {r.bound} | {100 * r.ms / total:.1f} % |"
                        )
        if self.comparisons:
            out.append("")
            out.append("| scenario | hardware | backend | batch | estimated | measured | ratio |")
            out.append("|---|---|---|---|---|---|---|")
            for c in self.comparisons:
                out.append(
                    f"| {c['scenario']} | {c['hardware']} | {c['backend']} | {c['batch']} "
                    f"| {c['estimated']:.2f}x | {c['measured']:.2f}x "
                    f"| {c['measured_over_estimated']:.2f} |"
                )
        if self.notes:
            out.append("")
            out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _n(v: float) -> str:
    return f"{v:,.0f}"


def _mb(v: float) -> str:
    return f"{v / 1e6:.2f} MB"


_FREE = {
    "view",
    "reshape",
    "_unsafe_view",
    "permute",
    "transpose",
    "t",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "expand",
    "getitem",
    "size",
    "sym_size",
    "contiguous",
    "alias",
    "detach",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "slice",
    "select",
    "dropout",
    "clone",
    "_assert_tensor_metadata",
}


# Element-wise ops a deployment compiler (TensorRT, ONNX Runtime, inductor) folds into the epilogue
# of the conv / GEMM before them: they read only their other operands (a residual) from memory.
_FUSIBLE = {
    "batchnorm1d",
    "batchnorm2d",
    "batch_norm",
    "_native_batch_norm_legit_no_training",
    "relu",
    "relu_",
    "relu6",
    "hardtanh",
    "hardtanh_",
    "gelu",
    "silu",
    "silu_",
    "sigmoid",
    "hardsigmoid",
    "hardswish",
    "hardswish_",
    "tanh",
    "leakyrelu",
    "leaky_relu",
    "add",
    "add_",
    "iadd",
    "mul",
    "sub",
    "identity",
}


def _op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__.lower()
    t = getattr(node.target, "overloadpacket", node.target)
    return str(getattr(t, "__name__", t)).split(".")[-1]


def layer_costs(
    gm: fx.GraphModule, exclude: Sequence[str] = (), fused: bool = True
) -> list[LayerCost]:
    """A :class:`LayerCost` per op of a traced graph (nodes need fake-tensor ``meta['val']``).

    ``exclude`` names modules kept dense by the 2:4 scenario. With ``fused``, an element-wise op
    (norm at inference, activation, add, mul) whose input is the only use of a conv / GEMM (or of
    an op already fused into one) costs only the reads of its other operands: deployment
    compilers run it in the GEMM's epilogue.
    """
    from fxprune.passes.nm import NM, eligibility

    nm = NM(2, 4, exclude=tuple(exclude))
    rows: list[LayerCost] = []
    epilogue: set[fx.Node] = set()  # outputs still in registers of a GEMM epilogue
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        out = tensor_meta(node)
        if out is None:
            continue
        ins = [tensor_meta(a) for a in node.all_input_nodes if a.op != "get_attr"]
        act = sum(t.numel() for t in ins if t is not None) + out.numel()
        found = node_macs(gm, node)
        wl = weighted_layer(gm, node)
        name = _op_name(node, gm)
        first = next((a for a in node.all_input_nodes if a.op != "get_attr"), None)
        if (
            fused
            and found is None
            and name in _FUSIBLE
            and first in epilogue
            and len(first.users) == 1
        ):
            extra = sum(
                t.numel()
                for a in node.all_input_nodes
                if a is not first and a.op != "get_attr" and (t := tensor_meta(a)) is not None
            )
            rows.append(LayerCost(node.name, "fused", 0.0, 0, 0, 0, extra, "no weight"))
            epilogue.add(node)
            continue
        if found is not None:
            epilogue.add(node)
        if found is not None and wl is not None:
            w = gm.get_parameter(wl.param)
            feats = w.shape[1 - wl.reduce_dim] if wl.kind == "linear" else out.shape[1]
            rows.append(
                LayerCost(
                    wl.layer,
                    wl.kind,
                    2.0 * found[1],
                    w.numel(),
                    out.numel() // max(feats, 1),
                    feats,
                    act,
                    eligibility(wl, w, nm),
                )
            )
        elif found is not None:
            rows.append(
                LayerCost(
                    node.name, "matmul", 2.0 * found[1], 0, 0, 0, act, "activation x activation"
                )
            )
        elif name not in _FREE:
            rows.append(LayerCost(node.name, "other", out.numel(), 0, 0, 0, act, "no weight"))
    return rows


def _time(
    hw: Hardware, dtype: str, flops: float, nbytes: float, peak: float | None = None
) -> float:
    """Roofline time in milliseconds: the slower of the math and the memory traffic."""
    peak = (peak if peak is not None else hw.tflops[dtype]) * 1e12
    return 1e3 * max(flops / peak, nbytes / (hw.bandwidth_gbs * 1e9))


def nm_bytes_ratio(dtype: str) -> float:
    """Bytes of a 2:4-compressed weight over its dense bytes: half the values plus a 2-bit
    index per kept value (fp16: 0.5 + 0.5 x 2/16 = 0.5625)."""
    return 0.5 + 0.5 * NM_META_BITS / (8 * BYTES[dtype])


def csr_bytes(c: LayerCost, s: float, dtype: str) -> float:
    """CSR storage of a weight at sparsity s: values + int32 column index per non-zero + int32
    row pointers (rows + 1)."""
    nnz = round(c.weight * (1 - s))
    return nnz * (BYTES[dtype] + INDEX_BYTES) + (c.out_features + 1) * INDEX_BYTES


def bitmask_bytes(c: LayerCost, s: float, dtype: str) -> float:
    """Bitmask storage: values of the non-zeros + one bit per dense position."""
    return round(c.weight * (1 - s)) * BYTES[dtype] + math.ceil(c.weight / 8)


def _dense_ms(c: LayerCost, hw: Hardware, dtype: str, scale: float) -> float:
    return _time(hw, dtype, c.flops * scale, (c.weight + c.act * scale) * BYTES[dtype])


def _nm_ms(c: LayerCost, hw: Hardware, dtype: str, scale: float) -> float:
    dense = _dense_ms(c, hw, dtype, scale)
    if c.nm_reason is not None or not hw.sparse_24 or c.rows * scale < hw.sparse_min_rows:
        return dense
    B = BYTES[dtype]
    sparse = _time(
        hw,
        dtype,
        c.flops * scale / hw.sparse_factor,
        c.weight * B * nm_bytes_ratio(dtype) + c.act * scale * B,
    )
    return min(dense, sparse)


def _unstructured_ms(c: LayerCost, hw: Hardware, dtype: str, scale: float, s: float) -> float:
    dense = _dense_ms(c, hw, dtype, scale)
    if not c.weight or hw.unstructured_threshold is None or s < hw.unstructured_threshold:
        return dense
    sparse = _time(
        hw,
        dtype,
        c.flops * scale * (1 - s),
        csr_bytes(c, s, dtype) + c.act * scale * BYTES[dtype],
        peak=hw.cuda_tflops,
    )
    return min(dense, sparse)


def _bytes_all(n: float) -> dict[str, float]:
    return {d: n * b for d, b in BYTES.items()}


def _weights(costs: list[LayerCost]) -> dict[str, LayerCost]:
    """One cost row per distinct weight (a layer called twice stores its weight once)."""
    out: dict[str, LayerCost] = {}
    for c in costs:
        if c.weight and c.name not in out:
            out[c.name] = c
    return out


def _gemm_flops(costs: list[LayerCost]) -> float:
    return sum(c.flops for c in costs if c.op != "other")


def _speedups(
    name: str,
    base: list[LayerCost],
    per_layer,
    hws: list[Hardware],
    dtypes: dict[str, str],
    batches: list[int],
    b0: int,
) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for hw in hws:
        out[hw.name] = {}
        for b in batches:
            sc = b / b0
            t_dense = sum(_dense_ms(c, hw, dtypes[hw.name], sc) for c in base)
            t_new = per_layer(hw, dtypes[hw.name], sc)
            out[hw.name][b] = t_dense / t_new if t_new else float("inf")
    return out


def _roofline(costs: list[LayerCost], hw: Hardware, dtype: str, scale: float) -> list[RooflineRow]:
    ridge = hw.ridge(dtype)
    rows = []
    for c in costs:
        flops = c.flops * scale
        nbytes = (c.weight + c.act * scale) * BYTES[dtype]
        ai = flops / nbytes if nbytes else 0.0
        rows.append(
            RooflineRow(
                c.name,
                c.op,
                flops,
                nbytes,
                ai,
                "compute" if ai >= ridge else "memory",
                _dense_ms(c, hw, dtype, scale),
            )
        )
    return rows


def _batch_of(args: tuple) -> int:
    for a in args:
        if isinstance(a, torch.Tensor) and a.ndim:
            return int(a.shape[0])
    return 1


def estimate(
    model: torch.nn.Module,
    example_inputs,
    sparsity: float | None = 0.9,
    nm: str | None = "2:4",
    structured=0.5,
    hardware: Sequence[str | Hardware] = ("A100", "H100", "L4", "cpu"),
    batch_sizes: Sequence[int] | None = None,
    dtype: str | None = None,
    exclude: Sequence[str] = (),
    fused: bool = True,
    mode: str = "auto",
    leaf_modules: Sequence[str | type] = (),
    **prune_kwargs,
) -> EstimateReport:
    """Price unstructured, 2:4 and structured pruning of ``model`` before pruning it.

    Args:
        model: the dense model (not modified).
        example_inputs: a tensor or tuple with the shapes the model runs at; their first dim is
            the batch, and other batch sizes are costed by scaling activations and FLOPs.
        sparsity: the unstructured sparsity s to price (None: skip).
        nm: the semi-structured pattern (only ``"2:4"``; None: skip).
        structured: a fraction of channels per group (``fxprune.compile(channels=...)``), a dict
            of ``fxprune.compile`` arguments (``{"heads": 0.5, "ffn": 0.5}``), an existing
            :class:`fxprune.CompileResult`, or None to skip.
        hardware: profile names from ``fxprune.estimator.HARDWARE`` or :class:`Hardware` objects.
        batch_sizes: batch sizes to price (default: 1 and 8).
        dtype: ``"fp32"``, ``"fp16"`` or ``"int8"`` for every profile (default: fp16 on GPUs,
            fp32 on CPUs).
        exclude: modules the unstructured and 2:4 scenarios keep dense (e.g. the classifier).
        fused: cost element-wise ops after a conv / GEMM as fused into its epilogue (what
            TensorRT, ONNX Runtime and inductor do); False costs each as its own memory pass.
        mode, leaf_modules: how to trace (as in ``fxprune.compile``).
        **prune_kwargs: further ``fxprune.compile`` arguments for the structured scenario.

    Returns:
        An :class:`EstimateReport`: ``scenarios`` (dense, unstructured, 2:4, structured) with
        params, bytes per format and dtype, FLOPs, speedup per hardware and batch, and the
        formulas with the numbers substituted; ``roofline`` per hardware and batch.

    Example:
        >>> rep = fxprune.estimate(model, x, sparsity=0.9, structured=0.5)
        >>> print(rep.table()); rep.scenario("2:4").speedup["H100"][8]
    """
    from fxprune.graph import trace

    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity={sparsity!r}: give an unstructured sparsity in [0, 1)")
    if nm is not None and str(nm) != "2:4":
        raise ConfigError(f"nm={nm!r}: only '2:4' has hardware support to price")
    hws = []
    for h in hardware:
        if isinstance(h, Hardware):
            hws.append(h)
        elif h in HARDWARE:
            hws.append(HARDWARE[h])
        else:
            raise ConfigError(f"hardware {h!r}: choose from {sorted(HARDWARE)} or pass a Hardware")
    if dtype is not None and dtype not in BYTES:
        raise ConfigError(f"dtype={dtype!r}: choose one of {sorted(BYTES)}")
    dtypes = {h.name: dtype or ("fp16" if h.kind == "gpu" else "fp32") for h in hws}
    batches = list(batch_sizes or (1, 8))
    if any(not isinstance(b, int) or b < 1 for b in batches):
        raise ConfigError(f"batch_sizes={batch_sizes!r}: give positive integers")
    args = as_args(example_inputs)
    b0 = _batch_of(args)
    gm = trace(model, args, mode=mode, leaf_modules=leaf_modules).gm
    costs = layer_costs(gm, exclude, fused)
    weights = _weights(costs)
    P = sum(p.numel() for p in model.parameters())
    W = sum(c.weight for c in weights.values())
    other = P - W
    gflops = _gemm_flops(costs)
    scen: list[Scenario] = []
    notes = [
        "times are per-layer roofline bounds, max(FLOPs / peak, bytes / bandwidth); speedups "
        "are ratios of their sums, so kernel efficiency mostly cancels",
        "bytes moved count weights + layer inputs + outputs once per call; ops that only "
        "reshape or select count nothing; 'other' ops are element-wise, norms and pooling; "
        + (
            "'fused' ops ran in the epilogue of the conv / GEMM before them and read only "
            "their other operands"
            if fused
            else "no op is fused"
        ),
    ]
    notes += [f"{h.name}: {h.source}" for h in hws]

    dense = Scenario("dense", P, {"dense": _bytes_all(P)}, gflops, gflops)
    dense.speedup = {h.name: {b: 1.0 for b in batches} for h in hws}
    dense.formulas.append(
        f"P = {_n(P)} parameters, of which {_n(W)} in {len(weights)} conv/linear weights "
        f"(prunable) and {_n(other)} others (biases, norms, embeddings)"
    )
    dense.formulas.append(
        "bytes = P x bytes per value = "
        + ", ".join(f"{_n(P)} x {b} = {_mb(P * b)} ({d})" for d, b in BYTES.items())
    )
    dense.formulas.append(f"FLOPs = 2 x MACs = {gflops / 1e9:.3f} GFLOPs per batch of {b0}")
    scen.append(dense)

    if sparsity is not None:
        s = float(sparsity)
        kept = sum(round(c.weight * (1 - s)) for c in weights.values())
        csr = {
            d: other * BYTES[d] + sum(csr_bytes(c, s, d) for c in weights.values()) for d in BYTES
        }
        bm = {
            d: other * BYTES[d] + sum(bitmask_bytes(c, s, d) for c in weights.values())
            for d in BYTES
        }
        wflops = sum(c.flops for c in costs if c.weight)
        sc = Scenario(
            f"unstructured {s:.0%}",
            other + kept,
            {"CSR": csr, "bitmask": bm},
            gflops,
            gflops - wflops * s,
        )
        sc.speedup = _speedups(
            sc.name,
            costs,
            lambda hw, d, k: sum(_unstructured_ms(c, hw, d, k, s) for c in costs),
            hws,
            dtypes,
            batches,
            b0,
        )
        big = max(weights.values(), key=lambda c: c.weight, default=None)
        sc.formulas.append(
            f"remaining = P x (1 - s) = {_n(W)} x (1 - {s:g}) = {_n(W * (1 - s))} "
            f"(+ {_n(other)} not pruned) = {_n(other + kept)} parameters"
        )
        if big is not None:
            nnz = round(big.weight * (1 - s))
            sc.formulas.append(
                f"CSR bytes = nnz x (value + 4-byte column index) + (rows + 1) x 4, e.g. "
                f"{big.name} fp16: {_n(nnz)} x (2 + 4) + ({big.out_features} + 1) x 4 = "
                f"{_n(csr_bytes(big, s, 'fp16'))} vs dense {_n(big.weight * 2)}"
            )
            sc.formulas.append(
                f"bitmask bytes = nnz x value + positions / 8, e.g. {big.name} fp16: "
                f"{_n(nnz)} x 2 + {_n(big.weight)} / 8 = {_n(bitmask_bytes(big, s, 'fp16'))}"
            )
        for hw in hws:
            if hw.unstructured_threshold is None:
                why = "stock runtimes run dense kernels over the zeros: speedup 1.00x"
            elif s < hw.unstructured_threshold:
                why = (
                    f"s = {s:g} < {hw.unstructured_threshold:g}: dense kernels run over the "
                    "zeros (scattered zeros cannot be skipped by tensor cores): speedup 1.00x"
                )
            else:
                why = (
                    f"s = {s:g} >= {hw.unstructured_threshold:g}: per layer the faster of dense "
                    f"and a CSR kernel on CUDA cores ({hw.cuda_tflops:g} TFLOP/s, CSR bytes): "
                    + ", ".join(f"batch {b} {sc.speedup[hw.name][b]:.2f}x" for b in batches)
                )
            sc.formulas.append(f"{hw.name}: {why}")
        scen.append(sc)

    if nm is not None:
        elig = {k: c for k, c in weights.items() if c.nm_reason is None}
        E = sum(c.weight for c in elig.values())
        by = {d: (P - E) * BYTES[d] + E * BYTES[d] * nm_bytes_ratio(d) for d in BYTES}
        eflops = sum(c.flops for c in costs if c.weight and c.nm_reason is None)
        sc = Scenario(
            "2:4",
            P - E // 2,
            {"compressed": by},
            gflops - eflops / 2,
            gflops - eflops / 2,
        )
        sc.speedup = _speedups(
            sc.name,
            costs,
            lambda hw, d, k: sum(_nm_ms(c, hw, d, k) for c in costs),
            hws,
            dtypes,
            batches,
            b0,
        )
        inel = {k: c.nm_reason for k, c in weights.items() if c.nm_reason is not None}
        sc.formulas.append(
            f"eligible weights E = {_n(E)} in {len(elig)} of {len(weights)} layers"
            + (
                f" (not: {', '.join(f'{k}: {v}' for k, v in list(inel.items())[:3])}"
                + (f" and {len(inel) - 3} more" if len(inel) > 3 else "")
                + ")"
                if inel
                else ""
            )
        )
        sc.formulas.append(f"remaining = P - E / 2 = {_n(P)} - {_n(E // 2)} = {_n(P - E // 2)}")
        sc.formulas.append(
            f"bytes of an eligible weight = dense x (1/2 + 1/2 x {NM_META_BITS} bits / value "
            f"bits) = dense x {nm_bytes_ratio('fp16'):.4f} (fp16), "
            f"{nm_bytes_ratio('int8'):.4f} (int8), {nm_bytes_ratio('fp32'):.4f} (fp32)"
        )
        for hw in hws:
            d = dtypes[hw.name]
            if not hw.sparse_24:
                sc.formulas.append(f"{hw.name}: no 2:4 sparse math: speedup 1.00x")
                continue
            parts = []
            for b in batches:
                k = b / b0
                t_all = sum(_dense_ms(c, hw, d, k) for c in costs)
                t_e = sum(_dense_ms(c, hw, d, k) for c in costs if c.weight and c.nm_reason is None)
                t_es = sum(_nm_ms(c, hw, d, k) for c in costs if c.weight and c.nm_reason is None)
                f = t_e / t_all if t_all else 0.0
                keff = t_e / t_es if t_es else 1.0
                parts.append(
                    f"batch {b}: f = {t_e:.4f} / {t_all:.4f} ms = {f:.3f}, k_eff = {keff:.2f}, "
                    f"S = 1 / ((1 - {f:.3f}) + {f:.3f} / {keff:.2f}) = {sc.speedup[hw.name][b]:.2f}x"
                )
            sc.formulas.append(
                f"{hw.name} (sparse factor {hw.sparse_factor:g}, GEMMs with >= "
                f"{hw.sparse_min_rows} rows): " + "; ".join(parts)
            )
        scen.append(sc)

    if structured is not None:
        scen.append(
            _structured(
                model,
                fused,
                args,
                structured,
                costs,
                hws,
                dtypes,
                batches,
                b0,
                mode,
                leaf_modules,
                prune_kwargs,
            )
        )

    roof = {
        hw.name: {b: _roofline(costs, hw, dtypes[hw.name], b / b0) for b in batches} for hw in hws
    }
    return EstimateReport(
        type(model).__name__,
        b0,
        batches,
        [h.name for h in hws],
        dtypes,
        scen,
        roof,
        notes,
    )


def _structured(
    model, fused, args, structured, costs, hws, dtypes, batches, b0, mode, leaf_modules, kw
):
    from fxprune.api import compile as fx_compile
    from fxprune.graph import trace
    from fxprune.plan import CompileResult

    if isinstance(structured, CompileResult):
        res = structured
        what = " + ".join(p.name for p in res.passes if p.changed or p.name == "nm")
        what = f"pruned: {what}" if what else "pruned"
    else:
        if isinstance(structured, Mapping):
            opts = dict(structured)
        elif isinstance(structured, (int, float)) and 0 < structured < 1:
            opts = {"channels": float(structured)}
        else:
            raise ConfigError(
                f"structured={structured!r}: give a fraction of channels, a dict of "
                "fxprune.compile arguments, a CompileResult or None"
            )
        opts = {"mode": mode, "leaf_modules": leaf_modules, **kw, **opts}
        what = ", ".join(
            f"{k}={v!r}"
            for k, v in opts.items()
            if k not in ("mode", "leaf_modules") and v not in ((), None)
        )
        try:
            res = fx_compile(model, args, **opts)
        except FxPruneError as e:
            return Scenario(f"structured ({what})", 0, {}, 0.0, 0.0, skipped=str(e))
    P2 = sum(p.numel() for p in res.module.parameters())
    if P2 == sum(p.numel() for p in model.parameters()):
        why = "; ".join(f"{b['node']}: {b['reason']}" for b in res.barriers[:2])
        return Scenario(
            f"structured ({what})",
            P2,
            {},
            0.0,
            0.0,
            skipped="nothing was removed" + (f" (barriers: {why})" if why else ""),
        )
    pcosts = layer_costs(trace(res.module, args).gm, fused=fused)
    masked = {k for p in res.passes if p.name == "nm" for k in p.masks}
    for c in pcosts:  # only weights the N:M pass masked run on sparse math
        if c.weight and f"{c.name}.weight" not in masked:
            c.nm_reason = "not N:M-masked"
    ms = _nm_ms if masked else _dense_ms
    fl = _gemm_flops(pcosts)
    sc = Scenario(f"structured ({what})", P2, {"dense": _bytes_all(P2)}, fl, fl)
    sc.speedup = _speedups(
        sc.name,
        costs,
        lambda hw, d, k: sum(ms(c, hw, d, k) for c in pcosts),
        hws,
        dtypes,
        batches,
        b0,
    )
    P = sum(p.numel() for p in model.parameters())
    f0 = _gemm_flops(costs)
    sc.formulas.append(
        f"{what if isinstance(structured, CompileResult) else f'built with fxprune.compile({what})'}: params {_n(P)} -> {_n(P2)} (x{P2 / P:.3f}), "
        f"FLOPs {f0 / 1e9:.3f} -> {fl / 1e9:.3f} G (x{fl / f0 if f0 else 1:.3f}); a smaller "
        "dense model, same kernels"
        + (f"; {len(masked)} weights N:M-masked run as in the 2:4 scenario" if masked else "")
    )
    for hw in hws:
        d = dtypes[hw.name]
        parts = []
        for b in batches:
            k = b / b0
            t0 = sum(_dense_ms(c, hw, d, k) for c in costs)
            t1 = sum(ms(c, hw, d, k) for c in pcosts)
            parts.append(f"batch {b}: {t0:.4f} / {t1:.4f} ms = {t0 / t1:.2f}x")
        sc.formulas.append(
            f"{hw.name}: S = T_dense / T_pruned (roofline sums): " + "; ".join(parts)
        )
    return sc
