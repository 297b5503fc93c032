"""The dependency graph: which channel indices of which layers must be removed together.

The model is read as a flow of *atoms*. An atom is one channel index that some layer creates: output
channel 7 of ``layer1.0.conv1`` is an atom, and so is output feature 3 of a Linear. Every tensor in
the FX graph carries an integer array of atom ids (``AtomArray``, in ``depgraph_atoms.py``) saying
which atom lives at each position; dimensions that carry no channel identity (batch, height, width)
have size 1 in that array, so a ``[N, 256, 56, 56]`` feature map costs 256 integers.

Coupling rules (the ``@rule`` table of ``rules.py``, one per operator) move atoms through the graph
and record three facts:

* **unions**: a residual ``a + b`` says atom ``a[i]`` and atom ``b[i]`` must go together; a grouped
  conv says all input and output channels of one group go together; so does a GroupNorm group;
* **blocks**: an operator that mixes values across a channel dimension in a way pruning cannot
  reproduce exactly (the model output, a softmax over channels, an op with no rule) blocks the atoms
  it touches, with a reason naming the node;
* **parameter slices**: ``conv.weight`` dim 0 holds the conv's output atoms, dim 1 the input atoms.

After the walk the unions are solved as connected components (``depgraph_solve.py``). A component
is a **unit**: the smallest thing that can be removed (one channel of a residual stream is one unit
spanning every conv that writes into or reads from that stream). Units whose atoms come from the
same set of source layers form a **group**: the thing a ratio applies to. A unit with any blocked
atom is not prunable, and the barrier report lists which node blocked which layers.

Removing a unit deletes every position holding one of its atoms: rows of the producing weights,
entries of norms, columns of the consuming weights, and the matching indices of every shape constant
(``rewrite.py``). The pruned model then equals the dense model with those atoms zeroed where they are
consumed, which ``fxprune.verify.equivalence`` checks.

This module holds ``Analysis``, the state the rules write to while they walk the graph. The
records it is solved into (``Source``, ``ParamDim``, ``Barrier``, ``Group``, ``DependencyGraph``)
live in ``depgraph_types.py``, the atom-array helpers in ``depgraph_atoms.py``; all are
re-exported here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx

from fxprune.graph.depgraph_atoms import (
    NONE,
    AtomArray,
    compress,
    non_rectangular,
    none_like,
    unique,
    varying_dims,
)
from fxprune.graph.depgraph_solve import Solver
from fxprune.graph.depgraph_types import Barrier, DependencyGraph, Group, ParamDim, Source
from fxprune.graph.trace import tensor_meta

__all__ = [  # the atom helpers and records are re-exported: importers use this module
    "MAX_PARAM_ATOMS",
    "NONE",
    "Analysis",
    "AtomArray",
    "Barrier",
    "DependencyGraph",
    "Group",
    "ParamDim",
    "Source",
    "compress",
    "is_param",
    "non_rectangular",
    "none_like",
    "op_name",
    "varying_dims",
]

# Parameters larger than this are never given per-element atoms (see Analysis.atoms).
MAX_PARAM_ATOMS = 4_000_000


class Analysis(Solver):
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
        ids = unique(np.asarray(arr)[np.asarray(arr) >= 0])
        if ids.size:
            self.barriers.append(Barrier(node.name, op_name(self.gm, node), reason, ids))

    def approximate(self, arr, node: fx.Node, reason: str) -> bool:
        """Atoms whose removal is inexact: blocked unless allow_approximate; returns True if allowed."""
        ids = unique(np.asarray(arr)[np.asarray(arr) >= 0])
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
