"""Channel pass: remove whole channel units per group (or ranked globally) by importance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fxprune._util import module_matches
from fxprune.errors import ConfigError, PlanError
from fxprune.graph.depgraph import DependencyGraph
from fxprune.graph.rewrite import apply_removal
from fxprune.importance import CRITERIA, group_mean, unit_scores
from fxprune.passes import PassResult


@dataclass(frozen=True)
class Channels:
    """Options of the channel pass; validated on construction.

    Args:
        ratio: fraction of each group's channels to remove, in [0, 1).
        importance: one of ``fxprune.importance.CRITERIA``.
        ignore: module names (globs or parent modules allowed) whose output channels stay: a
            source layer, or a norm/PReLU/scale indexed by the channels; not a layer that only
            consumes them.
        layer_ratios: ``{module name or glob: ratio}`` overriding ``ratio`` for the groups that
            contain a matching layer (first match wins).
        round_to: kept channels per group are a multiple of this (hardware alignment).
        min_channels: never keep fewer channels than this in a group.
        global_ranking: rank units of all groups together (scores normalised by group mean)
            and remove ``ratio`` of all prunable channels.
        seed: for ``importance="random"``.
        kept: replay mode: ``{layer: kept output indices}`` from a saved plan.
    """

    ratio: float = 0.0
    importance: str = "l1"
    ignore: tuple[str, ...] = ()
    layer_ratios: tuple[tuple[str, float], ...] = ()
    round_to: int = 1
    min_channels: int = 1
    global_ranking: bool = False
    seed: int = 0
    kept: dict | None = field(default=None, compare=False, hash=False)

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio < 1.0):
            raise ConfigError(f"channels={self.ratio!r}: the fraction removed must be in [0, 1)")
        for name, r in self.layer_ratios:
            if not (isinstance(r, (int, float)) and 0.0 <= r < 1.0):
                raise ConfigError(f"layer_ratios[{name!r}]={r!r}: must be in [0, 1)")
        if self.importance not in CRITERIA:
            raise ConfigError(f"importance={self.importance!r}: choose one of {CRITERIA}")
        if not (isinstance(self.round_to, int) and self.round_to >= 1):
            raise ConfigError(f"round_to={self.round_to!r}: must be an integer >= 1")
        if not (isinstance(self.min_channels, int) and self.min_channels >= 1):
            raise ConfigError(f"min_channels={self.min_channels!r}: must be an integer >= 1")


def channel_holders(graph: DependencyGraph) -> dict[int, set[str]]:
    """Per group: modules whose outputs carry its channels. Those are the sources, plus the
    norms, PReLUs and scales whose parameters are indexed by them, but not the layers that only
    consume them (a classifier's input columns)."""
    unit_group = np.full(graph.n_atoms, -1, dtype=np.int64)
    for g in graph.groups:
        unit_group[g.units] = g.id
    holders: dict[int, set[str]] = {g.id: set(g.layers(graph)) for g in graph.groups}
    for name, dims in graph.params.items():
        module = name.rsplit(".", 1)[0] if "." in name else ""
        for pd in dims.values():
            vec = pd.vec[pd.vec >= 0]
            if pd.consumer or not vec.size:
                continue
            for gid in np.unique(unit_group[graph.label[vec]]):
                if gid >= 0:
                    holders[int(gid)].add(module)
    return holders


def group_ratios(graph: DependencyGraph, cfg: Channels) -> dict[int, float | None]:
    """The ratio of each group; None when an ignored module holds its channels."""
    holders = channel_holders(graph) if cfg.ignore else {}
    out = {}
    for g in graph.groups:
        layers = g.layers(graph)
        if any(module_matches(m, p) for m in holders.get(g.id, ()) for p in cfg.ignore):
            out[g.id] = None
            continue
        out[g.id] = next(
            (r for pat, r in cfg.layer_ratios if any(module_matches(la, pat) for la in layers)),
            cfg.ratio,
        )
    return out


def units_to_keep(n_units: int, width: int, ratio: float, cfg: Channels) -> int:
    """How many units of a group stay, honouring round_to and min_channels."""
    keep = n_units - int(math.floor(n_units * ratio + 1e-9))
    step = math.lcm(width, cfg.round_to) // width  # units per aligned step of channels
    keep = min(n_units, max(step, math.ceil(keep / step) * step))
    keep = max(keep, min(n_units, math.ceil(cfg.min_channels / width)))
    return keep


def select_units(graph: DependencyGraph, cfg: Channels) -> tuple[list[int], dict]:
    scores = unit_scores(graph, cfg.importance, cfg.seed)
    removed: list[int] = []
    per_group = {}
    ratios = group_ratios(graph, cfg)
    if not cfg.global_ranking:
        for g in graph.groups:
            r = ratios[g.id]
            if not r:
                continue
            keep = units_to_keep(len(g.units), g.width, r, cfg)
            order = sorted(g.units, key=lambda u: scores[u])
            drop = order[: len(g.units) - keep]
            removed += drop
            per_group[g.id] = len(drop)
        return removed, per_group
    # Global: normalise by group mean so layers of different scale compete fairly.
    cands, budget = [], 0
    for g in graph.groups:
        if ratios[g.id] is None:
            continue
        mean = group_mean(scores, g)
        cands += [(scores[u] / mean, g.id, u) for u in g.units]
        budget += len(g.units) * g.width
    target = int(math.floor(budget * cfg.ratio + 1e-9))
    by_id = {g.id: g for g in graph.groups}
    left = {g.id: len(g.units) for g in graph.groups}
    done = 0
    for _, gid, u in sorted(cands):
        if done >= target:
            break
        g = by_id[gid]
        if left[gid] - 1 < max(1, math.ceil(cfg.min_channels / g.width)):
            continue
        left[gid] -= 1
        removed.append(u)
        done += g.width
        per_group[gid] = per_group.get(gid, 0) + 1
    if cfg.round_to > 1:  # give back the best removed units until each group is aligned
        final = []
        for g in graph.groups:
            drop = sorted((u for u in removed if u in set(g.units)), key=lambda u: scores[u])
            if not drop:
                continue
            ratio = len(drop) / len(g.units)
            keep = units_to_keep(len(g.units), g.width, ratio, cfg)
            drop = drop[: len(g.units) - keep]
            per_group[g.id] = len(drop)
            final += drop
        removed = final
    return removed, per_group


def units_from_kept(graph: DependencyGraph, kept: dict[str, list[int]]) -> list[int]:
    """Replay a plan: the units holding any output channel a layer did not keep."""
    by_layer = {}
    for s in graph.sources:
        by_layer.setdefault(s.layer, s)
    missing = [name for name in kept if name not in by_layer]
    if missing:
        raise PlanError(f"plan names layers this model does not have: {missing[:5]}")
    drop_atoms = []
    for name, idx in kept.items():
        s = by_layer[name]
        mask = np.ones(s.size, dtype=bool)
        mask[np.asarray(idx, dtype=np.int64)] = False
        drop_atoms.append(s.start + np.nonzero(mask)[0])
    atoms = np.concatenate(drop_atoms) if drop_atoms else np.zeros(0, dtype=np.int64)
    units = sorted(set(graph.label[atoms].tolist()))
    prunable = {u for g in graph.groups for u in g.units}
    bad = [u for u in units if u not in prunable]
    if bad:
        raise PlanError(
            "plan removes channels that this model's graph cannot remove exactly "
            f"({len(bad)} units); was it made for another architecture?"
        )
    return units


def kept_by_layer(graph: DependencyGraph, units: list[int]) -> dict[str, list[int]]:
    removed = graph.removed_mask(units)[:-1]
    kept = {}
    for s in graph.sources:
        m = removed[s.start : s.start + s.size]
        if m.any() and s.layer not in kept:
            kept[s.layer] = np.nonzero(~m)[0].tolist()
    return kept


def prune_channels(graph: DependencyGraph, cfg: Channels, args: tuple) -> PassResult:
    """Remove channel units from ``graph.gm`` (in place) and say which channels each layer kept."""
    if cfg.kept is not None:
        units, per_group = units_from_kept(graph, cfg.kept), {}
    else:
        units, per_group = select_units(graph, cfg)
    if not units:
        return PassResult("channels", changed=False)
    kept = kept_by_layer(graph, units)
    removed = graph.removed_mask(units)
    zero = {}
    for name, dims in graph.params.items():
        for d, pd in dims.items():
            if pd.consumer and removed[pd.vec].any():
                zero.setdefault(name, {})[d] = ~removed[pd.vec]
    approx = sum(1 for g in graph.groups if g.approximate and per_group.get(g.id))
    keeps = apply_removal(graph, units, args)
    return PassResult(
        "channels",
        changed=True,
        removed_units=units,
        zero=zero,
        approximate_groups=approx,
        details={"groups_pruned": sum(1 for v in per_group.values() if v)},
        keeps=keeps,
        plan={"name": "channels", "kept": kept},
    )
