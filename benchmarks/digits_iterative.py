"""One-shot vs iterative pruning at high ratios, same total fine-tuning, on the digits ResNet.

For each target (75 % and 87.5 % of every group's channels, classifier outputs kept) and seed:
- one shot: ``fxprune.compile`` at the target, then ``steps x epochs`` epochs of fine-tuning;
- iterative: ``fxprune.iterative_prune`` with the cubic schedule in ``steps`` steps, ``epochs``
  epochs of fine-tuning after each (the same total), ending on exactly the same architecture.
Held-out accuracy (450 images), mean ± std over seeds.

    python benchmarks/digits_iterative.py [--seeds 0 1 2] [--steps 3] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxprune  # noqa: E402
from benchmarks._digits import accuracy, train, trained_model  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs per step")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.875])
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    res: dict[tuple[float, str], list[float]] = {}
    dense_acc, params = [], {}
    for seed in a.seeds:
        model, (xtr, ytr, xte, yte) = trained_model(seed, 30)
        dense_acc.append(accuracy(model, xte, yte))
        for target in a.targets:
            one = fxprune.compile(model, xtr[:2], channels=target, ignore=["fc"])
            assert fxprune.verify.equivalence(model, one, xtr[:2]).ok
            train(one.module, xtr, ytr, a.steps * a.epochs, lr=1e-3, seed=seed)
            res.setdefault((target, "one shot"), []).append(accuracy(one.module, xte, yte))

            it = fxprune.iterative_prune(
                model,
                xtr[:2],
                steps=a.steps,
                schedule="cubic",
                channels=target,
                ignore=["fc"],
                finetune=lambda m, step, s=seed, x=xtr, y=ytr: train(
                    m, x, y, a.epochs, lr=1e-3, seed=s
                ),
            )
            assert all(s.equivalent for s in it.steps)
            same = {k: v.shape for k, v in it.module.state_dict().items()} == {
                k: v.shape for k, v in one.module.state_dict().items()
            }
            assert same, "iterative must end on the one-shot architecture"
            res.setdefault((target, "iterative"), []).append(accuracy(it.module, xte, yte))
            params[target] = sum(p.numel() for p in one.module.parameters())

    def cell(v):
        return f"{statistics.mean(v):.2f} ± {statistics.pstdev(v):.2f}"

    print(
        f"# digits ResNet, seeds {a.seeds}; dense {cell(dense_acc)} %; {a.steps} steps x "
        f"{a.epochs} epochs vs one shot + {a.steps * a.epochs} epochs; torch "
        f"{torch.__version__}; {time.perf_counter() - t0:.0f} s"
    )
    print("| channels removed | params | one shot + fine-tune | iterative (cubic) |")
    print("|---|---|---|---|")
    for target in a.targets:
        print(
            f"| {target:.1%} | {params[target]:,} | {cell(res[(target, 'one shot')])} "
            f"| {cell(res[(target, 'iterative')])} |"
        )


if __name__ == "__main__":
    main()
