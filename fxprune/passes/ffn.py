"""FFN pass: remove hidden neurons of transformer MLPs (groups made and consumed by Linears: BERT's
intermediate/output, GPT-2's ``c_fc``/``c_proj``, ViT's MLP, and gated MLPs whose ``gate_proj``
and ``up_proj`` are one group because their outputs are multiplied)."""

from __future__ import annotations

from dataclasses import dataclass

from fxprune.graph.depgraph import DependencyGraph
from fxprune.passes import PassResult, register_pass
from fxprune.passes.channels import Channels, prune_aligned


@dataclass(frozen=True)
class FFN(Channels):
    """Options of the FFN pass: ``ratio`` of each MLP's hidden neurons removed, kept counts a
    multiple of ``round_to`` and at least ``min_channels``."""

    kinds: tuple[str, ...] = ("ffn",)

    name = "ffn"
    option = "ffn"


@register_pass("ffn", FFN, lambda e: FFN(kept=e["kept"]))
def prune_ffn(graph: DependencyGraph, cfg: FFN, args: tuple) -> PassResult:
    """Remove MLP hidden neurons from ``graph.gm`` (in place)."""
    return prune_aligned(graph, cfg, args)
