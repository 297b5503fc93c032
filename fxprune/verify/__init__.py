"""The verifier: the equivalence proof (``equivalence``) and the latency comparison
(``latency``) of a pruned model against its dense original."""

from fxprune.verify.latency import (
    BACKENDS,
    Backend,
    LatencyReport,
    LatencyRow,
    OnnxRuntimeGenai,
    RunContext,
    backend,
    latency,
)
from fxprune.verify.proof import RTOL, EquivalenceReport, equivalence
from fxprune.verify.reference import zeroed_dense
from fxprune.verify.semi_structured import SwapPlan, plan_semi_structured, swap_semi_structured

__all__ = [
    "BACKENDS",
    "Backend",
    "RunContext",
    "backend",
    "RTOL",
    "EquivalenceReport",
    "LatencyReport",
    "LatencyRow",
    "OnnxRuntimeGenai",
    "equivalence",
    "latency",
    "zeroed_dense",
    "SwapPlan",
    "plan_semi_structured",
    "swap_semi_structured",
]
