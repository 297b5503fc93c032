"""The whole workflow on real data (scikit-learn's handwritten digits), about a minute on 2 cores:
train -> analyse sensitivity -> prune to half the MACs (+ 2:4) -> prove -> fine-tune with the
2:4 masks fixed -> export ONNX -> measure dense vs pruned latency.

python examples/digits_workflow.py
"""

import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import fxprune

torch.manual_seed(0)
d = load_digits()  # 1797 real 8x8 handwritten digits, shipped with scikit-learn
x, y = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None], torch.tensor(d.target)
xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]


def block(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = block(1, 32), block(32, 32), block(32, 32)
        self.down, self.c = block(32, 64, 2), block(64, 64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b(F.relu(self.a(x))))  # a residual block
        x = F.relu(self.down(x))
        return self.fc(F.relu(x + self.c(x)).mean((2, 3)))


def fit(model, epochs, lr, hook=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    handle = hook(opt) if hook else None  # keeps 2:4 masks fixed while training
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    handle and handle.remove()
    return model.eval()


def acc(model):
    with torch.no_grad():
        return 100 * float((model(xte).argmax(1) == yte).float().mean())


dense = fit(Net(), epochs=15, lr=3e-3)
print(f"dense: {acc(dense):.2f} % on {len(xte)} held-out digits")

# 1. analyse: which groups can lose channels cheaply? (accuracy on training data: no test leak;
#    each pruned copy gets its BatchNorm statistics re-estimated first, no training)
train_acc = lambda m: 100 * float((m(xtr).argmax(1) == ytr).float().mean())  # noqa: E731
sens = fxprune.sensitivity(
    dense, xtr[:2], train_acc, ratios=(0.25, 0.5, 0.75), ignore=["fc"], recalibrate=[xtr[:700]]
)
print(sens.table())

# 2. prune to half the MACs where it hurts least, then 2:4 on top; prove it
ratios = sens.ratios_for_target(0.5, by="macs")
result = fxprune.compile(dense, xtr[:2], **ratios, ignore=["fc"], sparsity="2:4")
proof = fxprune.verify.equivalence(dense, result, xtr[:2])
print(proof)
pruned = result.module
print(f"pruned: MACs x{result.summary.macs_ratio:.2f}, one shot {acc(pruned):.2f} %")

# 3. fine-tune briefly with the 2:4 masks held
fit(
    pruned,
    epochs=5,
    lr=1e-3,
    hook=lambda opt: fxprune.passes.nm.keep_masks(pruned, result.nm_masks, opt),
)
print(f"fine-tuned: {acc(pruned):.2f} % (dense {acc(dense):.2f} %)")

# 4. export (checked, ORT parity, 2:4 audit) and 5. measure on ONNX Runtime
with tempfile.TemporaryDirectory() as tmp:
    print(result.export(Path(tmp) / "digits.onnx", xtr[:2]).table())
lat = fxprune.verify.latency(dense, result, xtr[:2], batch_sizes=(64,), repeats=20)
print(lat.table())
