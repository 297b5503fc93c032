"""What the channel, head and FFN passes share: pick units of the dependency graph's groups by
importance (a ratio per group, or ranked across groups) and remove them.

The three passes differ only in which groups they look at (``Group.kind``: ``"channels"``,
``"heads"``, ``"ffn"``) and in how many units a group must keep, so they are one mechanism with
three small configs (``channels.py``, ``heads.py``, ``ffn.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fxprune._util import module_matches
from fxprune.calibration import as_batches, collect
from fxprune.errors import ConfigError, NothingToPruneError, PlanError
from fxprune.graph.depgraph import DependencyGraph, Group
from fxprune.graph.rewrite import apply_removal
from fxprune.importance import Criterion, group_mean, resolve, unit_scores
from fxprune.passes import PassResult, UnitsResult


@dataclass(frozen=True)
class UnitSelection:
    """Options every unit pass shares; validated on construction.

    Args:
        ratio: fraction of each group's units to remove, in [0, 1).
        importance: a registered criterion's name (``fxprune.importance.REGISTRY``) or a
            :class:`fxprune.importance.Criterion` instance.
        ignore: module names (globs or parent modules allowed) whose output channels stay.
        layer_ratios: ``{module name or glob: ratio}`` overriding ``ratio`` for the groups that
            contain a matching layer (first match wins).
        global_ranking: rank units of all groups together (scores normalised by group mean).
        seed: for ``importance="random"``.
        kept: replay mode: ``{layer: kept output indices}`` from a saved plan.
        calibration: batches for data-driven importance (default: the example inputs).
        loss_fn: ``loss_fn(output, batch) -> scalar`` for ``importance="taylor"``.
        train_fn: ``train_fn(gated_module)``, the user's training loop, for
            ``importance="learned"`` (soft gates per unit, read after it returns).
    """

    ratio: float = 0.0
    importance: str | Criterion = "l1"
    ignore: tuple[str, ...] = ()
    layer_ratios: tuple[tuple[str, float], ...] = ()
    global_ranking: bool = False
    seed: int = 0
    kept: dict | None = field(default=None, compare=False, hash=False)
    calibration: tuple | None = field(default=None, compare=False, hash=False)
    loss_fn: object = field(default=None, compare=False, hash=False)
    train_fn: object = field(default=None, compare=False, hash=False)

    name = "units"  # the pass name in plans and reports
    kinds: tuple[str, ...] = ()  # Group.kind values this pass prunes
    option = "ratio"  # the user-facing argument, for error messages

    def __post_init__(self):
        self.check_ratio()
        for name, r in self.layer_ratios:
            if not (isinstance(r, (int, float)) and 0.0 <= r < 1.0):
                raise ConfigError(f"layer_ratios[{name!r}]={r!r}: must be in [0, 1)")
        resolve(self.importance)  # a ConfigError naming the registered criteria

    def check_ratio(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio < 1.0):
            raise ConfigError(
                f"{self.option}={self.ratio!r}: the fraction removed must be in [0, 1)"
            )

    def units_to_keep(self, group: Group, ratio: float) -> int:
        """How many of ``group``'s units stay at ``ratio``."""
        n = len(group.units)
        return max(1, n - int(math.floor(n * ratio + 1e-9)))

    def min_units(self, group: Group) -> int:
        return 1


def channel_holders(graph: DependencyGraph) -> dict[int, set[str]]:
    """Per group: modules whose outputs carry its channels. Those are the sources, plus the
    norms, PReLUs and scales whose parameters are indexed by them, but not the layers that only
    consume them (a classifier's input columns)."""
    unit_group = np.full(graph.n_atoms, -1, dtype=np.int64)
    for g in graph.groups:
        unit_group[g.units] = g.id
    holders: dict[int, set[str]] = {g.id: set(g.layers(graph)) for g in graph.groups}
    atom_group = np.append(unit_group[graph.label], -1)  # NONE (-1) reads the last: no group
    for name, dims in graph.params.items():
        module = name.rsplit(".", 1)[0] if "." in name else ""
        for pd in dims.values():
            if pd.consumer:
                continue
            for gid in set(atom_group[pd.vec].tolist()):  # np.unique sorts: slower
                if gid >= 0:
                    holders[gid].add(module)
    return holders


def group_ratios(graph: DependencyGraph, cfg: UnitSelection) -> dict[int, float | None]:
    """The ratio of each group this pass prunes; None when it is not this pass's kind or an
    ignored module holds its channels."""
    holders = channel_holders(graph) if cfg.ignore else {}
    out = {}
    for g in graph.groups:
        if g.kind not in cfg.kinds:
            continue
        layers = g.layers(graph)
        if any(module_matches(m, p) for m in holders.get(g.id, ()) for p in cfg.ignore):
            out[g.id] = None
            continue
        out[g.id] = next(
            (r for pat, r in cfg.layer_ratios if any(module_matches(la, pat) for la in layers)),
            cfg.ratio,
        )
    return out


