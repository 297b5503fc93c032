"""Prune half the channels of a ResNet-50, prove it exact, save it and load it back.

python examples/prune_resnet.py
"""

import tempfile
from pathlib import Path

import torch
import torchvision

import fxprune

torch.manual_seed(0)
model = torchvision.models.resnet50().eval()  # random weights: nothing is downloaded
x = torch.randn(2, 3, 224, 224)

result = fxprune.compile(model, x, channels=0.5, importance="l1", ignore=["fc"], round_to=8)
print(result.report())

proof = fxprune.verify.equivalence(model, result, x)
print("\n", proof)
assert proof.ok

with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "resnet50-pruned.pt"
    result.save(path)  # plan (JSON) + state_dict; no pickled code
    again = fxprune.load(path, torchvision.models.resnet50().eval())
    torch.testing.assert_close(again.module(x), result.module(x))
    print(f"saved and reloaded from {path.name}: same outputs")
