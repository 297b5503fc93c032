"""Solving the dependency graph: the unions the rules recorded become units (connected
components), barriers mark the units they keep, and units with the same source and consumer layers
become groups. ``Analysis`` (``depgraph.py``) inherits ``finish()`` from ``Solver``."""

from __future__ import annotations

import numpy as np
import torch.nn as nn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fxprune.graph.depgraph_atoms import non_rectangular, unique, varying_dims
from fxprune.graph.depgraph_types import Barrier, DependencyGraph, Group, ParamDim


class Solver:
    """The solve half of ``Analysis``: reads what the walk recorded on ``self`` (``param_dims``,
    ``edges``, ``barriers``, ``sources`` ...) and builds the ``DependencyGraph``."""

    def finish(self) -> DependencyGraph:
        params: dict[str, dict[int, ParamDim]] = {}
        for name, dims in self.param_dims.items():
            params[name] = {}
            for d, recs in dims.items():
                first = recs[0]
                for r in recs[1:]:  # a module called twice: both calls must agree
                    self.union(first.vec, r.vec)
                role = "weight" if any(r.role == "weight" for r in recs) else first.role
                consumer = any(r.consumer for r in recs)
                params[name][d] = ParamDim(name, d, first.vec, role, consumer)

        n = self.n_atoms
        if self.edges:
            a = np.concatenate([e[0] for e in self.edges])
            b = np.concatenate([e[1] for e in self.edges])
            m = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
            _, label = connected_components(m, directed=False)
            label = label.astype(np.int64)
        else:
            label = np.arange(n, dtype=np.int64)

        multi = self.multi_arrays + [
            (f"parameter {name}", arr)
            for name, arr in self.param_arrays.items()
            if len(varying_dims(arr)) > 1
        ]
        for where, arr in multi:
            bad = non_rectangular(label, arr)
            if bad.size:
                self.barriers.append(
                    Barrier(where, "layout", "channels interleave across two dims", bad)
                )

        atom_source = np.full(n, -1, dtype=np.int64)
        for i, s in enumerate(self.sources):
            atom_source[s.start : s.start + s.size] = i

        blocked = np.zeros(n, dtype=bool)  # per unit label
        approx = np.zeros(n, dtype=bool)
        for b in self.barriers:
            if b.approximate and self.allow_approximate:
                approx[label[b.atoms]] = True
            else:
                blocked[label[b.atoms]] = True

        has_src = atom_source >= 0
        ns = max(len(self.sources), 1)  # unique (unit, source) pairs via one int64 key
        key = unique(label[has_src] * ns + atom_source[has_src])
        pairs = (key // ns, key % ns)
        heads = np.zeros(n, dtype=bool)  # per unit label: an attention head
        for arr in self.head_atoms:
            heads[label[arr[arr >= 0]]] = True
        groups = self._groups(label, pairs, blocked, approx, heads, params)
        return DependencyGraph(
            self.gm,
            n,
            label,
            self.sources,
            atom_source,
            params,
            self.param_arrays,
            self.rewrites,
            self.barriers,
            groups,
            blocked,
            (pairs[0], pairs[1]),
            probes={
                n.name: self.values[n]
                for n in self.probe_nodes
                if isinstance(self.values.get(n), np.ndarray) and (self.values[n] >= 0).any()
            },
            attention=self.attention,
            positional=self._positional(label),
        )

    def _positional(self, label: np.ndarray) -> np.ndarray:
        out = np.zeros(max(self.n_atoms, 1), dtype=bool)
        if self.positional_atoms:
            out[label[np.concatenate(self.positional_atoms)]] = True
        return out

    def _weight(self, name: str):
        try:
            return self.gm.get_parameter(name)
        except AttributeError:
            return None

    def _spatial(self, name: str) -> bool:
        """A conv weight that mixes channels over a kernel wider than one pixel (not 1x1, not
        depthwise): what a conv MLP's hidden neurons never meet."""
        w = self._weight(name)
        return w is not None and w.ndim > 2 and w.shape[1] > 1 and any(k > 1 for k in w.shape[2:])

    def _conv_mlp(self, srcs, u0: int, label, params) -> bool:
        """A conv MLP's hidden channels: made by 1x1 convs (at least one) and depthwise convs,
        and every layer that makes or reads them inside one module that is not a container
        of blocks (EfficientFormerV2's ``ConvMlpWithNorm``; not a ResNet stage's residual
        stream, whose 1x1 convs sit in different blocks)."""
        ws = [self._weight(self.sources[s].param) for s in srcs]
        if any(w is None or w.ndim <= 2 for w in ws):
            return False
        pointwise = [all(k == 1 for k in w.shape[2:]) for w in ws]
        if not any(pointwise) or not all(
            p or w.shape[1] == 1 for p, w in zip(pointwise, ws, strict=True)
        ):
            return False
        names = [self.sources[s].layer for s in srcs]
        names += [
            pd.name.rpartition(".")[0]
            for dims in params.values()
            for pd in dims.values()
            if pd.consumer and (label[pd.vec[pd.vec >= 0]] == u0).any()
        ]
        common = []
        for level in zip(*(n.split(".") for n in names), strict=False):
            if len(set(level)) > 1:
                break
            common.append(level[0])
        try:
            owner = self.gm.get_submodule(".".join(common)) if common else None
        except AttributeError:
            return False
        return owner is not None and not isinstance(owner, (nn.Sequential, nn.ModuleList))

    def _groups(self, label, pairs, blocked, approx, heads, params) -> list[Group]:
        """Group prunable units by the set of source layers their atoms come from and the set
        of layers that consume them. The consumers split a layer's outputs that go different
        ways (the parts of a ``split`` feeding different convs, a slice passed by): a ratio
        applied to them together could empty one part (a 0-wide conv input) and keep another
        whole; per part, each keeps its share."""
        pl, ps = pairs
        # Key each unit by its source set: a sum of random 64-bit numbers, one per source (pairs
        # are sorted by unit, so a segmented sum does it; distinct sets collide with p ~ 2**-64).
        rng = np.random.default_rng(0x5EED)
        r = rng.integers(1, 2**63, max(len(self.sources), 1))
        units, starts = np.unique(pl, return_index=True)
        sig = np.add.reduceat(r[ps].astype(np.uint64), starts) if pl.size else pl
        consumed = np.zeros(max(self.n_atoms, 1), dtype=np.uint64)  # per unit label
        mixed = np.zeros(max(self.n_atoms, 1), dtype=bool)  # read by a conv with a kernel > 1
        for name in sorted(params):
            for d in sorted(params[name]):
                pd = params[name][d]
                if pd.consumer:
                    labs = unique(label[pd.vec[pd.vec >= 0]])
                    np.add.at(consumed, labs, np.uint64(rng.integers(1, 2**63)))
                    if self._spatial(pd.name):
                        mixed[labs] = True
        if pl.size:
            with np.errstate(over="ignore"):  # a hash: wrapping is intended
                sig = sig + consumed[units] * np.uint64(0x9E3779B97F4A7C15)
        _, first_atom = np.unique(label, return_index=True)  # labels are 0..k-1, dense
        keep = ~blocked[units]
        units, sig = units[keep], sig[keep]
        order = np.argsort(first_atom[units], kind="stable")
        units, sig = units[order], sig[order]
        _, first, inv = np.unique(sig, return_index=True, return_inverse=True)
        groups = []
        for k in np.argsort(first, kind="stable"):  # groups in graph order
            members = units[inv == k]
            u0 = int(members[0])
            srcs = ps[pl == u0].tolist()
            width = max(
                int(
                    np.count_nonzero(
                        label[self.sources[s].start : self.sources[s].start + self.sources[s].size]
                        == u0
                    )
                )
                for s in srcs
            )
            if heads[members].any():
                kind = "heads"
            elif all(self.sources[s].kind == "linear" for s in srcs):
                kind = "ffn"  # hidden neurons made and consumed by Linears (an MLP)
            elif not mixed[u0] and self._conv_mlp(srcs, u0, label, params):
                kind = "ffn"  # the same made and read by 1x1 convs (EfficientFormerV2's Mlp)
            else:
                kind = "channels"
            groups.append(
                Group(
                    len(groups),
                    srcs,
                    members.tolist(),
                    max(width, 1),
                    approximate=bool(approx[members].any()),
                    kind=kind,
                )
            )
        return groups
