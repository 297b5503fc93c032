"""Per-group sensitivity: prune one group at a time at each ratio, measure the user's metric, and
turn the table into non-uniform per-layer ratios that reach a target (MACs or parameters) while
giving up as little of the metric as the measurements predict.

Each measurement is a real ``fxprune.compile`` of the dense model with only that group pruned
(``layer_ratios`` / ``head_ratios`` / ``ffn_ratios`` naming one of its layers), so the model the
metric sees is exactly the pruned model a full run would produce for that group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fxprune._util import Report
from fxprune.calibration import take_batches
from fxprune.charts import line_chart
from fxprune.errors import ConfigError, NothingToPruneError

KINDS = {"channels": "layer_ratios", "heads": "head_ratios", "ffn": "ffn_ratios"}


@dataclass
class SensitivityRow:
    group: str  # readable group name
    layer: str  # the layer the ratio is given for (one of the group's sources)
    kind: str
    units: int
    ratio: float
    removed: int  # units actually removed at this ratio
    metric: float
    drop: float  # baseline - metric (metric - baseline when lower is better): the loss
    macs_saved: int
    params_saved: int
    ms_saved: float | None = None  # measured dense - pruned median latency (latency_backend)


@dataclass
class SensitivityReport(Report):
    """``rows`` per (group, ratio); ``table()``, ``plot(path)``, ``most_sensitive()`` and
    ``ratios_for_target(...)``."""

    baseline: float
    higher_is_better: bool
    ratios: list[float]
    rows: list[SensitivityRow] = field(default_factory=list)
    macs: int = 0
    params: int = 0
    seconds: float = 0.0
    latency_ms: float | None = None  # dense median latency, mean over the paired measurements

    def groups(self) -> list[str]:
        seen = []
        for r in self.rows:
            if r.group not in seen:
                seen.append(r.group)
        return seen

    def most_sensitive(self, ratio: float | None = None) -> list[str]:
        """Groups, most sensitive first, by their loss at ``ratio`` (default: the largest)."""
        ratio = max(self.ratios) if ratio is None else ratio
        at = {r.group: r.drop for r in self.rows if math.isclose(r.ratio, ratio)}
        return sorted(at, key=lambda g: -at[g])

    def table(self) -> str:
        head = " | ".join(f"r={r:g}" for r in self.ratios)
        lines = [
            f"baseline metric {self.baseline:.4f} ({'higher' if self.higher_is_better else 'lower'}"
            f" is better); loss per group and ratio (MACs saved, % of dense)",
            "",
            f"| group | kind | units | {head} |",
            "|---|---|---|" + "---|" * len(self.ratios),
        ]
        for g in self.groups():
            rs = {r.ratio: r for r in self.rows if r.group == g}
            first = next(iter(rs.values()))
            cells = []
            for ratio in self.ratios:
                r = rs.get(ratio)
                cells.append(
                    "-"
                    if r is None
                    else f"{r.drop:+.4f} ({100 * r.macs_saved / max(self.macs, 1):.1f} %)"
                )
            lines.append(f"| {g} | {first.kind} | {first.units} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path=None, top: int = 12) -> str:
        """An SVG line chart of loss against ratio for the ``top`` most sensitive groups;
        written to ``path`` when given, and returned."""
        groups = self.most_sensitive()[:top]
        series = {g: sorted((r.ratio, r.drop) for r in self.rows if r.group == g) for g in groups}
        svg = line_chart(series, self.ratios, "ratio removed", "metric loss", start=(0.0, 0.0))
        if path is not None:
            from pathlib import Path

            Path(path).write_text(svg, encoding="utf-8")
        return svg

    def ratios_for_target(self, target: float, by: str = "macs") -> dict[str, dict[str, float]]:
        """Per-layer ratios removing at least ``target`` (a fraction) of the dense MACs,
        parameters or measured latency (``by="latency"``, when the report was timed), chosen
        greedily: repeatedly raise the group whose next measured ratio costs
        the least metric per unit saved. Savings are summed per group as measured one at a
        time, so check the result with ``fxprune.compile`` (the returned dict's keys are its
        argument names: ``{"layer_ratios": {...}, "head_ratios": {...}, "ffn_ratios": {...}}``).

        Raises ConfigError when even the largest measured ratios do not reach the target.
        """
        if by not in ("macs", "params", "latency"):
            raise ConfigError(f"by={by!r}: choose 'macs', 'params' or 'latency'")
        if by == "latency" and self.latency_ms is None:
            raise ConfigError("by='latency' needs sensitivity(..., latency_backend=...) timings")
        total = {"macs": self.macs, "params": self.params, "latency": self.latency_ms}[by]
        need = target * total
        steps: dict[str, list[SensitivityRow]] = {
            g: sorted((r for r in self.rows if r.group == g), key=lambda r: r.ratio)
            for g in self.groups()
        }
        level = dict.fromkeys(steps, -1)  # index of the chosen ratio per group

        def saved(r: SensitivityRow | None) -> float:
            if r is None:
                return 0.0
            if by == "latency":
                return r.ms_saved or 0.0
            return r.macs_saved if by == "macs" else r.params_saved

        def loss(r: SensitivityRow | None) -> float:
            return 0.0 if r is None else max(r.drop, 0.0)

        got = 0.0
        while got < need:
            best, best_cost, best_j = None, math.inf, -1
            for g, rows in steps.items():
                i = level[g]
                cur = rows[i] if i >= 0 else None
                for j in range(i + 1, len(rows)):  # any later ratio that saves more
                    gain = saved(rows[j]) - saved(cur)
                    if gain <= 0:
                        continue
                    cost = (loss(rows[j]) - loss(cur)) / gain
                    if cost < best_cost:
                        best, best_cost, best_j = g, cost, j
            if best is None:
                raise ConfigError(
                    f"target {target:g} of {by} is out of reach: the measured ratios "
                    f"(up to {max(self.ratios):g} per group) save {got / total if total else 0:.3f}"
                )
            cur = steps[best][level[best]] if level[best] >= 0 else None
            level[best] = best_j
            got += saved(steps[best][best_j]) - saved(cur)
        out: dict[str, dict[str, float]] = {}
        for g, i in level.items():
            if i >= 0:
                r = steps[g][i]
                out.setdefault(KINDS[r.kind], {})[r.layer] = r.ratio
        return out


def sensitivity(
    model: torch.nn.Module,
    example_inputs,
    evaluate_fn: Callable[[torch.nn.Module], float],
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    kinds: Sequence[str] = ("channels", "heads", "ffn"),
    higher_is_better: bool = True,
    groups: Sequence[str] | None = None,
    recalibrate=None,
    latency_backend: str | None = None,
    latency_batch: int = 8,
    latency_repeats: int = 20,
    progress: bool = False,
    **compile_kwargs,
) -> SensitivityReport:
    """Prune one group at a time at each ratio and measure ``evaluate_fn`` on the result.

    Args:
        model: the dense model (not modified).
        example_inputs: as for ``fxprune.compile``.
        evaluate_fn: ``evaluate_fn(module) -> float``: the user's metric (accuracy, cosine to
            the dense output, minus a loss ...) of a model; called once on the dense model and
            once per group and ratio.
        ratios: fractions removed from the group, each in (0, 1).
        kinds: which groups: ``"channels"``, ``"heads"``, ``"ffn"``.
        higher_is_better: False for a loss or perplexity.
        groups: only groups holding one of these layer names (default: every prunable group).
        recalibrate: batches to re-estimate BatchNorm statistics of each pruned copy on before
            it is measured (``fxprune.calibration.recalibrate_bn``); the dense model is not
            touched. Without it, a BN network's one-shot metric mostly measures stale statistics.
        latency_backend: also time every pruned model against the dense one with
            ``fxprune.verify.latency`` on this backend (``"onnxruntime"``, ``"torch"`` ...) at
            ``latency_batch``, ``latency_repeats`` calls each, so ``ratios_for_target`` can aim
            at measured latency (``by="latency"``).
        progress: a progress bar on stderr (tqdm), one tick per measured (group, ratio).
        **compile_kwargs: further ``fxprune.compile`` arguments (``importance``, ``ignore``,
            ``round_to``, ``calibration`` ...).

    Returns:
        A :class:`SensitivityReport`.

    Example:
        >>> rep = fxprune.sensitivity(model, x, lambda m: accuracy(m, val), ratios=(0.3, 0.6))
        >>> print(rep.table()); rep.most_sensitive()[:3]
        >>> fxprune.compile(model, x, **rep.ratios_for_target(0.5))
    """
    from fxprune._util import eval_mode, progress_bar, resolve_names
    from fxprune.graph import build_graph, capture
    from fxprune.graph.trace import as_args
    from fxprune.stats import layer_stats

    if not ratios or any(not (isinstance(r, (int, float)) and 0 < r < 1) for r in ratios):
        raise ConfigError(f"ratios={ratios!r}: give fractions in (0, 1)")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"kinds={list(kinds)!r}: choose from {list(KINDS)}")
    for k in ("channels", "heads", "ffn", *KINDS.values()):
        if k in compile_kwargs:
            raise ConfigError(f"{k}= is chosen by sensitivity() itself; do not pass it")
    t0 = time.perf_counter()
    if recalibrate is not None:
        recalibrate = list(recalibrate)  # used once per measurement: a generator would run dry
    args = as_args(example_inputs, model)
    if compile_kwargs.get("calibration") is not None:  # one compile per group and ratio reads it
        compile_kwargs["calibration"] = take_batches(
            compile_kwargs["calibration"], compile_kwargs.get("calibration_batches"), model
        )
    ignore = resolve_names(model, compile_kwargs.get("ignore", ()), "ignore")
    if groups is not None:
        resolve_names(model, groups, "groups")
    traced = capture(
        model,
        args,
        mode=compile_kwargs.get("mode", "auto"),
        leaf_modules=compile_kwargs.get("leaf_modules", ()),
        heads="heads" in kinds,
    )
    graph = build_graph(traced.gm, compile_kwargs.get("allow_approximate", False))
    stats = layer_stats(traced.gm)
    with torch.no_grad(), eval_mode(model):  # each submodule's own flag comes back after
        base = float(evaluate_fn(model))
    rep = SensitivityReport(
        base,
        higher_is_better,
        [float(r) for r in ratios],
        macs=sum(v["macs"] for v in stats.values()),
        params=sum(p.numel() for p in model.parameters()),
    )
    todo = _groups_to_measure(graph, kinds, ignore, groups)
    measure = _Measure(
        model,
        args,
        evaluate_fn,
        base,
        higher_is_better,
        recalibrate,
        compile_kwargs,
        latency_backend,
        latency_batch,
        latency_repeats,
    )
    bar = progress_bar(progress, len(todo) * len(ratios), "sensitivity")
    for g in todo:
        for r in ratios:
            bar.update()
            row = measure(graph, g, float(r))
            if row is not None:
                rep.rows.append(row)
    bar.close()
    if measure.dense_ms:
        rep.latency_ms = sum(measure.dense_ms) / len(measure.dense_ms)
    rep.seconds = time.perf_counter() - t0
    return rep


def _groups_to_measure(graph, kinds, ignore, groups) -> list:
    """The groups of the kinds asked for, less those an ignored module holds or ``groups``
    leaves out."""
    from fxprune._util import module_matches
    from fxprune.passes.units import channel_holders

    holders = channel_holders(graph) if ignore else {}
    todo = []
    for g in graph.groups:
        if g.kind not in kinds or not len(g.units):
            continue
        layers = g.layers(graph)
        if any(module_matches(m, p) for m in holders.get(g.id, ()) for p in ignore):
            continue
        if groups is not None and not any(la in groups for la in layers):
            continue
        todo.append(g)
    return todo


@dataclass
class _Measure:
    """One group pruned alone at one ratio: compiled, (BN recalibrated,) evaluated, timed."""

    model: torch.nn.Module
    args: tuple
    evaluate_fn: Callable
    base: float
    higher_is_better: bool
    recalibrate: list | None
    compile_kwargs: dict
    latency_backend: str | None
    latency_batch: int
    latency_repeats: int
    dense_ms: list = field(default_factory=list)

    def __call__(self, graph, g, r: float) -> SensitivityRow | None:
        from fxprune.api import compile as fx_compile
        from fxprune.passes.units import group_name

        layers = g.layers(graph)
        try:
            res = fx_compile(
                self.model, self.args, **{KINDS[g.kind]: {layers[0]: r}}, **self.compile_kwargs
            )
        except NothingToPruneError:
            return None  # the ratio rounds to zero units of this group: nothing to measure
        removed = sum(tot - kept for p in res.passes for tot, kept in p.units.values())
        if not removed:
            return None
        if self.recalibrate is not None:
            from fxprune.calibration import recalibrate_bn

            recalibrate_bn(res.module, self.recalibrate)
        res.module.eval()  # measured like the dense baseline
        with torch.no_grad():
            m = float(self.evaluate_fn(res.module))
        drop = (self.base - m) if self.higher_is_better else (m - self.base)
        sm = res.summary
        return SensitivityRow(
            group_name(graph, g),
            layers[0],
            g.kind,
            len(g.units),
            r,
            removed,
            m,
            drop,
            sm.macs_before - sm.macs_after,
            sm.params_before - sm.params_after,
            self._ms_saved(res),
        )

    def _ms_saved(self, res) -> float | None:
        if self.latency_backend is None:
            return None
        from fxprune.verify import latency

        lat = latency(
            self.model,
            res,
            self.args,
            backend=self.latency_backend,
            batch_sizes=(self.latency_batch,),
            repeats=self.latency_repeats,
        ).rows[0]
        self.dense_ms.append(lat.dense_ms)
        return lat.dense_ms - lat.pruned_ms
