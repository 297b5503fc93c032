"""Small, fast versions of the digits demonstrations (real handwritten digits from scikit-learn):
fxprune's L1 selection equals torch-pruning's, fine-tuning recovers the accuracy, BatchNorm
recalibration rescues one-shot accuracy, and SparseGPT 2:4 beats magnitude 2:4 one shot."""

import pytest
import torch
import torch.nn.functional as F

import fxprune
from benchmarks._digits import accuracy, clone, train, trained_model
from fxprune.calibration import recalibrate_bn

pytest.importorskip("sklearn")
pytestmark = pytest.mark.slow  # trains a CNN on the real digits (seconds idle, minutes loaded)


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(2)
    return trained_model(seed=0, epochs=10)


def test_dense_model_learns_the_digits(digits):
    model, (_, _, xte, yte) = digits
    assert accuracy(model, xte, yte) > 96.0


def test_l1_selection_matches_torch_pruning_and_fine_tuning_recovers(digits):
    tp = pytest.importorskip("torch_pruning")
    model, (xtr, ytr, xte, yte) = digits
    res = fxprune.compile(model, xtr[:2], channels=0.5, ignore=["fc"])
    assert fxprune.verify.equivalence(model, res, xtr[:2]).ok
    peer = clone(model)
    tp.pruner.MetaPruner(
        peer,
        xtr[:2],
        tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[peer.fc],
    ).step()
    with torch.no_grad():
        torch.testing.assert_close(res.module(xte), peer.eval()(xte))  # the same channels
    train(res.module, xtr, ytr, 4, lr=1e-3)
    assert accuracy(res.module, xte, yte) >= accuracy(model, xte, yte) - 2.0


def test_bn_recalibration_rescues_one_shot_accuracy(digits):
    model, (xtr, _, xte, yte) = digits
    res = fxprune.compile(model, xtr[:2], channels=0.5, ignore=["fc"])
    before = accuracy(res.module, xte, yte)
    after = accuracy(recalibrate_bn(res.module, [xtr[:512], xtr[512:1024]]), xte, yte)
    assert after > before + 15
    bn = model.stem[1]
    mean = bn.running_mean.clone()
    recalibrate_bn(clone(model), [xtr[:64]])
    assert torch.equal(bn.running_mean, mean)  # a copy was recalibrated, not the model


def test_sparsegpt_beats_magnitude_2_4_one_shot(digits):
    model, (xtr, ytr, xte, yte) = digits
    acc = {}
    for method in ("magnitude", "sparsegpt"):
        res = fxprune.compile(
            model, xtr[:2], sparsity="2:4", sparsity_method=method, calibration=[xtr[:512]]
        )
        acc[method] = accuracy(res.module, xte, yte)
    assert acc["sparsegpt"] > acc["magnitude"]
    assert acc["sparsegpt"] >= accuracy(model, xte, yte) - 3.0


def test_taylor_with_labels_through_loss_fn(digits):
    model, (xtr, ytr, xte, yte) = digits
    res = fxprune.compile(
        model,
        xtr[:2],
        channels=0.5,
        ignore=["fc"],
        importance="taylor",
        calibration=[xtr[:256]],
        loss_fn=lambda out, batch: F.cross_entropy(out, ytr[:256]),
    )
    assert res.passes[0].details["taylor_loss"] == "user loss_fn"  # not the output proxy
    assert fxprune.verify.equivalence(model, res, xtr[:2]).ok
