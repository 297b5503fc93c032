"""What fxprune's training loop (``fxprune.heal``) needs around the optimizer: batches read
lazily (a list cycled, an iterator stopped), the warmup + cosine learning-rate factor, the
torch.distributed world, FSDP2 sharding of a model's repeated stack, and a value averaged over
ranks."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from fxprune.errors import ConfigError
from fxprune.trainmasks import is_dtensor


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def wants_shard(shard, world) -> bool:
    if shard is None:
        return world > 1
    if not shard and world > 1:
        raise ConfigError(
            f"shard=False under torch.distributed with {world} processes: each would train its "
            "own copy with no gradient sync; leave shard=None (FSDP2) or heal in one process"
        )
    if shard and world == 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "shard=True needs torch.distributed initialised (launch with torchrun and call "
                "torch.distributed.init_process_group)"
            )
    return bool(shard)


def shard(model: nn.Module) -> None:
    """FSDP2: each block of the model's repeated stack (its longest ModuleList), then the root;
    a model whose parameters are already DTensors is left as it is."""
    from torch.distributed.fsdp import fully_shard

    if any(is_dtensor(p) for p in model.parameters()):
        return
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if lists:
        for block in max(lists, key=len):
            fully_shard(block)
    fully_shard(model)


class Batches:
    """Read batches lazily; cycle a re-iterable, stop when an iterator runs out."""

    def __init__(self, batches):
        if isinstance(batches, (torch.Tensor, Mapping)):
            raise ConfigError("batches: give a list (or iterable) of batches, not one batch")
        try:
            self.it = iter(batches)
        except TypeError:
            raise ConfigError(
                f"batches: got {type(batches).__name__}; give a list or iterable of batches"
            ) from None
        self.source = batches
        self.reiterable = self.it is not batches
        self.epochs = 1
        self.seen = 0
        self.first = next(self.it, None)  # an empty source is refused before any work
        if self.first is None:
            raise ConfigError("batches: no batch to train on")

    def next(self):
        if self.first is not None:
            b, self.first = self.first, None
        else:
            b = next(self.it, None)
            if b is None and self.reiterable:  # a list: another pass over it
                self.it, self.epochs = iter(self.source), self.epochs + 1
                b = next(self.it, None)
            if b is None:
                return None
        self.seen += 1
        return b


def mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return float(value)
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world


def lr_lambda(schedule, warmup, steps):
    def f(step):  # step = optimizer steps taken so far
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        done = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return f
