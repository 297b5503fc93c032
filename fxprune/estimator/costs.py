"""The estimator's cost model: one :class:`LayerCost` per op of a traced graph and its roofline
time on a hardware profile, dense, 2:4 or with unstructured sparsity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx

from fxprune.estimator.hardware import BYTES, INDEX_BYTES, NM_META_BITS, Hardware
from fxprune.graph.trace import tensor_meta
from fxprune.graph.weighted import weighted_layer
from fxprune.stats import node_macs


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
    param: str = ""  # the weight's qualified name


@dataclass
class RooflineRow:
    layer: str
    op: str
    flops: float
    bytes: float
    intensity: float
    bound: str  # "memory" or "compute"
    ms: float


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
            try:
                w = gm.get_parameter(wl.param)
            except AttributeError:  # a buffer used as a weight (a fixed blur filter)
                w = gm.get_buffer(wl.param)
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
                    wl.param,
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


def dense_time_ms(c: LayerCost, hw: Hardware, dtype: str, scale: float) -> float:
    return _time(hw, dtype, c.flops * scale, (c.weight + c.act * scale) * BYTES[dtype])


def nm_time_ms(c: LayerCost, hw: Hardware, dtype: str, scale: float) -> float:
    dense = dense_time_ms(c, hw, dtype, scale)
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


def unstructured_time_ms(c: LayerCost, hw: Hardware, dtype: str, scale: float, s: float) -> float:
    dense = dense_time_ms(c, hw, dtype, scale)
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


def roofline_rows(
    costs: list[LayerCost], hw: Hardware, dtype: str, scale: float
) -> list[RooflineRow]:
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
                dense_time_ms(c, hw, dtype, scale),
            )
        )
    return rows
