"""Importance criteria, scored over every weight coupled to a unit (the whole group, not one layer).

A unit's score sums the magnitude of every weight slice that would be deleted with it: the rows of
the producing convs/linears, the columns of the consuming ones and the norm scales. This is the
"group" magnitude of Torch-Pruning's ``GroupMagnitudeImportance`` computed directly on fxprune's
units (see docs/design.md for why Torch-Pruning's classes are not called directly).

| criterion  | cost                   | score of a unit                                         |
|------------|------------------------|---------------------------------------------------------|
| ``l1``     | weights only           | sum of abs over its conv/linear/embedding/norm slices    |
| ``l2``     | weights only           | sqrt of the sum of squares over the same slices          |
| ``bn_scale``| weights only          | sum of abs of its norm scales (gamma); l1 where none     |
| ``fpgm``   | weights only           | sum of distances of its producing rows to the other units' rows of each layer (He et al. 2019: units near the geometric median are redundant) |
| ``lamp``   | weights only           | its l2 squared over the sum of the l2 squared of its group's units at least as large (Lee et al. 2021); same order as l2 inside a group, scale-free across groups under ``global_ranking`` |
| ``random`` | none                   | uniform random (a baseline)                              |
| ``taylor`` | forward + backward on calibration | sum of abs(w * dL/dw) over the same slices (first-order Taylor) |
| ``activation`` | forward on calibration | mean abs activation of its channels where layers read them (after GELU; per head after attention) |
| ``entropy`` | forward on calibration | heads: log(keys) - attention entropy (focused heads score high); other groups: l1 |
| ``confidence`` | forward on calibration | heads: mean max attention probability; other groups: l1 |

Data-driven criteria read ``fxprune.calibration.collect`` statistics of the graph being pruned.
"""

from __future__ import annotations

import numpy as np
import torch

from fxprune.graph.depgraph import DependencyGraph, Group

CRITERIA = (
    "l1",
    "l2",
    "bn_scale",
    "fpgm",
    "lamp",
    "random",
    "taylor",
    "activation",
    "entropy",
    "confidence",
)
SCALE_FREE = ("lamp",)  # global ranking compares these across groups as they are
DATA_CRITERIA = ("taylor", "activation", "entropy", "confidence")  # need calibration batches


def _atom_scores(
    graph: DependencyGraph,
    roles: tuple[str, ...],
    power: int,
    tensors: dict | None = None,
    wanted: np.ndarray | None = None,
) -> np.ndarray:
    """Per atom: the summed |w| (power 1) or w**2 (power 2) of every weight slice it owns.
    ``wanted`` (a bool per unit label) skips the dims that hold none of those units."""
    ids, vals = [], []
    gm = graph.gm
    scratch = torch.empty(0)

    def needed(pd) -> bool:
        if wanted is None:
            return True
        vec = pd.vec[pd.vec >= 0]
        return bool(vec.size) and bool(wanted[graph.label[vec]].any())

    with torch.no_grad():
        for name, dims in graph.params.items():
            tracked = sorted(d for d, pd in dims.items() if pd.role in roles and needed(pd))
            if not tracked:
                continue
            try:
                w = tensors[name] if tensors is not None else gm.get_parameter(name)
            except (AttributeError, KeyError):
                continue
            w = w.detach()
            # One pass over the weight into a reused float32 scratch buffer (fresh 10 MB
            # temporaries cost more in page faults than the arithmetic; a bf16 weight is cast
            # into it, never copied to a new fp32 tensor), then reduce untracked dims.
            if scratch.numel() < w.numel() or scratch.device != w.device:
                scratch = torch.empty(w.numel(), dtype=torch.float32, device=w.device)
            tmp = scratch[: w.numel()].view(w.shape)
            if w.dtype == torch.float32:
                (torch.abs if power == 1 else torch.square)(w, out=tmp)
            else:
                tmp.copy_(w)
                tmp.abs_() if power == 1 else tmp.square_()
            rest = [k for k in range(w.ndim) if k not in tracked]
            m = (
                tmp.sum(dim=rest)
                if rest and any(w.shape[k] > 1 for k in rest)
                else tmp.reshape([w.shape[k] for k in tracked])
            )
            for i, d in enumerate(tracked):
                other = [k for k in range(m.ndim) if k != i]
                s = (m.sum(dim=other) if other else m).cpu().numpy().astype(np.float64)
                vec = dims[d].vec
                ok = vec >= 0
                ids.append(vec[ok])
                vals.append(s[ok])
    if not ids:
        return np.zeros(graph.n_atoms, dtype=np.float64)
    return np.bincount(np.concatenate(ids), np.concatenate(vals), minlength=graph.n_atoms)