def select_units(
    graph: DependencyGraph, cfg: UnitSelection, args: tuple = (), info: dict | None = None
) -> tuple[list[int], dict]:
    """Units to remove and how many per group, by importance (``info`` receives the loss a
    Taylor score used)."""
    stats = None
    crit = resolve(cfg.importance)
    if crit.needs:
        batches = as_batches(cfg.calibration, args)
        stats = collect(graph, batches, {crit.needs}, cfg.loss_fn, train_fn=cfg.train_fn)
        if stats.loss and info is not None:
            info["taylor_loss"] = stats.loss
    removed: list[int] = []
    per_group: dict[int, int] = {}
    ratios = group_ratios(graph, cfg)
    by_id = {g.id: g for g in graph.groups}
    # score only the groups this pass may prune: a heads / FFN pass never reads the embedding,
    # lm_head or any other hidden-size weight
    ranked = [by_id[gid] for gid, r in ratios.items() if r is not None]
    scores = unit_scores(graph, crit, cfg.seed, stats, groups=ranked)
    if not cfg.global_ranking:
        for gid, r in ratios.items():
            g = by_id[gid]
            if not r:
                continue
            keep = cfg.units_to_keep(g, r)
            drop = sorted(g.units, key=lambda u: scores[u])[: len(g.units) - keep]
            removed += drop
            per_group[gid] = len(drop)
        return removed, per_group
    # Global: normalise by group mean so layers of different scale compete fairly.
    cands, budget = [], 0
    for gid, r in ratios.items():
        if r is None:
            continue
        g = by_id[gid]
        mean = 1.0 if crit.scale_free else group_mean(scores, g)
        cands += [(scores[u] / mean, gid, u) for u in g.units]
        budget += len(g.units) * g.width
    target = int(math.floor(budget * cfg.ratio + 1e-9))
    left = {gid: len(by_id[gid].units) for gid in ratios}
    done = 0
    for _, gid, u in sorted(cands):
        if done >= target:
            break
        g = by_id[gid]
        if left[gid] - 1 < cfg.min_units(g):
            continue
        left[gid] -= 1
        removed.append(u)
        done += g.width
        per_group[gid] = per_group.get(gid, 0) + 1
    # give back the best removed units until each group meets its alignment
    final = []
    for gid in ratios:
        g = by_id[gid]
        members = set(g.units)
        drop = sorted((u for u in removed if u in members), key=lambda u: scores[u])
        if not drop:
            continue
        keep = cfg.units_to_keep(g, len(drop) / len(g.units))
        drop = drop[: len(g.units) - keep]
        per_group[gid] = len(drop)
        final += drop
    return final, per_group


def check_kept(layer: str, idx, size: int) -> None:
    """A plan's kept output indices of ``layer`` (``size`` channels): distinct ints in range."""
    if not isinstance(idx, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in idx
    ):
        raise PlanError(f"plan: kept indices of {layer!r} must be a list of ints, got {idx!r:.80}")
    bad = sorted({i for i in idx if not 0 <= i < size})
    if bad:
        raise PlanError(
            f"plan: {layer!r} has {size} output channels but its kept indices include {bad[:5]}"
            f" (each must be in [0, {size}))"
        )
    if len(set(idx)) != len(idx):
        dup = sorted({i for i in idx if idx.count(i) > 1})
        raise PlanError(f"plan: kept indices of {layer!r} repeat {dup[:5]}")
    if not idx:
        raise PlanError(f"plan: {layer!r} keeps no output channels (a layer keeps at least one)")


def units_from_kept(graph: DependencyGraph, kept: dict[str, list[int]]) -> list[int]:
    """Replay a plan: the units holding any output channel a layer did not keep."""
    if not isinstance(kept, dict):
        raise PlanError(f"plan: 'kept' must map layer names to indices, got {type(kept).__name__}")
    by_layer = {}
    for s in graph.sources:
        by_layer.setdefault(s.layer, s)
    missing = [name for name in kept if name not in by_layer]
    if missing:
        raise PlanError(f"plan names layers this model does not have: {missing[:5]}")
    drop_atoms = []
    for name, idx in kept.items():
        s = by_layer[name]
        check_kept(name, idx, s.size)
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


def group_name(graph: DependencyGraph, g: Group) -> str:
    """A readable name for a group: the longest module prefix its layers share."""
    parts = [la.split(".") for la in g.layers(graph)]
    common = []
    for tokens in zip(*parts, strict=False):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    if common:
        return ".".join(common)
    layers = g.layers(graph)
    return "+".join(layers[:2]) + ("+..." if len(layers) > 2 else "")


