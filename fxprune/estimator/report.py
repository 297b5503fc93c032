"""What the estimator returns: priced scenarios, roofline rows, and their tables."""

from __future__ import annotations

from dataclasses import dataclass, field

from fxprune._util import Report
from fxprune.estimator.costs import RooflineRow


@dataclass
class Scenario:
    """One way of pruning, priced: counts, bytes per dtype and format, FLOPs, speedups."""

    name: str
    params: int
    bytes: dict[str, dict[str, float]]  # format -> dtype -> bytes
    flops: float  # FLOPs actually executed per example batch
    nominal_flops: float  # FLOPs on non-zero weights
    speedup: dict[str, dict[int, float]] = field(default_factory=dict)  # hardware -> batch -> x
    formulas: list[str] = field(default_factory=list)
    skipped: str | None = None


@dataclass
class EstimateReport(Report):
    """What :func:`estimate` priced; ``table()`` for people, ``to_json()`` for machines."""

    model: str
    example_batch: int
    batch_sizes: list[int]
    hardware: list[str]
    dtypes: dict[str, str]
    scenarios: list[Scenario]
    roofline: dict[str, dict[int, list[RooflineRow]]]  # hardware -> batch -> rows (dense)
    notes: list[str]
    comparisons: list[dict] = field(default_factory=list)
    ridges: dict[str, float] = field(default_factory=dict)  # hardware -> FLOP/byte at its dtype

    def scenario(self, name: str) -> Scenario:
        for s in self.scenarios:
            if s.name == name or s.name.startswith(name):
                return s
        raise KeyError(name)

    def compare(self, measured, hardware: str = "cpu", scenario: str = "structured") -> list[dict]:
        """Put the estimate next to a :class:`fxprune.verify.LatencyReport` of the same pruned
        model (one row per batch size both have); the rows are also kept in ``comparisons``."""
        s = self.scenario(scenario)
        rows = []
        for r in measured.rows:
            est = s.speedup.get(hardware, {}).get(r.batch)
            if est is None:
                continue
            rows.append(
                {
                    "scenario": s.name,
                    "hardware": hardware,
                    "backend": measured.backend,
                    "batch": r.batch,
                    "estimated": est,
                    "measured": r.speedup,
                    "measured_over_estimated": r.speedup / est if est else float("nan"),
                }
            )
        self.comparisons += rows
        return rows

    def table(self, roofline_top: int = 8) -> str:
        out = [f"{self.model}: estimate from the traced graph (example batch {self.example_batch})"]
        out.append("")
        out.append("| scenario | params | fp32 | fp16 | int8 | GFLOPs run | GFLOPs non-zero |")
        out.append("|---|---|---|---|---|---|---|")
        for s in self.scenarios:
            if s.skipped:
                out.append(f"| {s.name} | skipped: {s.skipped} | | | | | |")
                continue
            for fmt, by in s.bytes.items():
                label = s.name if fmt == "dense" else f"{s.name} ({fmt})"
                out.append(
                    f"| {label} | {fmt_count(s.params)} | {fmt_mb(by['fp32'])} | {fmt_mb(by['fp16'])} "
                    f"| {fmt_mb(by['int8'])} | {s.flops / 1e9:.2f} | {s.nominal_flops / 1e9:.2f} |"
                )
        out.append("")
        head = " | ".join(
            f"{h} ({self.dtypes[h]}) b{b}" for h in self.hardware for b in self.batch_sizes
        )
        out.append(f"| speedup vs dense | {head} |")
        out.append("|---" * (1 + len(self.hardware) * len(self.batch_sizes)) + "|")
        for s in self.scenarios:
            if s.skipped or s.name == "dense":
                continue
            cells = [f"{s.speedup[h][b]:.2f}x" for h in self.hardware for b in self.batch_sizes]
            out.append(f"| {s.name} | " + " | ".join(cells) + " |")
        for s in self.scenarios:
            if s.formulas:
                out.append("")
                out.append(f"{s.name}:")
                out += [f"  {f}" for f in s.formulas]
        for h in self.hardware:
            for b in self.batch_sizes:
                rows = self.roofline[h][b]
                total = sum(r.ms for r in rows) or 1.0
                mem = sum(r.ms for r in rows if r.bound == "memory")
                ridge = self.ridges.get(h, float("nan"))
                out.append("")
                out.append(
                    f"roofline {h} {self.dtypes[h]}, batch {b}: ridge point {ridge:.0f} FLOP/byte; "
                    f"{100 * mem / total:.0f} % of the modelled time is memory-bound"
                )
                if roofline_top:
                    out.append("| layer | op | GFLOPs | MB moved | FLOP/byte | bound | share |")
                    out.append("|---|---|---|---|---|---|---|")
                    for r in sorted(rows, key=lambda r: -r.ms)[:roofline_top]:
                        out.append(
                            f"| {r.layer} | {r.op} | {r.flops / 1e9:.3f} | {r.bytes / 1e6:.2f} "
                            f"| {r.intensity:.1f} | {r.bound} | {100 * r.ms / total:.1f} % |"
                        )
        if self.comparisons:
            out.append("")
            out.append("| scenario | hardware | backend | batch | estimated | measured | ratio |")
            out.append("|---|---|---|---|---|---|---|")
            for c in self.comparisons:
                out.append(
                    f"| {c['scenario']} | {c['hardware']} | {c['backend']} | {c['batch']} "
                    f"| {c['estimated']:.2f}x | {c['measured']:.2f}x "
                    f"| {c['measured_over_estimated']:.2f} |"
                )
        if self.notes:
            out.append("")
            out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


def fmt_count(v: float) -> str:
    return f"{v:,.0f}"


def fmt_mb(v: float) -> str:
    return f"{v / 1e6:.2f} MB"
