"""Masks held while a pruned model trains (``fxprune.heal``): found on a result or from the
zeros of pruned weights, laid out like their parameters once FSDP2 shards them, gradients masked
before each step (so the optimizer keeps no state for them) and weights re-zeroed after it."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fxprune.errors import ConfigError

# a weight at least this much exact zeros is a pruned one: its zeros are held (N:M leaves 50 %,
# unstructured its ratio; a trained dense weight has essentially none)
ZERO_FRACTION = 0.10


def find_masks(model: nn.Module, masks) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """Parameter name -> (parameter, bool mask of the weights that stay)."""
    params = dict(model.named_parameters())
    if masks is None:  # a plain module: the zeros of its pruned weights (any matrix or kernel:
        # a GraphModule's weights are parameters without Linear modules around them)
        out = {}
        for name, p in params.items():
            if p.dim() >= 2:
                zeros = p.detach() == 0
                if zeros.float().mean() >= ZERO_FRACTION:
                    out[name] = (p, ~zeros)
        return out
    if not isinstance(masks, Mapping):
        raise ConfigError(f"masks: got {type(masks).__name__}; give a dict name -> bool tensor")
    out = {}
    for name, mask in masks.items():
        p = params.get(name)
        if p is None:
            raise ConfigError(f"masks: {name!r} is not a parameter of the model")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(p.shape):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ConfigError(f"masks[{name!r}]: shape {shape} does not fit {tuple(p.shape)}")
        out[name] = (p, mask.to(device=p.device, dtype=torch.bool))
    return out


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def place_masks(model, held):
    """Masks laid out like their parameters (a shard of each on every rank once sharded); the
    parameter objects are looked up again because ``fully_shard`` replaces them."""
    params = dict(model.named_parameters())
    out = {}
    for name, (_, mask) in held.items():
        p = params[name]
        if is_dtensor(p) and not is_dtensor(mask):  # found on a sharded weight: already laid out
            from torch.distributed.tensor import distribute_tensor

            mask = distribute_tensor(mask.to(p.device), p.device_mesh, p.placements)
        out[name] = (p, mask)
    return out


def mask_grads(held) -> None:
    with torch.no_grad():
        for p, m in held.values():
            if p.grad is not None:
                g = p.grad
                if is_dtensor(g):
                    g, m = g.to_local(), m.to_local()
                g.masked_fill_(~m, 0)  # not mul_: a NaN or inf times 0 stays NaN


def hold(held) -> int:
    """Zero every masked weight again; returns how many had moved off zero."""
    revived = 0
    with torch.no_grad():
        for p, m in held.values():
            if is_dtensor(p):
                p, m = p.to_local(), m.to_local()
            revived += int(((p != 0) & ~m).sum())
            p.masked_fill_(~m, 0)
    return revived
