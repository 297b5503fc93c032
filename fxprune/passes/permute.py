"""Channel permutation before N:M masking (the idea of NVIDIA ASP's permutation search).

Which weights survive a 2:4 mask depends on which input channels share a group of four. Reordering
a layer's input channels changes that without changing what the model computes, provided every
tensor holding those channels is reordered the same way: the producing layers' rows, their
biases and norm statistics, and every consuming layer's columns. The dependency graph knows that
set: a group's units. So the pass permutes units of a group, everywhere at once.

Eligible groups: one channel per unit (width 1), every unit exactly once in each parameter dim
that holds the group, no position fixed by a graph constant (split sizes, slice bounds), and at
least one N:M-eligible consumer that reads only this group's channels. The search maximises
the magnitude the N:M mask keeps over all those consumers: rounds of random candidate swaps
between groups of M, scored all at once (``topk`` over a gathered ``[rows, candidates, M]``
tensor), the best non-overlapping improving swaps applied, until a round finds none. The result
is exact: the proof compares against the dense model with the same permutation undone by
construction (permuted dense == dense).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fxprune.errors import ConfigError, PlanError
from fxprune.graph.depgraph import DependencyGraph, Group
from fxprune.graph.rewrite import set_tensor
from fxprune.graph.shapeprop import propagate_shapes
from fxprune.graph.weighted import weighted_layer
from fxprune.passes import PassResult, PermuteResult, register_pass


@dataclass(frozen=True)
class Permute:
    """Options of the permutation pass.

    Args:
        n, m: the N:M pattern the permutation is searched for.
        rounds: search rounds per group (each applies every improving disjoint swap it finds).
        candidates: random swaps scored per round.
        seed: for the candidate sampling.
        orders: replay mode: ``{source layer: its output channels in the new order}``.
    """

    n: int = 2
    m: int = 4
    rounds: int = 10
    candidates: int = 512
    seed: int = 0
    orders: dict | None = field(default=None, compare=False, hash=False)

    def __post_init__(self):
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise ConfigError(f"permutation rounds={self.rounds!r}: must be an integer >= 1")


def _eligible_consumers(graph: DependencyGraph, cfg: Permute) -> dict[str, int]:
    """Weights the N:M pass will mask, with the dim it groups along."""
    out = {}
    for node in graph.gm.graph.nodes:
        wl = weighted_layer(graph.gm, node)
        if wl is not None and wl.groups == 1 and not wl.transposed:
            w = graph.gm.get_parameter(wl.param)
            if w.shape[wl.reduce_dim] % cfg.m == 0:
                out[wl.param] = wl.reduce_dim
    return out


def _layout(graph: DependencyGraph, g: Group, eligible: dict[str, int]):
    """``(units in channel order, {(param, dim): positions}, consumers)`` or None (not
    eligible, with the reason as a string)."""
    members = set(g.units)
    if g.width != 1:
        return "more than one channel per unit"
    if graph.positional is not None and graph.positional[g.units].any():
        return "a graph constant (split / slice) fixes the channels' positions"
    if any(
        np.isin(graph.label[arr[arr >= 0]], g.units).any() for arr in graph.param_arrays.values()
    ):
        return "a parameter used as a tensor holds its channels"
    order, places, consumers = None, {}, []
    for name, dims in graph.params.items():
        for d, pd in dims.items():
            lab = np.where(pd.vec >= 0, graph.label[np.maximum(pd.vec, 0)], -1)
            pos = np.flatnonzero(np.isin(lab, g.units))
            if not pos.size:
                continue
            units = lab[pos]
            if len(set(units.tolist())) != len(units) or len(units) != len(g.units):
                return f"{name} holds its channels more than once"
            if order is None:
                order = units
            elif not np.array_equal(order, units):
                return f"{name} orders its channels differently"
            places[(name, d)] = pos
            if pd.consumer and eligible.get(name) == d:
                if pos.size != pd.vec.size:
                    return f"{name} also reads other channels"
                consumers.append((name, d))
    if not consumers:
        return "no N:M-eligible layer reads these channels"
    assert members == set(order.tolist())
    return order, places, consumers


def _kept(mag: torch.Tensor, n: int) -> torch.Tensor:
    """Magnitude an N:M mask keeps per group of M: ``mag [..., groups, M]`` -> ``[..., groups]``."""
    return mag.topk(n, dim=-1).values.sum(-1)


def search(mat: torch.Tensor, n: int, m: int, rounds: int, candidates: int, gen) -> np.ndarray:
    """A column order of ``mat`` (``|W|`` as ``[rows, C]``) that raises the N:M-kept magnitude
    along rows; greedy improving swaps between groups of M, scored in batches."""
    rows, c = mat.shape
    perm = torch.arange(c)
    s = c // m
    cur = _kept(mat[:, perm].view(rows, s, m), n).sum(0)  # per group of M
    for _ in range(rounds):
        i = torch.randint(0, c, (candidates,), generator=gen)
        j = torch.randint(0, c, (candidates,), generator=gen)
        ok = i // m != j // m
        i, j = i[ok], j[ok]
        if not i.numel():
            break
        a, b = i // m, j // m
        cols_a = perm.view(s, m)[a].clone()
        cols_b = perm.view(s, m)[b].clone()
        ci, cj = perm[i], perm[j]
        cols_a[torch.arange(len(i)), i % m] = cj
        cols_b[torch.arange(len(j)), j % m] = ci
        gain = _kept(mat[:, cols_a], n).sum(0) + _kept(mat[:, cols_b], n).sum(0) - cur[a] - cur[b]
        best = torch.argsort(gain, descending=True)
        used: set[int] = set()
        applied = 0
        for k in best.tolist():
            if gain[k] <= 1e-9 * float(cur.sum()):
                break
            ga, gb = int(a[k]), int(b[k])
            if ga in used or gb in used:
                continue
            used |= {ga, gb}
            pi, pj = int(i[k]), int(j[k])
            perm[pi], perm[pj] = perm[pj].clone(), perm[pi].clone()
            for grp in (ga, gb):
                cur[grp] = _kept(mat[:, perm[grp * m : (grp + 1) * m]].unsqueeze(1), n).sum()
            applied += 1
        if not applied:
            break
    return perm.numpy()


def _matrix(graph: DependencyGraph, consumers, places) -> torch.Tensor:
    """``|W|`` of every consumer as ``[rows, C]``, columns in the group's channel order."""
    mats = []
    for name, d in consumers:
        w = graph.gm.get_parameter(name).detach().abs().float()
        w = w.movedim(d, -1)
        w = w.reshape(-1, w.shape[-1])[:, torch.as_tensor(places[(name, d)])]
        mats.append(w)
    return torch.cat(mats, 0)


