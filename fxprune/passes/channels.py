"""Channel pass: remove whole channel units (CNN channels, and MLP neurons unless the FFN pass
runs) per group or ranked globally, by importance."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fxprune.errors import ConfigError
from fxprune.graph.depgraph import DependencyGraph, Group
from fxprune.passes import PassResult, register_pass
from fxprune.passes.units import UnitSelection, prune_units


@dataclass(frozen=True)
class Channels(UnitSelection):
    """Options of the channel pass (see :class:`UnitSelection` for the shared ones).

    Args:
        round_to: kept channels per group are a multiple of this (hardware alignment).
        min_channels: never keep fewer channels than this in a group.
        kinds: the group kinds pruned: ``("channels", "ffn")`` by default; ``("channels",)``
            when the FFN pass owns the MLP neurons.
    """

    round_to: int = 1
    min_channels: int = 1
    kinds: tuple[str, ...] = ("channels", "ffn")

    name = "channels"
    option = "channels"

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.round_to, int) and self.round_to >= 1):
            raise ConfigError(f"round_to={self.round_to!r}: must be an integer >= 1")
        if not (isinstance(self.min_channels, int) and self.min_channels >= 1):
            raise ConfigError(f"min_channels={self.min_channels!r}: must be an integer >= 1")

    def units_to_keep(self, group: Group, ratio: float) -> int:
        """How many units of a group stay, honouring round_to and min_channels."""
        n, width = len(group.units), group.width
        keep = n - int(math.floor(n * ratio + 1e-9))
        step = math.lcm(width, self.round_to) // width  # units per aligned step of channels
        keep = min(n, max(step, math.ceil(keep / step) * step))
        return max(keep, self.min_units(group))

    def min_units(self, group: Group) -> int:
        return min(len(group.units), math.ceil(self.min_channels / group.width))


@register_pass("channels", Channels, lambda e: Channels(kept=e["kept"]))
def prune_channels(graph: DependencyGraph, cfg: Channels, args: tuple) -> PassResult:
    """Remove channel units from ``graph.gm`` (in place) and say which channels each layer kept."""
    return prune_units(graph, cfg, args)
