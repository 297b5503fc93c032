"""Dense vs pruned under torch.compile, beside eager PyTorch and ONNX Runtime, in one run.

Two models, random weights: ResNet-50 with half of every prunable channel group removed
(``channels=0.5``, the classifier's outputs kept) and a BERT-base-like encoder (hidden 768, 12
heads, FFN 3072) with half its heads and FFN neurons removed. Each backend times dense and
pruned interleaved through ``fxprune.verify.latency`` (warm-up calls pay the compile):

* ``torch``: eager PyTorch (CPU);
* ``torch-compile``: ``torch.compile`` (inductor) of the dense model and of ``result.module``;
* ``fxprune.backend``: the *dense* model compiled with ``backend=fxprune.backend(result.plan)``
  (the plan replayed inside dynamo), against the dense model compiled with inductor;
* ``onnxruntime``: both exported to ONNX, CPU execution provider;
* on a CUDA machine also ``torch-compile-cuda`` (inductor on the GPU, fp32).

The parity column of each row is the largest difference to the pruned model in eager mode.

    python benchmarks/compile_speed.py             # ResNet-50 at 224 px, BERT 12 layers x 128
    python benchmarks/compile_speed.py --quick     # 112 px, 4 layers x 64, fewer repeats
    python benchmarks/compile_speed.py --threads 1 # on a shared machine: busy cores make every
                                                   # multi-threaded (OpenMP) row spin, not run
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
from fxprune.verify.latency import Backend  # noqa: E402
from fxprune.verify.latency_runners import CompiledRunner  # noqa: E402
from tests.conftest import randomize  # noqa: E402

CPU_BACKENDS = ("torch", "torch-compile", "fxprune.backend", "onnxruntime")


class PlanInCompile(Backend):
    """Dense: ``torch.compile(dense)``; pruned: ``torch.compile(dense, backend=fxprune.backend(
    plan))``, a copy of the dense model pruned inside dynamo."""

    name = "fxprune.backend"

    def __init__(self, dense, plan):
        self.dense, self.plan, self.report = dense, plan, None

    def runner(self, module, args, ctx):
        if ctx.tag == "dense":
            return CompiledRunner(module)
        b = fxprune.backend(self.plan)
        self.report = b.report
        return CompiledRunner(copy.deepcopy(self.dense), backend=b)


class CompileCuda(Backend):
    """``torch.compile`` (inductor) on the GPU, fp32, synchronised per call."""

    name = "torch-compile-cuda"
    gpu = True

    def runner(self, module, args, ctx):
        class Runner(CompiledRunner):
            def prepare(self, a):
                a = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in a)
                return super().prepare(a)

            def run(self, prepared):
                out = super().run(prepared)
                torch.cuda.synchronize()
                return out

        return Runner(copy.deepcopy(module).cuda().eval())


def resnet50(quick: bool):
    import torchvision

    size = 112 if quick else 224
    model = randomize(torchvision.models.resnet50())
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return f"resnet50 {size}px", model, x, {"channels": 0.5, "ignore": ["fc"]}


def bert(quick: bool):
    import transformers

    layers, seq = (4, 64) if quick else (12, 128)
    cfg = transformers.BertConfig(
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
    )
    model = randomize(transformers.BertModel(cfg, add_pooling_layer=False))
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    return f"bert-base {layers}L x {seq}", model, (ids,), {"heads": 0.5, "ffn": 0.5}


def backends(dense, res) -> list:
    out = ["torch", "torch-compile", PlanInCompile(dense, res.plan), "onnxruntime"]
    if torch.cuda.is_available():
        out.append(CompileCuda())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small inputs, 10 repeats")
    ap.add_argument("--models", default="resnet50,bert", help="comma list: resnet50, bert")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per model")
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--details", action="store_true", help="print each latency report too")
    a = ap.parse_args()
    repeats = a.repeats or (10 if a.quick else 30)
    torch.manual_seed(0)
    print(
        f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"fxprune {fxprune.__version__}, batch {a.batch}, {repeats} timed calls\n"
    )
    rows = []
    for name in a.models.split(","):
        label, model, x, options = {"resnet50": resnet50, "bert": bert}[name.strip()](a.quick)
        res = fxprune.compile(model, x, **options)
        for be in backends(model, res):
            torch._dynamo.reset()
            rep = fxprune.verify.latency(
                model, res, x, backend=be, batch_sizes=(a.batch,), warmup=3, repeats=repeats,
                threads=a.threads,
            )  # fmt: skip
            r = rep.rows[0]
            bname = be if isinstance(be, str) else be.name
            rows.append((label, bname, r.dense_ms, r.pruned_ms, r.speedup, r.parity, rep.noisy))
            if a.details:
                print(rep.table(), "\n")
            if isinstance(be, PlanInCompile) and be.report is not None:
                g = be.report.graphs[-1]
                print(f"{label}: fxprune.backend pruned {len(g.layers)} layers in graph "
                      f"{g.compile_id}, params {g.params_before:,} -> {g.params_after:,}")  # fmt: skip
    print("\n| model | backend | dense ms | pruned ms | speedup | parity | noisy |")
    print("|---|---|---:|---:|---:|---:|---|")
    for label, bname, d, p, s, par, noisy in rows:
        print(f"| {label} | {bname} | {d:.2f} | {p:.2f} | {s:.2f}x | {par:.1e} | {noisy} |")


if __name__ == "__main__":
    main()
