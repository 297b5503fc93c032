"""What the latency verifier reports: one :class:`LatencyRow` per batch size in a
:class:`LatencyReport`, and the :func:`verdict` each row gets (``fxprune.verify.latency``
measures them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fxprune._util import Report


@dataclass
class LatencyRow:
    """One batch size: milliseconds per forward (median, p10, p90) of both models and the
    derived figures."""

    batch: int
    dense_ms: float
    dense_p10: float
    dense_p90: float
    pruned_ms: float
    pruned_p10: float
    pruned_p90: float
    speedup: float  # dense median / pruned median
    mac_ratio: float  # pruned MACs / dense MACs
    efficiency: float  # speedup x mac_ratio
    parity: float  # max rel err of the backend's pruned output against PyTorch eager
    verdict: str


@dataclass
class LatencyReport(Report):
    """What :func:`latency` measured; ``table()`` for people, ``to_json()`` for machines."""

    backend: str
    threads: int
    warmup: int
    repeats: int
    rows: list[LatencyRow] = field(default_factory=list)
    machine: str = ""
    notes: list[str] = field(default_factory=list)  # what each backend did (sparse layers, ...)

    def table(self) -> str:
        lines = [
            f"backend {self.backend}, {self.threads} threads, {self.warmup} warm-up + "
            f"{self.repeats} timed calls per model and batch, dense/pruned interleaved; "
            f"{self.machine}",
            "",
            "| batch | dense ms [p10-p90] | pruned ms [p10-p90] | speedup | MAC ratio "
            "| efficiency | parity | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.batch} | {r.dense_ms:.3f} [{r.dense_p10:.3f}-{r.dense_p90:.3f}] "
                f"| {r.pruned_ms:.3f} [{r.pruned_p10:.3f}-{r.pruned_p90:.3f}] "
                f"| {r.speedup:.2f}x | {r.mac_ratio:.3f} | {r.efficiency:.2f} "
                f"| {r.parity:.1e} | {r.verdict} |"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def slower(self) -> bool:
        """True when the pruned model was slower than the dense one at any batch size."""
        return any(r.speedup < 1.0 for r in self.rows)

    def min_speedup(self) -> float:
        return min((r.speedup for r in self.rows), default=0.0)


def verdict(speedup: float, efficiency: float) -> str:
    if speedup < 0.97:
        return "slower"
    if speedup < 1.03:
        return "no measurable change"
    if efficiency < 0.5:
        return "faster, but less than half of the removed MACs show up as time"
    return "faster"
