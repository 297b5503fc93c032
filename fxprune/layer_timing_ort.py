"""The ONNX Runtime side of :mod:`fxprune.layer_timing`: the ``"onnxruntime"`` layer timer, a
:class:`~fxprune.layer_timing.LayerShape` as a one-node ONNX model, and the channel multiple ORT's
CPU provider needs to keep convs in its blocked NCHWc layout (``round_to="auto"`` prices only
those counts on this backend). Imported by ``fxprune.layer_timing``, which registers the timer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from fxprune.errors import MissingExtraError
from fxprune.layer_timing import LayerShape, LayerTimer, fastest_ms, layer_timer


@layer_timer("onnxruntime")
class OrtTimer(LayerTimer):
    """A one-node ONNX graph (Conv, or MatMul + Add) on ONNX Runtime's CPU provider."""

    def check(self) -> None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:  # pragma: no cover - core dependencies
            raise MissingExtraError("onnxruntime", "onnx", "round_backend='onnxruntime'") from e

    def versions(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"

    def layout_multiple(self) -> int:
        return nchwc_multiple()

    def measure(self, shape: LayerShape, threads: int) -> float:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model = onnx_layer(shape).SerializeToString()
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        feed = {"x": torch.randn(shape.input).numpy()}
        return fastest_ms(sess.run, None, feed)


def onnx_layer(shape: LayerShape, module: nn.Module | None = None):
    """The layer as a one-node ONNX model (input ``x``, output ``y``) with ``module``'s weights
    (default: a freshly initialised :meth:`LayerShape.module`)."""
    from onnx import TensorProto, helper, numpy_helper

    m = module if module is not None else shape.module()
    inits = [numpy_helper.from_array(m.weight.detach().numpy(), "w")]
    names = ["x", "w"]
    if m.bias is not None:
        inits.append(numpy_helper.from_array(m.bias.detach().numpy(), "b"))
    if shape.kind == "linear":
        inits[0] = numpy_helper.from_array(m.weight.detach().t().contiguous().numpy(), "w")
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if m.bias is None else "xw"])]
        if m.bias is not None:
            nodes.append(helper.make_node("Add", ["xw", "b"], ["y"]))
    else:
        attrs = {"kernel_shape": list(shape.kernel), "strides": list(shape.stride)}
        attrs.update(dilations=list(shape.dilation), group=shape.groups, pads=_pads(shape))
        nodes = [
            helper.make_node("Conv", names + (["b"] if m.bias is not None else []), ["y"], **attrs)
        ]
    with torch.no_grad():
        y = m(torch.zeros(shape.input))
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape.input))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y.shape))],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def stays_blocked(channels: int) -> bool:
    """Whether ONNX Runtime's CPU provider (graph optimisations on) runs two chained 3x3 convs
    of ``channels`` channels in its blocked NCHWc layout throughout: one reorder into it before
    the first, one out after the second, none between them."""
    import tempfile

    import onnx
    import onnxruntime as ort

    c = channels
    shape = LayerShape("conv", (1, c, 8, 8), c, (3, 3), (1, 1), (1, 1), (1, 1))
    two = onnx.compose.merge_models(
        onnx_layer(shape), onnx_layer(shape), [("y", "x")], prefix1="a_", prefix2="b_"
    )
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.optimized_model_filepath = f"{d}/o.onnx"
        so.log_severity_level = 3
        ort.InferenceSession(two.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    return ops.count("ReorderInput") == 1 and ops.count("ReorderOutput") == 1


@functools.cache
def nchwc_multiple() -> int:
    """The smallest power of two (up to 32) whose multiples ONNX Runtime's CPU provider keeps in
    its blocked NCHWc layout from one conv to the next (:func:`stays_blocked`); 1 when it keeps
    none (no NCHWc kernels on this CPU). On this project's x86 machine it is 4: a count of 45
    channels leaves the layout and both neighbours pay reorders."""
    for a in (1, 2, 4, 8, 16, 32):
        if stays_blocked(32 + a if a < 32 else 64):  # a multiple of a, of no larger power of 2
            return a
    return 1


def _pads(shape: LayerShape) -> list[int]:
    """ONNX ``pads`` (all begins, then all ends) of a conv, ``"same"`` spelled out as PyTorch
    pads it (the odd one at the end)."""
    if shape.padding == "valid":
        return [0] * (2 * len(shape.kernel))
    if shape.padding == "same":
        total = [d * (k - 1) for d, k in zip(shape.dilation, shape.kernel, strict=True)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    return list(shape.padding) * 2
