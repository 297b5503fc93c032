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
| ``learned`` | the user's ``train_fn`` (a few steps) | its gate value after training soft gates with an L1 penalty (``fxprune.gates``) |

Data-driven criteria read ``fxprune.calibration.collect`` statistics of the graph being pruned.
Each criterion is a :class:`Criterion` in ``REGISTRY``; register your own with ``@criterion``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from fxprune._util import lookup, registrar
from fxprune.errors import ConfigError
from fxprune.gates import learn
from fxprune.graph.depgraph import DependencyGraph, Group
from fxprune.graph.depgraph_atoms import unique
from fxprune.weight_norms import reduced, slab


class Criterion:
    """An importance criterion: :meth:`score` maps every unit of the groups asked for to a number,
    higher meaning more important (the lowest-scoring units of a group are removed).

    Register a subclass with ``@criterion("name")`` to use it by name (``importance="name"``,
    ``fxprune prune --importance name``), or pass an instance (``importance=MyCriterion()``).

    Class attributes:
        name: what plans, reports and errors call it.
        needs: the calibration statistic it reads (``"taylor"``, ``"activation"``,
            ``"entropy"`` or ``"confidence"``: :class:`fxprune.calibration.Stats` fields),
            collected on the calibration batches before :meth:`score`; ``"learned"``: the
            user's ``train_fn`` (``Stats.train_fn``); None for weight-only.
        scale_free: its scores compare across groups as they are (``global_ranking`` does not
            divide them by each group's mean).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[str | None] = None
    scale_free: ClassVar[bool] = False

    def score(
        self, graph: DependencyGraph, groups: list[Group], stats=None, seed: int = 0
    ) -> dict[int, float]:
        raise NotImplementedError


REGISTRY: dict[str, Criterion] = {}
"""Criteria by name, in registration order (the built-ins below first)."""


criterion = registrar(__name__, "REGISTRY", Criterion, "criterion")
"""``@criterion("name")``: register a :class:`Criterion` subclass under ``name``."""


AUTO = "auto"
"""``importance="auto"`` (the default): heads and FFN neurons ranked by ``"activation"`` when
calibration data is given, by ``"l1"`` without; channels by ``"l1"``. Measured (docs/accuracy.md):
on a real pretrained LM (SmolLM2-135M) L1 ranking of FFN neurons collapses the model where
activation ranking keeps it usable, and on all-MiniLM-L6-v2 activation keeps the embeddings
closest of the criteria that need no training loop."""


def auto_importance(importance, kind: str, data: bool):
    """The criterion ``importance`` means for a pass of ``kind`` (``"heads"``, ``"ffn"``,
    ``"channels"``) given whether calibration data is there; other names are themselves."""
    if importance != AUTO:
        return importance
    return "activation" if data and kind in ("heads", "ffn") else "l1"


def resolve(importance) -> Criterion:
    """The criterion ``importance`` names (a registered name) or is (an instance)."""
    if isinstance(importance, type) and issubclass(importance, Criterion):
        return importance()
    return lookup(REGISTRY, Criterion, importance, "importance")


def name_of(importance) -> str:
    """``importance`` as plans and reports spell it."""
    return resolve(importance).name or type(importance).__name__


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
    # per atom, and False for NONE (-1, the last slot): does it hold a wanted unit
    held = None if wanted is None else np.append(wanted[graph.label], False)
    todo = []  # (dims, tracked dims, weight) of each weight read
    for name, dims in graph.params.items():
        tracked = sorted(
            d for d, pd in dims.items() if pd.role in roles and (held is None or held[pd.vec].any())
        )
        if not tracked:
            continue
        try:
            w = tensors[name] if tensors is not None else graph.gm.get_parameter(name)
        except (AttributeError, KeyError):
            continue
        todo.append((dims, tracked, w.detach()))
    size: dict = {}  # per device: the float32 scratch the largest slab read there needs
    for _, _, w in todo:
        size[w.device] = max(size.get(w.device, 0), slab(w)[1])
    scratch = {dev: torch.empty(n, dtype=torch.float32, device=dev) for dev, n in size.items()}

    with torch.no_grad():
        for dims, tracked, w in todo:
            m = reduced(w, tracked, power, scratch[w.device])
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
                held = unique(graph.label[pd.vec[pd.vec >= 0]])
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


class _Scorer:
    """Per-unit sums over the weights that hold the groups asked for (the others are not read)."""

    def __init__(self, graph: DependencyGraph, groups: list[Group]):
        self.graph, self.groups = graph, groups
        self.n_units = int(graph.label.max()) + 1 if graph.n_atoms else 0
        self.wanted = None
        if groups is not graph.groups:
            self.wanted = np.zeros(max(self.n_units, 1), dtype=bool)
            for g in groups:
                self.wanted[g.units] = True

    def by_unit(self, roles, power, tensors=None) -> np.ndarray:
        per_atom = _atom_scores(self.graph, roles, power, tensors, self.wanted)
        s = np.bincount(self.graph.label, weights=per_atom, minlength=self.n_units)
        return np.sqrt(s) if power == 2 else s

    def of(self, s) -> dict[int, float]:
        s = np.asarray(s, dtype=np.float64).tolist()  # the floats float(s[u]) gives, at once
        return {u: s[u] for g in self.groups for u in g.units}


def unit_scores(
    graph: DependencyGraph,
    criterion,
    seed: int = 0,
    stats=None,
    groups: list[Group] | None = None,
) -> dict[int, float]:
    """Score every unit of ``groups`` (default: every group) by ``criterion`` (a registered
    name or a :class:`Criterion`); higher means more important. Weights that hold none of those
    units are not read. ``stats`` (a :class:`fxprune.calibration.Stats`) is required by the
    data-driven criteria."""
    c = resolve(criterion)
    if c.needs and stats is None:
        raise ConfigError(f"importance={c.name!r} needs calibration statistics")
    return c.score(graph, graph.groups if groups is None else groups, stats, seed)


@criterion("l1")
class L1(Criterion):
    """Sum of |w| over every conv / linear / embedding / norm slice the unit owns."""

    def score(self, graph, groups, stats=None, seed=0):
        sc = _Scorer(graph, groups)
        return sc.of(sc.by_unit(("weight", "norm"), 1))


@criterion("l2")
class L2(Criterion):
    """Square root of the sum of w**2 over the same slices as l1."""

    def score(self, graph, groups, stats=None, seed=0):
        sc = _Scorer(graph, groups)
        return sc.of(sc.by_unit(("weight", "norm"), 2))


@criterion("bn_scale")
class BNScale(Criterion):
    """Sum of |gamma| of the unit's norm scales; l1 in a group without a norm."""

    def score(self, graph, groups, stats=None, seed=0):
        sc = _Scorer(graph, groups)
        bn, l1, out = sc.by_unit(("norm",), 1), None, {}
        for g in groups:
            if any(bn[u] > 0 for u in g.units):
                out.update({u: float(bn[u]) for u in g.units})
            else:  # no norm in this group: fall back to the weights' l1
                l1 = sc.by_unit(("weight", "norm"), 1) if l1 is None else l1
                out.update({u: float(l1[u]) for u in g.units})
        return out


