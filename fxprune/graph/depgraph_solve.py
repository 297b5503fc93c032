"""Solving the dependency graph: the unions the rules recorded become units (connected
components), barriers mark the units they keep, and units with the same source and consumer layers
become groups. ``Analysis`` (``depgraph.py``) inherits ``finish()`` from ``Solver``."""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fxprune.graph.depgraph_atoms import non_rectangular, varying_dims
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
        key = np.unique(label[has_src] * ns + atom_source[has_src])
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
        for name in sorted(params):
            for d in sorted(params[name]):
                pd = params[name][d]
                if pd.consumer:
                    labs = np.unique(label[pd.vec[pd.vec >= 0]])
                    np.add.at(consumed, labs, np.uint64(rng.integers(1, 2**63)))
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
