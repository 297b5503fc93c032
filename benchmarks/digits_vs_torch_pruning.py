"""Real data, real accuracy: a residual CNN trained from scratch on scikit-learn's `digits`,
pruned 50 % channels by fxprune and by torch-pruning under the same criterion (L1, Taylor, FPGM)
and ratio, then fine-tuned identically; plus fxprune 50 % channels + 2:4 with fixed masks, and
fxprune's criteria torch-pruning has no counterpart of here (activation; learned: soft gates
trained 300 Adam steps, lr 0.02, on cross-entropy over the training split, weights frozen).

    python benchmarks/digits_vs_torch_pruning.py [--seeds 0 1 2] [--epochs 30] [--finetune 10]
    python benchmarks/digits_vs_torch_pruning.py --criteria l1 activation taylor learned

Same split, same dense model, same fine-tuning (Adam 1e-3, cosine, 1-pixel shifts) and seed for
both tools; the classifier's outputs are kept (fxprune ``ignore=["fc"]``, torch-pruning
``ignored_layers=[fc]``). Taylor scores use the cross-entropy on 512 training images for both.
Accuracy is on the 450 held-out images. "BN recalibration": the one-shot model (a copy) after
re-estimating BatchNorm statistics on 1024 training images (``fxprune.calibration.recalibrate_bn``,
no training); fine-tuning starts from the plain one-shot model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxprune  # noqa: E402
from benchmarks._digits import accuracy, clone, gate_trainer, train, trained_model  # noqa: E402
from fxprune.calibration import recalibrate_bn  # noqa: E402


def fxprune_variant(model, xtr, ytr, criterion: str, sparsity: str | None = None):
    xcal, ycal = xtr[:512], ytr[:512]
    res = fxprune.compile(
        model,
        xtr[:2],
        channels=0.5,
        importance=criterion,
        ignore=["fc"],
        calibration=[xcal],
        loss_fn=lambda out, batch: F.cross_entropy(out, ycal),
        train_fn=gate_trainer(xtr, ytr) if criterion == "learned" else None,
        sparsity=sparsity,
    )
    assert fxprune.verify.equivalence(model, res, xtr[:2]).ok
    return res


def tp_variant(model, xtr, ytr, criterion: str):
    import torch_pruning as tp

    m = clone(model).eval()
    imp = {
        "l1": tp.importance.GroupMagnitudeImportance(p=1),
        "taylor": tp.importance.GroupTaylorImportance(),
        "fpgm": tp.importance.FPGMImportance(),
    }[criterion]
    pruner = tp.pruner.MetaPruner(
        m, xtr[:2], importance=imp, pruning_ratio=0.5, ignored_layers=[m.fc]
    )
    if criterion == "taylor":
        m.zero_grad()
        F.cross_entropy(m(xtr[:512]), ytr[:512]).backward()
    pruner.step()
    m.zero_grad(set_to_none=True)
    return m.eval()


TP_CRITERIA = ("l1", "taylor", "fpgm")  # those torch-pruning runs under the same criterion


def params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30, help="training epochs of the dense model")
    ap.add_argument("--finetune", type=int, default=10, help="fine-tuning epochs after pruning")
    ap.add_argument(
        "--criteria",
        nargs="+",
        default=["l1", "taylor", "fpgm", "activation", "learned"],
        help="fxprune criteria; torch-pruning runs the same for l1, taylor and fpgm",
    )
    ap.add_argument("--no-nm", action="store_true", help="skip the 50 %% channels + 2:4 row")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows: dict[str, dict[str, list[float]]] = {}
    sizes: dict[str, int] = {}

    def record(name, key, value):
        rows.setdefault(name, {}).setdefault(key, []).append(value)

    def one_shot(name, module, xtr, xte, yte):
        record(name, "one-shot", accuracy(module, xte, yte))
        recal = recalibrate_bn(clone(module), [xtr[i : i + 256] for i in range(0, 1024, 256)])
        record(name, "recal", accuracy(recal, xte, yte))

    t0 = time.perf_counter()
    for seed in a.seeds:
        model, (xtr, ytr, xte, yte) = trained_model(seed, a.epochs)
        for key in ("one-shot", "recal", "fine-tuned"):
            record("dense", key, accuracy(model, xte, yte))
        sizes["dense"] = params(model)
        for crit in a.criteria:
            res = fxprune_variant(model, xtr, ytr, crit)
            name = f"fxprune {crit}"
            one_shot(name, res.module, xtr, xte, yte)
            train(res.module, xtr, ytr, a.finetune, lr=1e-3, seed=seed)
            record(name, "fine-tuned", accuracy(res.module, xte, yte))
            sizes[name] = params(res.module)
            if crit not in TP_CRITERIA:
                continue
            m = tp_variant(model, xtr, ytr, crit)
            name = f"torch-pruning {crit}"
            one_shot(name, m, xtr, xte, yte)
            train(m, xtr, ytr, a.finetune, lr=1e-3, seed=seed)
            record(name, "fine-tuned", accuracy(m, xte, yte))
            sizes[name] = params(m)
        if a.no_nm:
            continue
        res = fxprune_variant(model, xtr, ytr, "l1", sparsity="2:4")
        name = "fxprune l1 + 2:4"
        one_shot(name, res.module, xtr, xte, yte)
        masks = res.nm_masks
        from fxprune.passes.nm import keep_masks

        train(
            res.module,
            xtr,
            ytr,
            a.finetune,
            lr=1e-3,
            seed=seed,
            masks_hook=lambda opt, r=res, mk=masks: keep_masks(r.module, mk, opt),
        )
        for k, mk in masks.items():  # the pattern survived fine-tuning
            assert int((res.module.get_parameter(k)[~mk] != 0).sum()) == 0
        record(name, "fine-tuned", accuracy(res.module, xte, yte))
        sizes[name] = params(res.module)

    def cell(v):
        return (
            f"{statistics.mean(v):.2f} ± {statistics.pstdev(v):.2f}"
            if len(v) > 1
            else f"{v[0]:.2f}"
        )

    print(
        f"# digits (sklearn, 1347 train / 450 test), ResNetDigits, 50 % channels, seeds "
        f"{a.seeds}, dense {a.epochs} epochs, fine-tune {a.finetune} epochs; "
        f"torch {torch.__version__}; {time.perf_counter() - t0:.0f} s"
    )
    print("| model | params | one-shot acc % | one-shot + BN recalibration | fine-tuned acc % |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {sizes[name]:,} | {cell(r['one-shot'])} | {cell(r['recal'])} "
            f"| {cell(r['fine-tuned'])} |"
        )


if __name__ == "__main__":
    main()
