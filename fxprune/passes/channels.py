"""Channel pass: remove whole channel units (CNN channels, and MLP neurons unless the FFN pass
runs) per group or ranked globally, by importance, with kept counts aligned to a fixed
multiple (``round_to=8``) or to the count the target backend runs fastest (``round_to="auto"``).

``round_to="auto"``: for each group, the candidate kept counts are the plain count the ratio
asks for and the nearest multiples of 8, 16 and 32 channels at or above it (never fewer
channels than the ratio keeps: more channels cost no accuracy). Each candidate is priced by
timing the group's layers at that width on ``round_backend`` (``fxprune.layer_timing``): the
layers that produce the group's channels at that output width, the ones that consume them at
that input width, the other dims at the width their own group's ratio asks for. The cheapest
wins; candidates within ``AUTO_TIE`` / ``AUTO_TIE_MS`` of it count as ties and the fewest
channels win those. A backend whose whole-graph layout needs conv channel counts in multiples of
``LayerTimer.layout_multiple()`` (ONNX Runtime's NCHWc: 4 on x86) prices only those for groups
with convs: a count outside it makes the neighbouring layers pay layout reorders that one layer
timed alone never shows (measured on ResNet-50: auto without this lost to ``round_to=8``). The plan records the kept indices (and the price table under
``"round_auto"``), so replaying it measures nothing. Layers are timed at the example input's
shapes, with ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fxprune.errors import ConfigError, NothingToPruneError
from fxprune.graph.depgraph import DependencyGraph, Group
from fxprune.layer_timing import LayerShape, layer_shape, resolve_timer, time_layer
from fxprune.passes import PassResult, register_pass
from fxprune.passes.units import UnitSelection, group_name, group_ratios, prune_units

AUTO_MULTIPLES = (8, 16, 32)
"""Channel multiples ``round_to="auto"`` considers besides the plain count."""

AUTO_TIE, AUTO_TIE_MS = 0.03, 0.005
"""Candidates priced within 3 % or 5 microseconds of the cheapest (whichever is more) are ties,
and the fewest channels win them: smaller gaps are within what one layer's timing repeats to
on a quiet CPU (a few microseconds of call overhead on the smallest layers)."""


@dataclass(frozen=True)
class Channels(UnitSelection):
    """Options of the channel pass (see :class:`UnitSelection` for the shared ones).

    Args:
        round_to: kept channels per group are a multiple of this (hardware alignment), or
            ``"auto"``: the count among the plain one and the next multiples of 8 / 16 / 32
            that runs fastest on ``round_backend`` (see the module docstring).
        min_channels: never keep fewer channels than this in a group.
        kinds: the group kinds pruned: ``("channels", "ffn")`` by default; ``("channels",)``
            when the FFN pass owns the MLP neurons.
        round_backend: the layer timer ``round_to="auto"`` measures on: ``"torch"`` (eager on
            the CPU), ``"onnxruntime"`` or a name registered with
            ``@fxprune.layer_timing.layer_timer``.
    """

    round_to: int | str = 1
    min_channels: int = 1
    kinds: tuple[str, ...] = ("channels", "ffn")
    round_backend: str = "torch"

    name = "channels"
    option = "channels"
    pricer: ClassVar[AutoRound | None] = None  # set on a run's copy by prune_channels

    def __post_init__(self):
        super().__post_init__()
        ok = self.round_to == "auto" or (
            isinstance(self.round_to, int)
            and not isinstance(self.round_to, bool)
            and self.round_to >= 1
        )
        if not ok:
            raise ConfigError(f"round_to={self.round_to!r}: must be an integer >= 1 or 'auto'")
        if not (isinstance(self.min_channels, int) and self.min_channels >= 1):
            raise ConfigError(f"min_channels={self.min_channels!r}: must be an integer >= 1")
        resolve_timer(self.round_backend)  # a ConfigError naming the registered timers
        if self.round_backend != "torch" and self.round_to != "auto":
            raise ConfigError(
                f"round_backend={self.round_backend!r} times layers for round_to='auto' only; "
                f"with round_to={self.round_to!r} nothing is timed"
            )

    def units_to_keep(self, group: Group, ratio: float) -> int:
        """How many units of a group stay, honouring round_to and min_channels."""
        n, width = len(group.units), group.width
        keep = n - int(math.floor(n * ratio + 1e-9))
        if self.round_to == "auto":
            keep = min(n, max(keep, self.min_units(group), 1))
            # without a graph to measure on (a count asked for outside the pass): the plain count
            return self.pricer.choose(group, keep) if self.pricer is not None else keep
        step = math.lcm(width, self.round_to) // width  # units per aligned step of channels
        keep = min(n, max(step, math.ceil(keep / step) * step))
        return max(keep, self.min_units(group))

    def min_units(self, group: Group) -> int:
        return min(len(group.units), math.ceil(self.min_channels / group.width))


def auto_candidates(n: int, width: int, keep: int) -> list[int]:
    """Kept unit counts ``round_to="auto"`` prices for a group of ``n`` units of ``width``
    channels whose ratio keeps ``keep``: that count and the next multiples of
    :data:`AUTO_MULTIPLES` channels (at most all ``n``), ascending."""
    out = {keep}
    for m in AUTO_MULTIPLES:
        step = math.lcm(width, m) // width
        out.add(min(n, math.ceil(keep / step) * step))
    return sorted(out)


def cheapest(prices: dict[int, float], tie: float = AUTO_TIE, tie_ms: float = AUTO_TIE_MS) -> int:
    """The fewest-channel candidate priced within ``tie`` (relative) or ``tie_ms`` of the
    cheapest."""
    best = min(prices.values())
    return min(k for k, p in prices.items() if p <= best + max(best * tie, tie_ms))


@dataclass
class _Layer:
    """A Conv / Linear call of the graph and which groups its output / input channels are in
    (group id -> number of channels; -1: channels no group removes)."""

    shape: LayerShape
    out: Counter
    inp: Counter


class AutoRound:
    """Prices candidate kept counts of ``graph``'s groups on ``cfg.round_backend``;
    ``table`` keeps what it measured (group id -> plain and kept channels, ms per candidate)."""

    def __init__(self, graph: DependencyGraph, cfg: Channels, threads: int | None = None):
        self.graph, self.cfg, self.threads = graph, cfg, threads
        self.timer = resolve_timer(cfg.round_backend)
        self.table: dict[int, dict] = {}
        self._layers: list[_Layer] | None = None
        self._frac: dict[int, float] = {}

    def choose(self, group: Group, keep: int) -> int:
        """The candidate count (in units) the timings say is fastest for ``group``."""
        n = len(group.units)
        cands = auto_candidates(n, group.width, keep)
        layers = [la for la in self.layers() if group.id in la.out or group.id in la.inp]
        if not layers:
            return keep
        step = self.timer.layout_multiple() if any(la.shape.kind == "conv" for la in layers) else 1
        on_step = [k for k in cands if k * group.width % step == 0]
        cands, step = (on_step, step) if on_step else (cands, 1)
        if len(cands) == 1:  # nothing to choose between: nothing to time
            return cands[0]
        prices = {k: sum(self._ms(la, group.id, k / n) for la in layers) for k in cands}
        pick = cheapest(prices)
        self.table[group.id] = {
            "plain": keep * group.width,
            "kept": pick * group.width,
            "ms": {str(k * group.width): round(ms, 4) for k, ms in prices.items()},
        }
        if step > 1:
            self.table[group.id]["layout_multiple"] = step
        return pick

    def _ms(self, la: _Layer, gid: int, frac: float) -> float:
        def width(entries: Counter) -> int | None:
            if not entries:
                return None
            f = {**self._frac, gid: frac}
            return max(1, round(sum(c * f.get(g, 1.0) for g, c in entries.items())))

        shape = la.shape.with_channels(width(la.out), width(la.inp))
        if shape is None:
            return 0.0
        return time_layer(shape, self.timer, self.threads)

    def layers(self) -> list[_Layer]:
        """Every Conv / Linear call whose shape is known, with its groups (built once)."""
        if self._layers is not None:
            return self._layers
        g = self.graph
        unit_group = np.full(g.n_atoms, -1, dtype=np.int64)
        for grp in g.groups:
            unit_group[grp.units] = grp.id
        for gid, r in group_ratios(g, self.cfg).items():
            grp = next(x for x in g.groups if x.id == gid)
            n = len(grp.units)
            self._frac[gid] = (n - math.floor(n * r + 1e-9)) / n if r else 1.0
        nodes = {node.name: node for node in g.gm.graph.nodes}
        self._layers = []
        for s in g.sources:
            shape = layer_shape(g.gm, nodes[s.node]) if s.node in nodes else None
            if shape is None or shape.out_channels != s.size:
                continue
            out = Counter(unit_group[g.label[s.start : s.start + s.size]].tolist())
            inp: Counter = Counter()
            dims = [pd for pd in g.params.get(s.param, {}).values() if pd.consumer]
            if len(dims) == 1 and len(dims[0].vec) == shape.in_channels and not shape.depthwise:
                vec = dims[0].vec
                gids = np.where(vec >= 0, unit_group[g.label[np.maximum(vec, 0)]], -1)
                inp = Counter(gids.tolist())
            self._layers.append(_Layer(shape, out, inp))
        return self._layers


def priced(cfg: Channels, graph: DependencyGraph) -> Channels:
    """A copy of ``cfg`` whose ``units_to_keep`` prices candidates on ``graph``."""
    import copy

    run = copy.copy(cfg)
    object.__setattr__(run, "pricer", AutoRound(graph, cfg))
    return run


def prune_aligned(graph: DependencyGraph, cfg: Channels, args: tuple) -> PassResult:
    """:func:`prune_units` for the channel and FFN passes: with ``round_to="auto"`` (and no
    plan to replay) the counts are priced on the graph and the plan entry records the table."""
    if cfg.round_to != "auto" or cfg.kept is not None:
        return prune_units(graph, cfg, args)
    run = priced(cfg, graph)
    table = run.pricer.table
    by_id = {grp.id: grp for grp in graph.groups}
    try:
        res = prune_units(graph, run, args)
    except NothingToPruneError as e:
        if not table:
            raise
        timed = "; ".join(
            f"{group_name(graph, by_id[gid])}: "
            + ", ".join(f"{c} ch {ms} ms" for c, ms in t["ms"].items())
            for gid, t in table.items()
        )
        raise NothingToPruneError(
            f"{e}. round_to='auto' timed every group fastest at its full width on "
            f"{cfg.round_backend} ({timed}): on this machine pruning them would not run faster; "
            "a fixed round_to (e.g. 8) prunes regardless"
        ) from e
    if res.changed and table:
        res.plan["round_auto"] = {
            "backend": cfg.round_backend,
            "groups": {group_name(graph, by_id[gid]): t for gid, t in table.items()},
        }
    return res


@register_pass("channels", Channels, lambda e: Channels(kept=e["kept"]))
def prune_channels(graph: DependencyGraph, cfg: Channels, args: tuple) -> PassResult:
    """Remove channel units from ``graph.gm`` (in place) and say which channels each layer kept."""
    return prune_aligned(graph, cfg, args)
