"""The records of the dependency graph: ``Source`` (a layer dim that creates atoms), ``ParamDim``,
``Barrier``, ``Group`` and the solved ``DependencyGraph`` itself (``depgraph.py`` explains them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from fxprune.graph.depgraph_atoms import unique


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
            srcs = unique(ps[np.isin(pl, self.label[b.atoms])])
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
