"""GPU backends of the latency verifier: ``torch-cuda`` (fp16 eager on the GPU, with N:M-masked
Linear weights as PyTorch semi-structured sparse tensors, i.e. 2:4 sparse tensor cores through
cuSPARSELt or CUTLASS) and ``tensorrt`` (a dense engine for the dense model and an engine built
with SPARSE_WEIGHTS for a 2:4 pruned one, both from ONNX exported here).

A runner prepares a model once, ``prepare(args)`` puts one batch of inputs on the device (outside
the timed region), and ``run(prepared)`` does one forward and waits for the GPU to finish. What
cannot be tried without a GPU (device placement, conversion, engine execution) is kept apart
from what can (which weights would convert and why others cannot, the clear error when no GPU is
visible), so that part is tested on every machine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from fxprune.errors import ConfigError

GPU_BACKENDS = ("torch-cuda", "tensorrt")


def require_cuda(backend: str) -> None:
    """ConfigError naming the backend when no CUDA device is visible."""
    if not torch.cuda.is_available():
        raise ConfigError(
            f"backend={backend!r} needs an NVIDIA GPU and torch.cuda.is_available() is False "
            f"here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use "
            "backend='onnxruntime' or 'torch' on this machine, or run the same command where "
            "the model will be deployed"
        )


def semi_structured_plan(
    module: nn.Module, masks: dict[str, torch.Tensor]
) -> tuple[list[str], dict[str, str]]:
    """Which N:M-masked weights can become semi-structured sparse tensors, and why others can't.

    PyTorch's ``to_sparse_semi_structured`` covers 2-D weights used by linear / matmul with
    2:4 along the input dim; its kernels also need the weight's rows and columns to be multiples
    of the backend's tile (checked at conversion; failures are reported, not fatal).
    """
    ok, skipped = [], {}
    axis = {}
    if isinstance(module, torch.fx.GraphModule):
        from fxprune.passes.nm import candidates

        axis = {c.param: c.reduce_dim for c in candidates(module)}
    for name, mask in masks.items():
        try:
            w = module.get_parameter(name)
        except AttributeError:
            skipped[name] = "not a parameter of the module"
            continue
        if w.ndim != 2:
            skipped[name] = (
                f"{w.ndim}-D weight (conv): PyTorch semi-structured sparse tensors cover "
                "Linear / matmul only; use backend='tensorrt' for sparse convolutions"
            )
            continue
        if axis.get(name, 1) == 0:
            skipped[name] = (
                "weight stored [in, out] (Hugging Face Conv1D / addmm); PyTorch semi-structured "
                "sparse tensors need [out, in] with 2:4 along in"
            )
            continue
        groups = (
            (mask.reshape(mask.shape[0], -1, 4).sum(-1) <= 2).all()
            if w.shape[1] % 4 == 0
            else False
        )
        if not bool(groups):
            skipped[name] = "not 2:4 along the input dim (only 2:4 has sparse tensor cores)"
            continue
        ok.append(name)
    return ok, skipped


def _device_args(args: tuple, dtype: torch.dtype) -> tuple:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.to("cuda", dtype=dtype) if a.is_floating_point() else a.to("cuda")
        out.append(a)
    return tuple(out)


class TorchCudaRunner:
    """fp16 eager on the GPU. The pruned model's N:M-masked Linear weights become 2:4
    semi-structured sparse tensors where :mod:`fxprune.verify.semi_structured` measured them
    faster at ``args``' shapes (``mode="measured"``), all of them (``"all"``) or none
    (``"off"``); the dense model keeps dense weights. ``swap`` is the decision per weight."""

    def __init__(
        self,
        module: nn.Module,
        masks: dict[str, torch.Tensor] | None,
        tag: str,
        args: tuple = (),
        mode: str = "measured",
        min_speedup: float | None = None,
    ):
        from fxprune.verify.semi_structured import plan_semi_structured, swap_semi_structured

        if mode == "all" and tag == "pruned" and not masks:
            raise ConfigError("semi_structured='all': the pruned model has no N:M masks")
        require_cuda("torch-cuda")
        self.dtype = torch.float16
        self.module = copy.deepcopy(module).to("cuda", self.dtype).eval()
        self.notes: list[str] = []
        self.swap = None
        if masks:
            ready = _device_args(args, self.dtype)
            self.swap = plan_semi_structured(self.module, masks, ready, mode, min_speedup)
            swap_semi_structured(self.module, self.swap)
            self.notes.append(self.swap.note(tag))

    def prepare(self, args: tuple):
        out = _device_args(args, self.dtype)
        torch.cuda.synchronize()
        return out

    def run(self, prepared):
        with torch.inference_mode():
            out = self.module(*prepared)
        torch.cuda.synchronize()
        return out


def _torch_dtype(trt, dt):
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.int8: torch.int8,
        trt.bool: torch.bool,
    }
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dt not in table:
        raise ConfigError(f"TensorRT tensor dtype {dt} has no torch equivalent here")
    return table[dt]


class TensorRTRunner:
    """An engine built here from the model's ONNX export and run through TensorRT's runtime on
    CUDA tensors (I/O bound by name, one stream, synchronised after every call)."""

    def __init__(self, module, args: tuple, workdir: Path, tag: str, sparse: bool, max_batch: int):
        from fxprune.exporters.onnx import DEFAULT_OPSET, write_onnx
        from fxprune.exporters.tensorrt import build_engine, import_tensorrt, parse_sparsity_log

        trt = import_tensorrt()
        require_cuda("tensorrt")
        self.trt = trt
        path = Path(workdir) / f"{tag}.onnx"
        write_onnx(module, args, path, DEFAULT_OPSET, dynamic_batch=True)
        log: list[str] = []
        fp16 = int(trt.__version__.split(".")[0]) < 11  # TRT 11: precision comes from the ONNX
        blob = build_engine(
            trt,
            path,
            log,
            fp16=fp16,
            int8=False,
            sparse=sparse,
            workspace=4 * 2**30,
            opt_batch=max_batch,
            example_shapes=[list(a.shape) for a in args],
        )
        eligible, picked = parse_sparsity_log(log)
        self.notes = [
            f"{tag}: TensorRT {trt.__version__} engine, {'fp16' if fp16 else 'fp32'}, "
            + (
                f"SPARSE_WEIGHTS: {len(eligible)} layers eligible, {len(picked)} picked sparse"
                if sparse
                else "dense"
            )
        ]

        class _Quiet(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                pass

        self.logger = _Quiet()  # TensorRT keeps a pointer: it must outlive the runtime
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = torch.cuda.Stream()

    def prepare(self, args: tuple):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if len(tensors) != len(self.inputs):
            raise ConfigError(
                f"the engine has {len(self.inputs)} inputs {self.inputs}, got {len(tensors)}"
            )
        ins, outs = [], []
        for name, a in zip(self.inputs, tensors, strict=True):
            dt = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            t = a.to("cuda", dtype=dt).contiguous()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            ins.append(t)
        for name in self.outputs:
            dt = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            t = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dt, device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        torch.cuda.synchronize()  # the copies ran on the default stream; the engine on its own
        return ins, outs

    def run(self, prepared):
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        self.stream.synchronize()
        return prepared[1]
