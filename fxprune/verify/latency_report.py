"""What the latency verifier reports: one :class:`LatencyRow` per batch size in a
:class:`LatencyReport`, the :func:`verdict` each row gets, and how much to trust it
(:func:`noise_reasons`; ``fxprune.verify.latency`` measures them).

A decode backend (``onnxruntime-genai``, ``fxprune.verify.decode``) fills the same rows with
generation timings: ``dense_ms`` / ``pruned_ms`` are milliseconds per decode step (one new token
per batch row), ``speedup`` the decode speedup, and the decode fields are set: time to the first
token (the prefill of ``prompt_len`` tokens), tokens per second, ``bytes_ratio`` (pruned / dense
bytes of the weights a decode step reads whole: every matrix, not the embedding table, of which
it gathers a row) and ``efficiency = speedup x bytes_ratio`` (decode is bound by bytes, not
MACs); ``parity`` is the fraction of new tokens from the first one
that differs from the PyTorch model's greedy tokens on (0: all equal).

A run is *noisy* when the machine was not quiet enough for its numbers to be repeatable:

- other processes kept more than :data:`OTHER_CPU_LIMIT` (0.25) cores busy beyond the cores the
  run leaves spare (CPUs - threads) while it timed: at 2 threads that takes an eighth of the
  run's CPU, several times the 3 % band the verdict calls "no measurable change". Read over
  at least :data:`MIN_WINDOW_S` seconds (``/proc/stat`` counts in 10 ms ticks);
- or the per-round medians of either model spread by more than :data:`SPREAD_LIMIT` (10 %,
  p90 - p10 over the median of the rounds): the machine's speed changed during the run, so
  the speedup depends on when it was measured.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

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
    speedup_p10: float | None = None  # p10 / p90 of the per-round speedups
    speedup_p90: float | None = None
    round_spread: float | None = None  # (p90 - p10) / median of per-round medians, worse model
    other_cpu: float | None = None  # cores others kept busy while it timed (None: < MIN_WINDOW_S)
    timed_s: float = 0.0  # wall seconds of this row's timed rounds
    noisy: bool = False
    noise: list[str] = field(default_factory=list)  # why it is noisy (empty: it is not)
    # decode backends only (None otherwise): medians over the timed generations
    ttft_dense_ms: float | None = None  # time to the first token: prefill of prompt_len tokens
    ttft_pruned_ms: float | None = None
    dense_tokens_s: float | None = None  # new tokens per second over the batch, after the first
    pruned_tokens_s: float | None = None
    bytes_ratio: float | None = None  # pruned / dense bytes a decode step reads (embedding rows
    # gathered, not counted); efficiency = speedup x this


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
    cpus: int | None = None  # CPUs of the machine (what /proc/stat sums over)
    other_cpu: float | None = None  # cores other processes kept busy, over the timed windows
    timed_s: float = 0.0  # wall seconds the other-CPU reading covers
    cpu_source: str = ""  # "/proc", "psutil" or "unavailable"
    topped_up_s: float = 0.0  # of timed_s: read right after a run shorter than MIN_WINDOW_S
    noisy: bool = False  # the run's other CPU or any row flagged
    noise: list[str] = field(default_factory=list)  # the run's reasons
    mode: str = "forward"  # "decode": generation timed (prompt_len, new_tokens)
    prompt_len: int | None = None
    new_tokens: int | None = None

    @property
    def spare_cores(self) -> int:
        """CPUs the run leaves to other processes (0 when it uses them all)."""
        return max(0, (self.cpus or self.threads) - self.threads)

    def table(self) -> str:
        if self.mode == "decode":
            return self._decode_table()
        lines = [
            f"backend {self.backend}, {self.threads} threads, {self.warmup} warm-up + "
            f"{self.repeats} timed calls per model and batch, dense/pruned interleaved; "
            f"{self.machine}",
            "",
            "| batch | dense ms [p10-p90] | pruned ms [p10-p90] | speedup [rounds p10-p90] "
            "| MAC ratio | efficiency | parity | verdict | noise |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.batch} | {r.dense_ms:.3f} [{r.dense_p10:.3f}-{r.dense_p90:.3f}] "
                f"| {r.pruned_ms:.3f} [{r.pruned_p10:.3f}-{r.pruned_p90:.3f}] "
                f"| {r.speedup:.2f}x{_range(r.speedup_p10, r.speedup_p90)} "
                f"| {r.mac_ratio:.3f} | {r.efficiency:.2f} "
                f"| {r.parity:.1e} | {r.verdict} | {noise_cell(r)} |"
            )
        lines += [f"note: {n}" for n in self.notes + self.noise_notes()]
        return "\n".join(lines)

    def _decode_table(self) -> str:
        lines = [
            f"backend {self.backend} (decode), {self.threads} threads, {self.warmup} warm-up + "
            f"{self.repeats} timed generations per model and batch of {self.prompt_len} prompt "
            f"tokens + {self.new_tokens} new tokens, dense/pruned interleaved; {self.machine}",
            "",
            "| batch | TTFT ms dense / pruned | decode tok/s dense / pruned "
            "| decode speedup [rounds p10-p90] | bytes ratio | efficiency | tokens differing "
            "| verdict | noise |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.batch} | {_num(r.ttft_dense_ms, '.2f')} / {_num(r.ttft_pruned_ms, '.2f')} "
                f"| {_num(r.dense_tokens_s, '.1f')} / {_num(r.pruned_tokens_s, '.1f')} "
                f"| {r.speedup:.2f}x{_range(r.speedup_p10, r.speedup_p90)} "
                f"| {_num(r.bytes_ratio, '.3f')} | {r.efficiency:.2f} | {r.parity:.0%} "
                f"| {r.verdict} | {noise_cell(r)} |"
            )
        return "\n".join(lines + [f"note: {n}" for n in self.notes + self.noise_notes()])

    def noise_notes(self) -> list[str]:
        """What the noise column means, and the verdict on this run's machine state."""
        oc = "not measured" if self.other_cpu is None else f"{self.other_cpu:.2f} cores"
        after = f", {self.topped_up_s:.2f} s of it just after" if self.topped_up_s else ""
        where = f"{self.cpu_source or 'unavailable'}{after}"
        machine = f"{self.cpus or '?'} CPUs, {self.threads} threads, {self.spare_cores} spare"
        out = [
            f"noise: other processes' CPU use while timing: {oc} over {self.timed_s:.2f} s "
            f"({where}; {machine}); a row is noisy past {OTHER_CPU_LIMIT} cores beyond the "
            f"spare ones or a {SPREAD_LIMIT:.0%} spread of its per-round medians"
        ]
        if self.noisy:
            rows = [
                f"batch {r.batch}: {n}" for r in self.rows for n in r.noise if n not in self.noise
            ]
            why = "; ".join(self.noise + rows)
            out.append(
                f"NOISY run ({why}): the speedup may not repeat; re-run on a quiet machine "
                "(or with fewer threads) before trusting it"
            )
        return out

    def slower(self) -> bool:
        """True when the pruned model was slower than the dense one at any batch size."""
        return any(r.speedup < 1.0 for r in self.rows)

    def min_speedup(self) -> float:
        return min((r.speedup for r in self.rows), default=0.0)