def _apply(graph: DependencyGraph, places: dict, perm: np.ndarray) -> dict:
    """Reorder every tensor holding the group; returns ``{(param, dim): gather index}``."""
    out = {}
    with torch.no_grad():
        for (name, d), pos in places.items():
            try:
                t = graph.gm.get_parameter(name)
            except AttributeError:
                t = graph.gm.get_buffer(name)
            idx = np.arange(t.shape[d])
            idx[pos] = pos[perm]
            set_tensor(graph.gm, name, t.detach().index_select(d, torch.as_tensor(idx)))
            out[(name, d)] = idx
    return out


@register_pass("permute", Permute, lambda e: Permute(e["n"], e["m"], orders=e["orders"]))
def permute_channels(graph: DependencyGraph, cfg: Permute, args: tuple) -> PassResult:
    """Reorder each eligible group's channels to raise the N:M-kept magnitude (exact)."""
    eligible = _eligible_consumers(graph, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    orders, skipped, gathers = {}, {}, {}
    before = after = total = 0.0
    for g in graph.groups:
        layout = _layout(graph, g, eligible)
        first = graph.sources[g.sources[0]]
        if isinstance(layout, str):
            skipped[first.layer] = layout
            continue
        order, places, consumers = layout
        mat = _matrix(graph, consumers, places)
        if cfg.orders is not None:
            if first.layer not in cfg.orders:
                continue
            wanted = np.asarray(cfg.orders[first.layer])
            atoms = first.start + wanted
            units = graph.label[atoms]
            pos_of = {int(u): k for k, u in enumerate(order.tolist())}
            perm = np.asarray([pos_of[int(u)] for u in units])
        else:
            perm = search(mat, cfg.n, cfg.m, cfg.rounds, cfg.candidates, gen)
        rows, c = mat.shape
        before += float(_kept(mat.view(rows, c // cfg.m, cfg.m), cfg.n).sum())
        after += float(
            _kept(mat[:, torch.as_tensor(perm)].view(rows, c // cfg.m, cfg.m), cfg.n).sum()
        )
        total += float(mat.sum())
        if (perm == np.arange(c)).all():
            continue
        for (name, d), idx in _apply(graph, places, perm).items():
            gathers.setdefault(name, {})[d] = idx
        channel_of_unit = {int(graph.label[first.start + k]): k for k in range(first.size)}
        orders[first.layer] = [channel_of_unit[int(u)] for u in order[perm]]
    if cfg.orders is not None and set(cfg.orders) - set(orders):
        missing = sorted(set(cfg.orders) - set(orders))
        raise PlanError(f"plan permutes layers this model cannot permute: {missing[:5]}")
    if orders:
        propagate_shapes(graph.gm, args)
    return PermuteResult(
        "permute",
        changed=False,  # shapes and coupling are unchanged
        plan={"name": "permute", "n": cfg.n, "m": cfg.m, "orders": orders} if orders else {},
        order=gathers,
        groups_permuted=len(orders),
        # fraction of the permuted groups' consumer weight magnitude an N:M mask keeps
        kept_magnitude_before=before / total if total else 1.0,
        kept_magnitude_after=after / total if total else 1.0,
        not_permuted=skipped,
    )
