"""What structured pruning buys on a GPU: dense vs fxprune-pruned, fp16, same device, one run.

    python benchmarks/gpu_structured.py            # on a CUDA machine
    python benchmarks/gpu_structured.py --smoke    # CPU, tiny sizes: checks the script only

For each model and channel ratio the model is pruned with fxprune on the CPU (equivalence checked
there), then dense and pruned run in fp16 on the GPU (CNNs in channels_last), timed with CUDA events,
dense and pruned interleaved in rounds so drift hits both. Prints latency median [p10-p90],
speedup, MAC ratio and efficiency = speedup / (dense MACs / pruned MACs). Speedup is measured
against the same capture unpruned ("dense traced"), so it shows what pruning buys; the dense module
column shows what the capture itself costs or saves.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _gpu_timing import capture_graph  # noqa: E402

import fxprune  # noqa: E402
from fxprune.graph.capture import capture  # noqa: E402
from tests.conftest import randomize  # noqa: E402


def models(smoke: bool):
    import torchvision

    size = 64 if smoke else 224
    yield "resnet50", randomize(torchvision.models.resnet50()), (3, size, size), "fc", True
    yield (
        "vit_b_16 (MLPs)",
        randomize(torchvision.models.vit_b_16(image_size=size)),
        (3, size, size),
        "heads.head",
        False,
    )
    try:
        import transformers
    except ImportError:
        return
    cfg = transformers.BertConfig(
        num_hidden_layers=2 if smoke else 12,
        hidden_size=64 if smoke else 768,
        num_attention_heads=4 if smoke else 12,
        intermediate_size=256 if smoke else 3072,
    )
    yield "bert-base (FFN)", transformers.BertModel(cfg).eval(), "ids", None, False


def example(shape, batch: int):
    if shape == "ids":
        return (torch.randint(0, 1000, (batch, 128)),)
    return (torch.randn(batch, *shape),)


def graphed(fn):
    """Capture ``fn`` (static shapes) into a CUDA graph; replay removes Python launch overhead."""
    return capture_graph(fn).replay


def time_pair(fns: dict, rounds: int, iters: int) -> dict:
    """Median / p10 / p90 ms per call for each fn, interleaved round by round."""
    times = {k: [] for k in fns}
    for f in fns.values():  # warm-up (cuDNN autotune, lazy init)
        for _ in range(3):
            f()
    torch.cuda.synchronize()
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fns[k]()
            end.record()
            torch.cuda.synchronize()
            times[k].append(start.elapsed_time(end) / iters)
    out = {}
    for k, t in times.items():
        t.sort()
        out[k] = (statistics.median(t), t[len(t) // 10], t[(9 * len(t)) // 10])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", help="run models whose label contains this text")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.3, 0.5])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32, 128])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        print("No CUDA device: run with --smoke to check the script on the CPU.")
        return 0
    dev = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "cpu (smoke)"
    print(
        f"# dense vs fxprune channel pruning, fp16, {name}, torch {torch.__version__}, "
        f"cuDNN {torch.backends.cudnn.version() if cuda else '-'}; ms per forward, median "
        f"[p10-p90] over {a.rounds} rounds of {a.iters}\n"
    )
    print(
        "| model | channels removed | batch | mode | dense module ms | dense traced ms | pruned ms "
        "| speedup vs traced | vs module | MAC ratio | efficiency | params ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    for label, model, shape, head, cnn in models(a.smoke):
        if a.only and a.only not in label:
            continue
        for ratio in a.ratios:
            # Prune on the device the model runs on: torch.export graphs bake tensor-creation
            # devices in, so an export-captured model (BERT here) must be captured there.
            model = model.to(dev)
            x = tuple(t.to(dev) for t in example(shape, 2))
            res = fxprune.compile(
                model, x, channels=ratio, ignore=[head] if head else [], round_to=8
            )
            torch.backends.cudnn.allow_tf32 = False  # fp32 for the proof, TF32 would blur it
            rep = fxprune.verify.equivalence(model, res, x)
            assert rep.ok, rep.message
            torch.backends.cudnn.allow_tf32 = True
            # "traced" is the same capture without pruning: pruned vs traced isolates what
            # pruning buys from what the capture (fx / torch.export graph) changes by itself.
            traced = capture(copy.deepcopy(model).eval(), x).gm.eval()  # compile's capture
            dense = copy.deepcopy(model).eval()
            pruned = res.module.eval()
            fmt = torch.channels_last if cnn else torch.contiguous_format
            dtype = torch.float16 if cuda else torch.float32
            dense = dense.to(dev, dtype).to(memory_format=fmt)
            traced = traced.to(dev, dtype).to(memory_format=fmt)
            pruned = pruned.to(dev, dtype).to(memory_format=fmt)
            for batch in a.batches if not a.smoke else [1, 2]:
                xb = tuple(
                    t.to(dev)
                    if t.dtype == torch.long
                    else t.to(dev, dtype).to(
                        memory_format=fmt if t.ndim == 4 else torch.contiguous_format
                    )
                    for t in example(shape, batch)
                )
                with torch.no_grad():
                    if not cuda:  # smoke: both run, nothing is timed
                        dense(*xb), traced(*xb), pruned(*xb)
                        print(f"| {label} | {ratio:.0%} | {batch} | (smoke: ran, not timed) |")
                        continue
                    fns = {
                        "dense": partial(dense, *xb),
                        "traced": partial(traced, *xb),
                        "pruned": partial(pruned, *xb),
                    }
                    t = time_pair(fns, a.rounds, a.iters)
                    g = time_pair({k: graphed(f) for k, f in fns.items()}, a.rounds, a.iters)
                mac = res.summary.macs_ratio
                for mode, tt in (("eager", t), ("CUDA graph", g)):
                    d, tr, p = tt["dense"], tt["traced"], tt["pruned"]
                    speed = tr[0] / p[0]
                    print(
                        f"| {label} | {ratio:.0%} | {batch} | {mode} | {d[0]:.3f} | "
                        f"{tr[0]:.3f} [{tr[1]:.3f}-{tr[2]:.3f}] | {p[0]:.3f} [{p[1]:.3f}-"
                        f"{p[2]:.3f}] | {speed:.2f}x | {d[0] / p[0]:.2f}x | {mac:.3f} | "
                        f"{speed * mac:.2f} | {res.summary.params_ratio:.3f} |",
                        flush=True,
                    )
            del dense, traced, pruned
            if cuda:
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