def prune_units(graph: DependencyGraph, cfg: UnitSelection, args: tuple) -> PassResult:
    """Remove the selected units from ``graph.gm`` (in place); say what each layer kept."""
    info: dict = {}
    if cfg.kept is not None:  # replay
        units = units_from_kept(graph, cfg.kept)
    else:
        units, _ = select_units(graph, cfg, args, info)
        if not units and (cfg.ratio or cfg.layer_ratios):
            raise NothingToPruneError(nothing_removed(graph, cfg))
    res = remove_units(graph, units, args, cfg.name)
    res.taylor_loss = info.get("taylor_loss")
    return res


def remove_units(graph: DependencyGraph, units: list[int], args: tuple, name: str) -> UnitsResult:
    """Remove ``units`` (unit labels of ``graph``) from ``graph.gm`` in place, and report it as
    pass ``name``: what each layer kept (the plan entry that replays it through
    :func:`units_from_kept`), the consumer masks the proof zeroes, the count per group."""
    if not units:
        return UnitsResult(name, changed=False)
    kept = kept_by_layer(graph, units)
    removed = graph.removed_mask(units)
    zero = {}
    for param, dims in graph.params.items():
        for d, pd in dims.items():
            if pd.consumer and removed[pd.vec].any():
                zero.setdefault(param, {})[d] = ~removed[pd.vec]
    gone = set(units)
    per_group = {g.id: sum(1 for u in g.units if u in gone) for g in graph.groups}
    by_id = {g.id: g for g in graph.groups}
    approx = sum(1 for gid, n in per_group.items() if n and by_id[gid].approximate)
    units_per_group = {
        group_name(graph, by_id[gid]): [len(by_id[gid].units), len(by_id[gid].units) - n]
        for gid, n in per_group.items()
        if n
    }
    keeps = apply_removal(graph, units, args)
    return UnitsResult(
        name,
        changed=True,
        plan={"name": name, "kept": kept, "units": units_per_group},
        keeps=keeps,
        zero=zero,
        approximate_groups=approx,
        units=units_per_group,
    )


WHAT = {"channels": "channel", "ffn": "MLP neuron", "heads": "attention head"}


def nothing_removed(graph: DependencyGraph, cfg: UnitSelection) -> str:
    """Why a pass the user asked for removes nothing: no group of its kind, every group ignored,
    every channel blocked (a barrier, the model output), or a ratio that rounds to zero."""
    what = " / ".join(WHAT.get(k, k) for k in cfg.kinds)
    asked = f"{cfg.option}={cfg.ratio!r}" + (
        f" (layer overrides {dict(cfg.layer_ratios)})" if cfg.layer_ratios else ""
    )
    groups = [g for g in graph.groups if g.kind in cfg.kinds]
    if not groups:
        rows = graph.barrier_report()
        why = "; ".join(
            f"{r['node']} ({r['op']}: {r['reason']}) keeps {', '.join(r['layers'][:3])}"
            + ("..." if len(r["layers"]) > 3 else "")
            for r in rows[:3]
        )
        return (
            f"{asked} removes nothing: the traced graph has no prunable {what} group"
            + (f"; every such channel is kept by a barrier: {why}" if why else "")
            + " (`fxprune inspect SOURCE` lists the groups and barriers)"
        )
    ratios = group_ratios(graph, cfg)
    if all(r is None for r in ratios.values()):
        return f"{asked} removes nothing: every {what} group is held by an ignored module ({list(cfg.ignore)[:5]})"
    if all(not r for r in ratios.values()):
        return f"{asked} removes nothing: no {what} group matches the given layer ratios"
    by_id = {g.id: g for g in groups}
    rounded = [
        gid for gid, r in ratios.items() if r and math.floor(len(by_id[gid].units) * r + 1e-9) == 0
    ]
    g = by_id[next(gid for gid, r in ratios.items() if r)]
    r = ratios[g.id]
    example = f"{group_name(graph, g)} has {len(g.units)} units"
    if len(rounded) == sum(1 for r in ratios.values() if r):
        most = max(len(by_id[gid].units) for gid, r in ratios.items() if r)
        kv = " (heads are counted in key/value groups: a grouped-query layer with 2 KV heads has 2 units)"
        return (
            f"{asked} removes nothing: the fraction rounds down to 0 units in every {what} group "
            f"({example}: floor({len(g.units)} x {r}) = 0); the smallest fraction that removes "
            f"one unit is {1 / most:.4g}"
            + (" (or give a count: heads=1)" + kv if cfg.option == "heads" else "")
        )
    return (
        f"{asked} removes nothing: every {what} group is at its minimum ({example} and must keep "
        f"{cfg.units_to_keep(g, r)}: min_heads / min_channels / round_to)"
    )
