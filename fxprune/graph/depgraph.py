"""The dependency graph: which channel indices of which layers must be removed together.

The model is read as a flow of *atoms*. An atom is one channel index that some layer creates: output
channel 7 of ``layer1.0.conv1`` is an atom, and so is output feature 3 of a Linear. Every tensor in
the FX graph carries an integer array of atom ids (see ``AtomArray`` below) saying which atom lives at
each position; dimensions that carry no channel identity (batch, height, width) have size 1 in that
array, so a ``[N, 256, 56, 56]`` feature map costs 256 integers.

Coupling rules (``rules.py``, one per operator) move atoms through the graph and record three facts:

* **unions**: a residual ``a + b`` says atom ``a[i]`` and atom ``b[i]`` must go together; a grouped
  conv says all input and output channels of one group go together; so does a GroupNorm group;
* **blocks**: an operator that mixes values across a channel dimension in a way pruning cannot
  reproduce exactly (the model output, a softmax over channels, an op with no rule) blocks the atoms
  it touches, with a reason naming the node;
* **parameter slices**: ``conv.weight`` dim 0 holds the conv's output atoms, dim 1 the input atoms.

After the walk the unions are solved as connected components. A component is a **unit**: the
smallest thing that can be removed (one channel of a residual stream is one unit spanning every conv
that writes into or reads from that stream). Units whose atoms come from the same set of source layers
form a **group**: the thing a ratio applies to. A unit with any blocked atom is not prunable, and the
barrier report lists which node blocked which layers.

Removing a unit deletes every position holding one of its atoms: rows of the producing weights,
entries of norms, columns of the consuming weights, and the matching indices of every shape constant
(``rewrite.py``). The pruned model then equals the dense model with those atoms zeroed where they are
consumed, which ``fxprune.verify.equivalence`` checks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fxprune.graph.trace import tensor_meta

NONE = -1  # "no atom here": a position whose channel cannot be removed (model input, constant)

# An AtomArray is an int64 np.ndarray with the tensor's ndim; each dim has size 1 (no channel
# identity along it) or the tensor's size along it.
AtomArray = np.ndarray

# Parameters larger than this are never given per-element atoms (see Analysis.atoms).
MAX_PARAM_ATOMS = 4_000_000


@dataclass
class Source:
    """A layer dimension that creates atoms (a conv's output channels, a Linear's outputs)."""

    node: str
    layer: str  # module name, used in plans, ignore= and reports
    param: str  # the parameter whose dimension holds the atoms
    dim: int
    start: int  # first atom id
    size: int
    kind: str = "other"  # "linear", "conv", "embedding": what kind of layer creates the atoms


@dataclass
class ParamDim:
    """Dimension ``dim`` of parameter ``name`` holds atoms ``vec`` (one per index)."""

    name: str
    dim: int
    vec: np.ndarray
    role: str  # "weight" (conv/linear/embedding), "norm" (norm scale), "other"
    consumer: bool  # the layer reduces over this dim: zeroing it hides the atom from the layer


@dataclass
class Barrier:
    """Atoms an operator refused to let go, and why."""

    node: str
    op: str
    reason: str
    atoms: np.ndarray
    approximate: bool = False  # pruning would be inexact but allowed with allow_approximate


@dataclass
class Group:
    """Units that share the same source layers; ratios apply per group."""

    id: int
    sources: list[int]  # indices into DependencyGraph.sources
    units: list[int]  # unit labels
    width: int  # channels per unit in the widest source layer
    approximate: bool = False
    kind: str = "channels"  # "heads" (attention heads), "ffn" (hidden neurons between Linears)

    def layers(self, graph: DependencyGraph) -> list[str]:
        return sorted({graph.sources[s].layer for s in self.sources})


@dataclass
class DependencyGraph:
    """The solved coupling: units, groups, parameter slices, rewrites and barriers."""

    gm: fx.GraphModule
    n_atoms: int
    label: np.ndarray  # atom id -> unit label
    sources: list[Source]
    atom_source: np.ndarray  # atom id -> source index or -1
    params: dict[str, dict[int, ParamDim]]
    param_arrays: dict[
        str, np.ndarray
    ]  # parameters with per-element atoms (layer scale, pos-embed)
    rewrites: list[tuple[fx.Node, Callable]]
    barriers: list[Barrier]
    groups: list[Group]
    blocked: np.ndarray  # unit label -> True when a barrier keeps it
    unit_sources: tuple[np.ndarray, np.ndarray]  # (unit, source) pairs, sorted by unit
    # Atom arrays of nodes whose runtime values data-driven importance reads: the inputs of
    # Linear/Conv layers (what a layer really reads: after GELU, per head after attention), and
    # every attention node's output (heads on dim -3).
    probes: dict[str, np.ndarray] = field(default_factory=dict)
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    positional: np.ndarray | None = None  # unit label -> True when a constant fixes its place

    def removed_mask(self, units) -> np.ndarray:
        """Boolean over atom ids: True where the atom belongs to a removed unit (plus NONE=False)."""
        m = np.zeros(self.n_atoms + 1, dtype=bool)  # last slot answers for NONE (-1)
        m[:-1] = np.isin(self.label, np.asarray(list(units), dtype=np.int64))
        return m

    def barrier_report(self) -> list[dict]:
        """Which operator blocked which layers' channels, one row per barrier that blocked any."""
        rows = []
        pl, ps = self.unit_sources
        for b in self.barriers:
            srcs = np.unique(ps[np.isin(pl, self.label[b.atoms])])
            if not srcs.size:
                continue
            layers = sorted({self.sources[s].layer for s in srcs.tolist()})
            rows.append(
                {
                    "node": b.node,
                    "op": b.op,
                    "reason": b.reason,
                    "layers": layers,
                    "approximate": b.approximate,
                }
            )
        return rows


