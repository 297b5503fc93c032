"""scikit-learn's real `digits` data set (1797 handwritten 8x8 digits) and a small residual CNN
trained on it from scratch on a CPU: shared by the digits benchmark, its test and the example."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def load(seed: int = 0, test_fraction: float = 0.25):
    """(x_train, y_train, x_test, y_test): images scaled to [0, 1] as [N, 1, 8, 8], a split
    stratified by class with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(
        x, d.target, test_size=test_fraction, random_state=seed, stratify=d.target
    )
    t = torch.from_numpy
    return t(xtr), t(ytr).long(), t(xte), t(yte).long()


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetDigits(nn.Module):
    """stem 32 -> 2 residual blocks -> stride-2 conv to 64 -> 1 residual block -> pool -> fc."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stage1 = nn.Sequential(Block(width), Block(width))
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.stage2 = Block(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return 100.0 * acc


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float = 3e-3,
    seed: int = 0,
    batch: int = 64,
    masks_hook=None,
) -> nn.Module:
    """Adam with cosine decay and light augmentation (1-pixel shifts); in place.
    ``masks_hook(optimizer)`` (e.g. ``step.keep_masks``) keeps N:M masks fixed."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    hook = masks_hook(opt) if masks_hook is not None else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * (len(x) // batch)))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            xb = x[idx]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            opt.zero_grad()
            F.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
            sched.step()
    if hook is not None:
        hook.remove()
    model.eval()
    return model


def gate_trainer(
    x: torch.Tensor, y: torch.Tensor, steps: int = 300, lr: float = 0.02, batch: int = 64, seed=0
):
    """A ``train_fn`` for ``importance="learned"``: ``steps`` Adam steps on the gates alone
    (the model's weights stay frozen), cross-entropy on random batches of ``(x, y)``; fxprune
    adds the gates' L1 penalty."""

    def train_fn(gated):
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(gated.parameters(), lr=lr)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            opt.zero_grad()
            F.cross_entropy(gated(x[idx]), y[idx]).backward()
            opt.step()

    return train_fn


def trained_model(seed: int = 0, epochs: int = 30):
    """(model, data): a ResNetDigits trained from scratch with a fixed seed."""
    data = load(seed)
    torch.manual_seed(seed)
    model = ResNetDigits()
    train(model, data[0], data[1], epochs, seed=seed)
    return model, data


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
