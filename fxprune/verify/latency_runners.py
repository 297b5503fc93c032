"""The latency verifier's CPU runners (a model prepared once, run per call) and the
:class:`RunContext` every backend's runner is built with; the GPU ones are in
``fxprune.verify.gpu``, the backends that choose them in ``fxprune.verify.latency``."""

from __future__ import annotations

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