def _fpgm(graph: DependencyGraph, groups: list[Group]) -> dict[int, float]:
    """Per unit: summed Euclidean distance of its rows to the other units' rows in every layer
    that produces the group (a unit's rows: one output channel, or a head's head_dim rows)."""
    unit_group = {u: g.id for g in groups for u in g.units}
    score = dict.fromkeys(unit_group, 0.0)
    gm = graph.gm
    with torch.no_grad():
        for name, dims in graph.params.items():
            for d, pd in dims.items():
                if pd.role != "weight" or pd.consumer:
                    continue
                held = np.unique(graph.label[pd.vec[pd.vec >= 0]])
                if not any(int(u) in unit_group for u in held):
                    continue  # holds none of the scored units: not read
                try:
                    w = gm.get_parameter(name)
                except AttributeError:
                    continue
                rows = w.detach().float().movedim(d, 0).reshape(w.shape[d], -1)
                by_unit: dict[int, list[int]] = {}
                for i, atom in enumerate(pd.vec.tolist()):
                    if atom >= 0:
                        u = int(graph.label[atom])
                        if u in unit_group:
                            by_unit.setdefault(u, []).append(i)
                per_group: dict[tuple[int, int], list[int]] = {}
                for u, idx in by_unit.items():  # same group and width: comparable vectors
                    per_group.setdefault((unit_group[u], len(idx)), []).append(u)
                for units in per_group.values():
                    if len(units) < 2:
                        continue
                    x = torch.stack([rows[by_unit[u]].reshape(-1) for u in units])
                    dist = torch.cdist(x[None], x[None])[0].sum(1).double().tolist()
                    for u, v in zip(units, dist, strict=True):
                        score[u] += v
    return score


def _lamp(graph: DependencyGraph, l2: np.ndarray, groups: list[Group]) -> dict[int, float]:
    out = {}
    for g in groups:
        sq = np.array([l2[u] ** 2 for u in g.units], dtype=np.float64)
        order = np.argsort(sq, kind="stable")
        tail = np.cumsum(sq[order][::-1])[::-1]  # sum over units at least as large
        lamp = np.empty_like(sq)
        lamp[order] = sq[order] / np.where(tail > 0, tail, 1.0)
        out.update({u: float(v) for u, v in zip(g.units, lamp, strict=True)})
    return out


def unit_scores(
    graph: DependencyGraph,
    criterion: str,
    seed: int = 0,
    stats=None,
    groups: list[Group] | None = None,
) -> dict[int, float]:
    """Score every unit of ``groups`` (default: every group); higher means more important.
    Weights that hold none of those units are not read.

    ``stats`` (a :class:`fxprune.calibration.Stats`) is required by the data-driven criteria.
    """
    groups = graph.groups if groups is None else groups
    if criterion == "random":  # one draw per unit of the whole graph: a subset draws the same
        rng = np.random.default_rng(seed)
        draw = {u: float(rng.random()) for g in graph.groups for u in g.units}
        return {u: draw[u] for g in groups for u in g.units}
    n_units = int(graph.label.max()) + 1 if graph.n_atoms else 0
    wanted = None
    if groups is not graph.groups:
        wanted = np.zeros(max(n_units, 1), dtype=bool)
        for g in groups:
            wanted[g.units] = True

    def by_unit(roles, power, tensors=None):
        per_atom = _atom_scores(graph, roles, power, tensors, wanted)
        s = np.bincount(graph.label, weights=per_atom, minlength=n_units)
        return np.sqrt(s) if power == 2 else s

    if criterion in DATA_CRITERIA:
        if stats is None:
            raise ValueError(f"importance={criterion!r} needs calibration statistics")
        if criterion == "taylor":
            s = by_unit(("weight", "norm"), 1, stats.taylor)
            return {u: float(s[u]) for g in groups for u in g.units}
        per_atom = getattr(stats, criterion)
        has = ~np.isnan(per_atom)
        s = np.bincount(graph.label[has], weights=per_atom[has], minlength=n_units)
        covered = np.bincount(graph.label[has], minlength=n_units) > 0
        out, l1 = {}, None
        for g in groups:
            if covered[g.units].all():
                out.update({u: float(s[u]) for u in g.units})
            else:  # entropy / confidence score heads only: other groups by magnitude
                l1 = by_unit(("weight", "norm"), 1) if l1 is None else l1
                out.update({u: float(l1[u]) for u in g.units})
        return out

    if criterion == "fpgm":
        return _fpgm(graph, groups)
    if criterion == "lamp":
        return _lamp(graph, by_unit(("weight", "norm"), 2), groups)
    if criterion in ("l1", "l2"):
        s = by_unit(("weight", "norm"), 1 if criterion == "l1" else 2)
        return {u: float(s[u]) for g in groups for u in g.units}
    if criterion == "bn_scale":
        bn = by_unit(("norm",), 1)
        l1 = None
        out = {}
        for g in groups:
            if any(bn[u] > 0 for u in g.units):
                out.update({u: float(bn[u]) for u in g.units})
            else:  # no norm in this group: fall back to the weights' l1
                l1 = by_unit(("weight", "norm"), 1) if l1 is None else l1
                out.update({u: float(l1[u]) for u in g.units})
        return out
    raise ValueError(f"unknown importance {criterion!r}; choose one of {CRITERIA}")


def group_mean(scores: dict[int, float], group: Group) -> float:
    vals = [scores[u] for u in group.units]
    m = float(np.mean(vals)) if vals else 0.0
    return m if m > 0 else 1.0
