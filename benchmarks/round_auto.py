"""``round_to=1`` vs ``8`` vs ``"auto"``: what aligning kept channel counts buys on the CPU.

    python benchmarks/round_auto.py        # resnet50 + mobilenet_v3_large, both backends
    python benchmarks/round_auto.py --repeats 6 --batch 1 --models resnet50   # a quick look

Each torchvision model (random weights, nothing downloaded) is pruned at ``channels=0.5``
(``--channels``; its classifier's outputs kept) three ways: ``round_to=1`` (the plain counts), ``round_to=8``
and ``round_to="auto"`` priced on the backend it is then timed on (``round_backend`` =
``"torch"`` or ``"onnxruntime"``). The verifier (``fxprune.verify.latency``) times each
pruned model against the dense one; the table gives the MAC ratio, the speedup of the
medians with the p10-p90 of the per-round speedups, the efficiency (speedup x MAC ratio), the
noise flag, and the seconds ``compile`` took (for ``auto``, mostly its layer timing; a group
whose plain count is already a multiple of 32 has one candidate and is not timed). A row
flagged noisy was timed on a machine that was not quiet: compare such rows with care.
``--cache FILE`` keeps the layer timings across runs (``FXPRUNE_LAYER_CACHE``);
``--price-batch N`` gives the example input, and so auto's layer timings, N rows (default 1).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fxprune  # noqa: E402
from fxprune.layer_timing import CACHE_ENV  # noqa: E402
from fxprune.passes import Channels  # noqa: E402

HEADS = {"resnet50": "fc", "mobilenet_v3_large": "classifier.3"}


def prune(model, x, head: str, round_to, backend: str, ratio: float):
    """The pruned model and the seconds ``compile`` took (for auto: mostly layer timing)."""
    timed = {"round_backend": backend} if round_to == "auto" else {}
    cfg = Channels(ratio, ignore=(head,), round_to=round_to, **timed)
    t0 = time.perf_counter()
    res = fxprune.compile(model, x, fxprune.Recipe([cfg]))
    return res, time.perf_counter() - t0


def rows(name: str, backend: str, a) -> list[str]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(a.price_batch, 3, a.size, a.size)  # auto prices layers at this batch
    out = []
    for round_to in (1, 8, "auto"):
        res, secs = prune(model, x, HEADS[name], round_to, backend, a.channels)
        rep = fxprune.verify.latency(
            model,
            res,
            x,
            backend=backend,
            batch_sizes=a.batch,
            warmup=a.warmup,
            repeats=a.repeats,
            threads=a.threads,
        )
        for r in rep.rows:
            out.append(
                f"| {name} | {backend} | {round_to} | {r.batch} | {r.mac_ratio:.3f} "
                f"| {r.speedup:.2f}x [{r.speedup_p10:.2f}-{r.speedup_p90:.2f}] "
                f"| {r.efficiency:.2f} | {'NOISY' if r.noisy else 'ok'} "
                f"({r.round_spread:.0%} spread, other CPU {rep.other_cpu or 0:.2f}) "
                f"| {secs:.0f} |"
            )
        print(out[-1], file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--channels", type=float, default=0.5, help="the channel ratio removed")
    ap.add_argument(
        "--price-batch", type=int, default=1, help="the example's batch (auto prices at it)"
    )
    ap.add_argument("--cache", default=None, help="a JSON file keeping layer timings")
    a = ap.parse_args()
    if a.cache:
        os.environ[CACHE_ENV] = a.cache
    threads = a.threads or os.cpu_count()
    print(
        f"# round_to=1 / 8 / auto at channels={a.channels}; {platform.machine()}, {os.cpu_count()} cpus, "
        f"{threads} threads, torch {torch.__version__}; input {a.price_batch}x3x{a.size}x{a.size}, "
        f"{a.warmup} warm-up + {a.repeats} timed calls per model and batch\n"
    )
    lines = [
        "| model | backend | round_to | batch | MAC ratio | speedup [rounds p10-p90] "
        "| efficiency | noise | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in a.models:
        for backend in a.backends:
            lines += rows(name, backend, a)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