OTHER_CPU_LIMIT = 0.25
"""Cores other processes may keep busy, beyond the spare ones, before a run is noisy."""

SPREAD_LIMIT = 0.10
"""Relative spread (p90 - p10 over the median) of per-round medians before a row is noisy."""

MIN_WINDOW_S = 0.5
"""Seconds an other-CPU reading must cover to be judged (``/proc/stat`` ticks are 10 ms)."""


def noise_reasons(
    other_cpu: float | None,
    round_spread: float | None,
    spare_cores: float = 0.0,
    window_s: float = math.inf,
) -> list[str]:
    """Why a measurement is noisy (empty: it is clean). ``other_cpu``: cores other processes
    kept busy while timing (None: unknown, not judged), read over ``window_s`` seconds (shorter
    than :data:`MIN_WINDOW_S`: not judged); ``spare_cores``: CPUs the run leaves free;
    ``round_spread``: (p90 - p10) / median of the per-round medians."""
    out = []
    if other_cpu is not None and window_s >= MIN_WINDOW_S:
        if other_cpu - spare_cores > OTHER_CPU_LIMIT:
            spare = f" beyond the {spare_cores:g} spare" if spare_cores else ""
            out.append(f"other processes kept {other_cpu:.2f} cores busy{spare}")
    if round_spread is not None and round_spread > SPREAD_LIMIT:
        out.append(f"per-round medians spread {round_spread:.0%}")
    return out


def noise_cell(r: LatencyRow) -> str:
    """The table's noise column: ok / NOISY, the round spread and the other-CPU reading."""
    parts = []
    if r.round_spread is not None:
        parts.append(f"spread {r.round_spread:.0%}")
    if r.other_cpu is not None:
        parts.append(f"other CPU {r.other_cpu:.2f}")
    return ("NOISY" if r.noisy else "ok") + (f" ({', '.join(parts)})" if parts else "")


def _range(lo: float | None, hi: float | None) -> str:
    return "" if lo is None or hi is None else f" [{lo:.2f}-{hi:.2f}]"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def verdict(speedup: float, efficiency: float, removed: str = "MACs") -> str:
    """The row's verdict; ``removed`` names what ``efficiency`` weighs the speedup by."""
    if speedup < 0.97:
        return "slower"
    if speedup < 1.03:
        return "no measurable change"
    if efficiency < 0.5:
        return f"faster, but less than half of the removed {removed} show up as time"
    return "faster"


def spread(values: list[float]) -> float:
    """(p90 - p10) / median of ``values`` (0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    lo, hi = np.percentile(values, [10, 90])
    med = statistics.median(values)
    return float(hi - lo) / med if med else 0.0


def median_p10_p90(samples: list[float]) -> tuple[float, float, float]:
    q = np.percentile(samples, [10, 90])
    return statistics.median(samples), float(q[0]), float(q[1])