@criterion("fpgm")
class FPGM(Criterion):
    """Summed distance of the unit's producing rows to the other units' (geometric median)."""

    def score(self, graph, groups, stats=None, seed=0):
        return _fpgm(graph, groups)


@criterion("lamp")
class LAMP(Criterion):
    """l2 squared over the sum of l2 squared of the group's units at least as large."""

    scale_free = True

    def score(self, graph, groups, stats=None, seed=0):
        return _lamp(graph, _Scorer(graph, groups).by_unit(("weight", "norm"), 2), groups)


@criterion("random")
class Random(Criterion):
    """Uniform random: one draw per unit of the whole graph, so a subset draws the same."""

    def score(self, graph, groups, stats=None, seed=0):
        rng = np.random.default_rng(seed)
        draw = {u: float(rng.random()) for g in graph.groups for u in g.units}
        return {u: draw[u] for g in groups for u in g.units}


@criterion("taylor")
class Taylor(Criterion):
    """Sum of |w * dL/dw| over the unit's slices (first-order Taylor, on calibration)."""

    needs = "taylor"

    def score(self, graph, groups, stats=None, seed=0):
        sc = _Scorer(graph, groups)
        return sc.of(sc.by_unit(("weight", "norm"), 1, stats.taylor))


class _Measured(Criterion):
    """A per-atom calibration statistic summed per unit; groups it does not cover by l1."""

    def score(self, graph, groups, stats=None, seed=0):
        sc = _Scorer(graph, groups)
        per_atom = getattr(stats, self.needs)
        has = ~np.isnan(per_atom)
        s = np.bincount(graph.label[has], weights=per_atom[has], minlength=sc.n_units)
        covered = np.bincount(graph.label[has], minlength=sc.n_units) > 0
        out, l1 = {}, None
        for g in groups:
            if covered[g.units].all():
                out.update({u: float(s[u]) for u in g.units})
            else:  # entropy / confidence score heads only: other groups by magnitude
                l1 = sc.by_unit(("weight", "norm"), 1) if l1 is None else l1
                out.update({u: float(l1[u]) for u in g.units})
        return out


@criterion("activation")
class Activation(_Measured):
    """Mean |activation| of the unit's channels where layers read them."""

    needs = "activation"


@criterion("entropy")
class Entropy(_Measured):
    """Heads: log(keys) - attention entropy (focused heads score high)."""

    needs = "entropy"


@criterion("confidence")
class Confidence(_Measured):
    """Heads: mean max attention probability."""

    needs = "confidence"


@criterion("learned")
class Learned(Criterion):
    """Gate value of a soft gate per unit trained by the user's ``train_fn`` with an L1 penalty
    (``fxprune.gates``): the gates of exactly the groups scored, so a heads pass gates heads only.
    Gates of all groups share one scale (0 = removed, about 1 = kept as is): scale-free."""

    needs = "learned"
    scale_free = True

    def score(self, graph, groups, stats=None, seed=0):
        return learn(graph, groups, stats.train_fn)


# the built-in names, as the CLI and the docs list them (registered criteria join REGISTRY)
CRITERIA = tuple(REGISTRY)
SCALE_FREE = tuple(n for n, c in REGISTRY.items() if c.scale_free)
DATA_CRITERIA = tuple(n for n, c in REGISTRY.items() if c.needs)  # need calibration batches


def group_mean(scores: dict[int, float], group: Group) -> float:
    vals = [scores[u] for u in group.units]
    m = float(np.mean(vals)) if vals else 0.0
    return m if m > 0 else 1.0
