"""Head pass: remove whole attention heads.

The dependency graph makes a head one unit: where a projection's output is split into
``(heads, head_dim)`` on its way to an attention product, the reshape rule keeps the head index
and couples ``head_dim`` into it, and the attention product couples head ``h`` of q with head
``h`` of k and v (``h // group`` under grouped-query attention, so a KV head goes with its query
heads; where attention broadcasts one KV head to every query head, multi-query as in Falcon,
that head stays and each query head is a unit).
Removing a unit therefore deletes q/k/v rows (or the fused qkv rows) of that head and the
output projection's columns, and every view/expand constant holding a head count is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxprune.errors import ConfigError
from fxprune.graph.depgraph import DependencyGraph, Group
from fxprune.passes import PassResult, register_pass
from fxprune.passes.units import UnitSelection, group_name, prune_units


@dataclass(frozen=True)
class Heads(UnitSelection):
    """Options of the head pass.

    Args:
        ratio: fraction of each attention layer's heads removed, in [0, 1); or an ``int``: that
            many heads removed from every attention layer. Under grouped-query attention the
            unit is a key/value head with its query heads (one broadcast KV head: a query head).
        min_heads: never keep fewer heads (units) than this in a layer.
    """

    min_heads: int = 1
    kinds: tuple[str, ...] = ("heads",)

    name = "heads"
    option = "heads"

    def check_ratio(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise ConfigError(f"heads={self.ratio!r}: give a fraction in [0, 1) or a head count")
        if isinstance(self.ratio, int) and self.ratio >= 1:
            if self.global_ranking:
                raise ConfigError(
                    f"heads={self.ratio}: a head count per layer cannot be ranked globally; "
                    "give a fraction with global_ranking=True"
                )
            return  # a number of heads per layer, checked against each layer in check_counts
        if isinstance(self.ratio, float) and self.ratio >= 1.0:
            raise ConfigError(
                f"heads={self.ratio!r} would remove every head of every attention layer: give "
                "a fraction in [0, 1) or a number of heads per layer"
            )
        super().check_ratio()

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.min_heads, int) and self.min_heads >= 1):
            raise ConfigError(f"min_heads={self.min_heads!r}: must be an integer >= 1")

    def units_to_keep(self, group: Group, ratio: float) -> int:
        n = len(group.units)
        if isinstance(ratio, int) and ratio >= 1:
            return n - ratio
        return max(self.min_units(group), super().units_to_keep(group, ratio))

    def min_units(self, group: Group) -> int:
        return min(len(group.units), self.min_heads)


def check_counts(graph: DependencyGraph, cfg: Heads) -> None:
    """A head count larger than a layer has, or one that leaves fewer than ``min_heads``, is an
    error naming the layer, before anything is removed."""
    if not (isinstance(cfg.ratio, int) and cfg.ratio >= 1):
        return
    for g in graph.groups:
        if g.kind == "heads" and len(g.units) - cfg.ratio < cfg.min_heads:
            raise ConfigError(
                f"heads={cfg.ratio}: attention layer {group_name(graph, g)} has {len(g.units)} "
                f"heads (units); removing {cfg.ratio} would leave fewer than min_heads="
                f"{cfg.min_heads}"
            )


@register_pass("heads", Heads, lambda e: Heads(kept=e["kept"]))
def prune_heads(graph: DependencyGraph, cfg: Heads, args: tuple) -> PassResult:
    """Remove attention heads from ``graph.gm`` (in place)."""
    if cfg.kept is None:
        if not any(g.kind == "heads" for g in graph.groups):
            raise ConfigError(no_heads_message(graph, cfg))
        check_counts(graph, cfg)
    return prune_units(graph, cfg, args)


ATTENTION_WORDS = ("attention", "matmul", "bmm", "einsum", "softmax", "MultiheadAttention")
QKV_WORDS = ("q_proj", "k_proj", "v_proj", "qkv", "query", "key", "value", "c_attn")


def no_heads_message(graph: DependencyGraph, cfg: Heads) -> str:
    seen = [
        f"{b['node']} ({b['op']}: {b['reason']})"
        for b in graph.barrier_report()
        if any(w.lower() in b["op"].lower() for w in ATTENTION_WORDS)
    ]
    inexact = [
        f"{b['node']} ({b['reason']})"
        for b in graph.barrier_report()
        if b["approximate"] and all(any(w in ly for w in QKV_WORDS) for ly in b["layers"])
    ]
    if inexact:  # heads exist, only a norm of the q / k projections spans them all
        return (
            f"heads={cfg.ratio!r}: removing a head is not exact in this model: "
            + "; ".join(inexact[:3])
            + "; allow_approximate=True prunes them and reports the measured output deviation"
        )
    msg = f"heads={cfg.ratio!r}: no prunable attention heads found in the traced graph"
    if seen:
        msg += "; attention ops that kept their channels: " + "; ".join(seen[:5])
    else:
        msg += (
            " (no q/k/v projection split into (heads, head_dim) reaches a matmul or "
            "scaled_dot_product_attention; a module fx cannot trace into, such as "
            "nn.MultiheadAttention, hides its heads)"
        )
    return msg