class Analysis:
    """Mutable state while rules walk the graph; ``finish()`` solves it into a DependencyGraph."""

    def __init__(self, gm: fx.GraphModule, allow_approximate: bool = False):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.allow_approximate = allow_approximate
        self.n_atoms = 0
        self.sources: list[Source] = []
        self.source_ranges: list[tuple[int, int, int]] = []
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.barriers: list[Barrier] = []
        self.param_dims: dict[str, dict[int, list[ParamDim]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self.param_arrays: dict[str, np.ndarray] = {}
        self.rewrites: list[tuple[fx.Node, Callable]] = []
        self.values: dict[fx.Node, object] = {}
        self.multi_arrays: list[tuple[str, np.ndarray]] = []  # arrays varying on >1 dim
        self.head_atoms: list[np.ndarray] = []  # atoms a reshape grouped into attention heads
        self.probe_nodes: list[fx.Node] = []  # inputs of Linear/Conv layers (activation stats)
        self.positional_atoms: list[np.ndarray] = []  # atoms whose position a constant encodes
        self.attention: dict[str, np.ndarray] = {}  # attention node -> head atoms (dim -3)
        # Per atom id: was it made for a parameter / buffer used as a tensor (a constant), and
        # has a union touched it yet. A constant nobody is coupled to may be broadcast freely.
        self._constant = np.zeros(0, dtype=bool)
        self._coupled = np.zeros(0, dtype=bool)

    # ---- atoms -------------------------------------------------------------------------------
    def positional(self, arr) -> None:
        """Atoms of ``arr`` sit where a graph constant (split sizes, slice bounds) says: they
        may be removed (the rewrite recomputes the constant) but not reordered."""
        a = np.asarray(arr).reshape(-1)
        self.positional_atoms.append(a[a >= 0])

    def probe(self, node) -> None:
        """Remember ``node`` (a layer's input) for activation statistics."""
        if isinstance(node, fx.Node):
            self.probe_nodes.append(node)

    def new_atoms(self, n: int, constant: bool = False) -> np.ndarray:
        ids = np.arange(self.n_atoms, self.n_atoms + n, dtype=np.int64)
        self.n_atoms += n
        if self.n_atoms > self._constant.size:  # grow by doubling: amortised O(1) per atom
            cap = max(self.n_atoms, 2 * self._constant.size, 1024)
            self._constant = np.resize(self._constant, cap)
            self._coupled = np.resize(self._coupled, cap)
            self._constant[ids[0] :] = False
            self._coupled[ids[0] :] = False
        self._constant[ids] = constant
        return ids

    def free_constant(self, arr) -> bool:
        """True when every atom of ``arr`` belongs to a parameter or buffer used as a tensor and
        no rule has coupled any of them to anything yet (RoPE's ``inv_freq`` tables, a scalar
        ``scale`` of shape [1])."""
        ids = np.asarray(arr)
        ids = ids[ids >= 0]
        return bool(ids.size) and bool(self._constant[ids].all()) and not self._coupled[ids].any()

    def new_source(
        self, node: fx.Node, layer: str, param: str, dim: int, n: int, kind: str = "other"
    ) -> np.ndarray:
        ids = self.new_atoms(n)
        self.sources.append(Source(node.name, layer, param, dim, int(ids[0]) if n else 0, n, kind))
        return ids

    def atoms(self, arg) -> AtomArray | None:
        """The atom array of a node argument; None when it is not a tensor."""
        if not isinstance(arg, fx.Node):
            return None
        if arg in self.values:
            v = self.values[arg]
            return v if isinstance(v, np.ndarray) else None
        t = tensor_meta(arg)
        if t is None:
            return None
        if arg.op == "get_attr" and t.numel() <= MAX_PARAM_ATOMS:
            # A parameter used as a tensor (layer scale, positional embedding): every element gets
            # its own atom, so whatever it is combined with decides how it is sliced.
            arr = (
                self.new_atoms(t.numel(), constant=True).reshape(tuple(t.shape))
                if t.ndim
                else np.full((), NONE)
            )
            arr = compress(arr)
            if arr.ndim and is_param(self.gm, arg.target):
                self.param_arrays[arg.target] = arr
            self.values[arg] = arr
            return arr
        return none_like(t.ndim)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple ``a[i]`` with ``b[i]`` (broadcast); positions holding NONE are skipped."""
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        keep = (a >= 0) & (b >= 0) & (a != b)
        if keep.any():
            self.edges.append((a[keep].ravel(), b[keep].ravel()))
            self._coupled[a[keep]] = True
            self._coupled[b[keep]] = True

    def block(self, arr, node: fx.Node, reason: str) -> None:
        """Mark the atoms in ``arr`` unprunable because of ``node``."""
        if arr is None:
            return
        ids = np.unique(np.asarray(arr)[np.asarray(arr) >= 0])
        if ids.size:
            self.barriers.append(Barrier(node.name, op_name(self.gm, node), reason, ids))

    def approximate(self, arr, node: fx.Node, reason: str) -> bool:
        """Atoms whose removal is inexact: blocked unless allow_approximate; returns True if allowed."""
        ids = np.unique(np.asarray(arr)[np.asarray(arr) >= 0])
        if ids.size:
            r = reason if self.allow_approximate else reason + " (pass allow_approximate=True)"
            self.barriers.append(
                Barrier(node.name, op_name(self.gm, node), r, ids, approximate=True)
            )
        return self.allow_approximate

    def param_dim(self, name: str, dim: int, vec, role: str = "other", consumer=False) -> None:
        if name is None or vec is None:
            return
        vec = np.asarray(vec, dtype=np.int64).reshape(-1)
        self.param_dims[name][dim].append(ParamDim(name, dim, vec, role, consumer))

    def on_apply(self, node: fx.Node, fn: Callable) -> None:
        """Register ``fn(keep)`` to fix attributes or constants of ``node`` after pruning."""
        self.rewrites.append((node, fn))

    # ---- solve -------------------------------------------------------------------------------
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


# ---- array helpers ----------------------------------------------------------------------------


def none_like(ndim: int) -> AtomArray:
    return np.full((1,) * ndim, NONE, dtype=np.int64)


def compress(arr: np.ndarray) -> np.ndarray:
    """Shrink every dim along which the array is constant to size 1."""
    for d in range(arr.ndim):
        if arr.shape[d] > 1:
            first = arr.take([0], axis=d)
            if np.array_equal(np.broadcast_to(first, arr.shape), arr):
                arr = first
    return arr


def varying_dims(arr: np.ndarray) -> list[int]:
    return [d for d in range(arr.ndim) if arr.shape[d] > 1]


def non_rectangular(label: np.ndarray, arr: np.ndarray) -> np.ndarray:
    """Atoms of units that do not fill whole slices of ``arr`` along some single dimension.

    Removing such a unit would punch holes into the tensor that no smaller dense tensor can
    represent (e.g. one channel of one half of a channel shuffle).
    """
    lab = np.where(arr >= 0, label[np.maximum(arr, 0)], -1)
    units, counts = np.unique(lab[lab >= 0], return_counts=True)
    ok = np.zeros(units.size, dtype=bool)
    for d in varying_dims(lab):
        moved = np.moveaxis(lab, d, 0).reshape(lab.shape[d], -1)
        const = (moved == moved[:, :1]).all(axis=1) & (moved[:, 0] >= 0)
        # whole slices along d that hold a single unit, counted per unit
        n_slices = np.zeros(units.size, dtype=np.int64)
        pos = np.searchsorted(units, moved[const, 0])
        np.add.at(n_slices, pos, 1)
        ok |= n_slices * moved.shape[1] == counts
    bad_units = units[~ok]
    return arr[np.isin(lab, bad_units)]


def is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        t = gm.get_parameter(target)
    except AttributeError:
        try:
            t = gm.get_buffer(target)
        except AttributeError:
            return False
    return isinstance(t, torch.Tensor)


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)
