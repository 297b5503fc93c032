"""What :class:`fxprune.compile_backend.Backend` did: one row per graph dynamo compiled."""

from __future__ import annotations

from dataclasses import dataclass, field

from fxprune._util import Report
from fxprune.plan import Summary
from fxprune.verify.semi_structured import SwapPlan


@dataclass
class GraphReport:
    """One graph dynamo compiled: where it came from, how it ends, what was pruned in it.

    ``shapes`` maps each tensor that shrank to ``[dense shape, pruned shape]``; ``summary`` is
    the parameter / MAC table of the tensors this graph reads (:class:`fxprune.plan.Summary`);
    ``kept_at_break`` the layers a recipe left whole because their channels leave the graph.
    """

    compile_id: str  # dynamo's frame / recompile id, "0/0", "0/1" after a recompile
    frame: str  # the function dynamo compiled ("forward", "torch_dynamo_resume_in_forward_at_9")
    ends: str  # "return", or "graph break at file:line (reason)"
    layers: list[str] = field(default_factory=list)
    shapes: dict[str, list[list[int]]] = field(default_factory=dict)
    summary: Summary | None = None
    kept_at_break: list[str] = field(default_factory=list)
    seconds: float = 0.0
    semi_structured: SwapPlan | None = None  # the 2:4 sparse-tensor decisions (N:M graphs)

    @property
    def params_before(self) -> int:
        return self.summary.params_before if self.summary else 0

    @property
    def params_after(self) -> int:
        return self.summary.params_after if self.summary else 0

    def to_dict(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k not in ("summary", "semi_structured")}
        out["summary"] = self.summary.to_dict() if self.summary else None
        plan = self.semi_structured
        out["semi_structured"] = plan.to_dict() if plan else None
        return out


@dataclass
class BackendReport(Report):
    """Every graph compiled so far (``graphs``) and the errors raised: dynamo wraps them in
    ``BackendCompilerFailed``, and with ``torch._dynamo.config.suppress_errors`` runs that frame
    dense instead, which only this list then shows."""

    source: str
    graphs: list[GraphReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    plan_layers: list[str] = field(default_factory=list)

    @property
    def pruned_layers(self) -> list[str]:
        return sorted({la for g in self.graphs for la in g.layers})

    @property
    def missing(self) -> list[str]:
        """Layers the plan prunes that no graph compiled so far has pruned."""
        return sorted(set(self.plan_layers) - set(self.pruned_layers))

    def table(self) -> str:
        lines = [f"fxprune.backend ({self.source}): {len(self.graphs)} graph(s)", ""]
        lines.append("| graph | frame | ends | layers pruned | params | MACs |")
        lines.append("|---|---|---|---:|---|---|")
        for g in self.graphs:
            s = g.summary
            p = f"{s.params_before:,} -> {s.params_after:,}" if s else "-"
            m = f"{s.macs_before:,} -> {s.macs_after:,}" if s else "-"
            lines.append(f"| {g.compile_id} | {g.frame} | {g.ends} | {len(g.layers)} | {p} | {m} |")
        lines += [
            f"\n{g.semi_structured.note(g.compile_id)}" for g in self.graphs if g.semi_structured
        ]
        if self.missing:
            more = " ..." if len(self.missing) > 8 else ""
            lines.append(f"\nnot pruned by any graph yet: {', '.join(self.missing[:8])}{more}")
        lines += [f"\nerror: {e}" for e in self.errors]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "graphs": [g.to_dict() for g in self.graphs],
            "errors": list(self.errors),
            "missing": self.missing,
        }
