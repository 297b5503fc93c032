"""Iterative pruning: reach a target ratio in steps, fine-tuning in between.

At step k of n the ratio removed so far follows a schedule (``s_f`` the target):

- ``linear``: ``s_k = s_f x k / n``
- ``cubic`` (Zhu & Gupta 2017, "To prune, or not to prune"): ``s_k = s_f x (1 - (1 - k/n)^3)``,
  fast at first while the network has redundancy to spare, slow at the end;
- ``exponential``: ``s_k = 1 - (1 - s_f)^(k/n)``, the same fraction of what is left each step.

Every group's kept count at step k is what a one-shot ``fxprune.compile`` at ``s_k`` would keep
from the *original* group (round_to and minimums included), so the last step lands exactly on
the one-shot target. Each step is a real ``fxprune.compile`` of the previous step's model, proved
equivalent to it, then handed to the user's fine-tune callback; with ``sparsity="2:4"`` or
``unstructured=`` the step's masks are re-applied after the callback and
``step.keep_masks(optimizer)`` keeps them fixed during it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fxprune._util import Report, eval_mode, jsonable
from fxprune.calibration import take_batches
from fxprune.errors import ConfigError, NothingToPruneError

SCHEDULES = ("linear", "cubic", "exponential")


def schedule_ratio(schedule: str, k: int, n: int, target: float) -> float:
    """The ratio removed after step ``k`` of ``n`` (``k = n`` gives ``target``)."""
    t = k / n
    if schedule == "linear":
        return target * t
    if schedule == "cubic":
        return target * (1 - (1 - t) ** 3)
    if schedule == "exponential":
        return 1 - (1 - target) ** t
    raise ConfigError(f"schedule={schedule!r}: choose one of {SCHEDULES}")


@dataclass
class Step:
    """One pruning step; ``keep_masks(optimizer)`` hooks the step's N:M masks into an optimizer
    so fine-tuning never revives a pruned weight."""

    index: int
    ratios: dict[str, float]  # kind -> ratio of the original removed after this step
    result: object  # the step's CompileResult (relative to the previous step's model)
    equivalent: bool
    params: int
    macs: int
    metric: float | None = None
    heal: object = None  # the step's HealReport when iterative_prune(heal=...) healed it
    revived: int = 0  # masked weights the fine-tune made non-zero (re-zeroed afterwards)
    seconds: float = 0.0

    @property
    def module(self):
        return self.result.module

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.result.masks

    def keep_masks(self, optimizer):
        from fxprune.passes.nm import keep_masks

        return keep_masks(self.result.module, self.masks, optimizer)


@dataclass
class IterativeResult(Report):
    module: torch.nn.Module
    steps: list[Step] = field(default_factory=list)
    baseline: float | None = None
    params: int = 0
    macs: int = 0

    def combined(self):
        """One :class:`fxprune.CompileResult` from the dense model to the final one: the steps'
        plan entries in order (a plan replays them one after another), so ``.save(path)`` and
        ``fxprune.load(path, dense_model)`` work as for a one-shot result. Its equivalence proof
        against the dense model holds only when no fine-tuning changed the weights."""
        from fxprune.plan import CompileResult, Plan, Summary

        first, last = self.steps[0].result, self.steps[-1].result

        def stats(rows, side):
            return {
                r.layer: {
                    "params": getattr(r, f"params_{side}"),
                    "macs": getattr(r, f"macs_{side}"),
                }
                for r in rows
            }

        entries = [e for s in self.steps for e in s.result.plan.passes]
        plan = Plan(first.plan.mode, first.plan.inputs, dict(last.plan.config), entries)
        return CompileResult(
            last.module,
            plan,
            Summary.between(
                stats(first.summary.layers, "before"), stats(last.summary.layers, "after")
            ),
            first.barriers,
            [p for s in self.steps for p in s.result.passes],
            approximate=any(s.result.approximate for s in self.steps),
            seconds=sum(s.seconds for s in self.steps),
        )

    def save(self, path, source: dict | None = None) -> None:
        """Plan (every step) + the final state_dict; reload with ``fxprune.load``."""
        self.combined().save(path, source=source)

    def table(self) -> str:
        lines = [
            "| step | ratios | params | MACs | proof | metric | revived masked weights |",
            "|---|---|---|---|---|---|---|",
        ]
        if self.baseline is not None:
            lines.append(
                f"| dense | - | {self.params:,} | {self.macs:,} | - | {self.baseline:.4f} | - |"
            )
        for s in self.steps:
            r = ", ".join(f"{k} {v:.3f}" for k, v in s.ratios.items())
            m = "-" if s.metric is None else f"{s.metric:.4f}"
            lines.append(
                f"| {s.index} | {r} | {s.params:,} | {s.macs:,} | "
                f"{'exact' if s.equivalent else 'FAILED'} | {m} | {s.revived} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The dense counts and each step's numbers (each step's plan under ``combined()``)."""
        keys = ("index", "ratios", "equivalent", "params", "macs", "metric", "revived", "seconds")
        return jsonable(
            {
                "baseline": self.baseline,
                "params": self.params,
                "macs": self.macs,
                "steps": [{k: getattr(s, k) for k in keys} for s in self.steps],
            }
        )


def _configs(kw: dict):
    from fxprune.passes.channels import Channels
    from fxprune.passes.ffn import FFN
    from fxprune.passes.heads import Heads

    round_to = kw.get("round_to")
    if round_to == "auto":
        raise ConfigError(
            "round_to='auto' is not supported by iterative_prune: the steps' counts are planned "
            "against the original groups before any layer is timed; give an integer"
        )
    if round_to is None:
        round_to = int(str(kw["sparsity"]).split(":")[1]) if kw.get("sparsity") else 1
    mc = kw.get("min_channels", 1)
    return {
        "channels": Channels(0.0, round_to=round_to, min_channels=mc),
        "ffn": FFN(0.0, round_to=round_to, min_channels=mc),
        "heads": Heads(0.0, min_heads=kw.get("min_heads", 1)),
    }


def iterative_prune(
    model: torch.nn.Module,
    example_inputs,
    steps: int = 4,
    schedule: str = "cubic",
    channels: float = 0.0,
    heads: float = 0.0,
    ffn: float = 0.0,
    unstructured: float = 0.0,
    finetune: Callable[[torch.nn.Module, Step], None] | None = None,
    evaluate: Callable[[torch.nn.Module], float] | None = None,
    heal: dict | None = None,
    **compile_kwargs,
) -> IterativeResult:
    """Prune ``model`` to the ``channels`` / ``heads`` / ``ffn`` fractions in ``steps`` steps.

    Args:
        model: the dense model (not modified; the first step copies it).
        example_inputs: as for ``fxprune.compile``.
        steps: number of pruning steps (each followed by ``finetune`` and ``evaluate``).
        schedule: ``"linear"``, ``"cubic"`` or ``"exponential"`` (module docstring).
        channels, heads, ffn: target fractions removed, as in ``fxprune.compile`` (fractions
            only: a head count per layer has no schedule).
        unstructured: target fraction of weights zeroed (``fxprune.compile(unstructured=)``);
            each step zeroes up to its scheduled fraction, keeping the earlier zeros.
        finetune: ``finetune(module, step)`` trains ``module`` in place after each step; use
            ``step.keep_masks(optimizer)`` to keep a 2:4 pattern fixed while it trains.
        evaluate: ``evaluate(module) -> float``, recorded for the dense model and every step.
        heal: ``fxprune.heal`` arguments (``batches``, ``steps``, ``lr`` required; ``loss``,
            ``temperature`` ...): after each step the step's model is distilled from the dense
            ``model`` with the step's masks held, before ``finetune``; ``step.heal`` is the
            :class:`fxprune.heal.HealReport`.
        **compile_kwargs: further ``fxprune.compile`` arguments (``importance``, ``ignore``,
            ``round_to``, ``sparsity="2:4"``, ``calibration`` ...), applied at every step.

    Returns:
        An :class:`IterativeResult`: ``module`` (the final model) and one :class:`Step` per
        step (ratios, params, MACs, proof, metric).
    """
    from fxprune.graph import build_graph, capture
    from fxprune.graph.trace import as_args
    from fxprune.stats import layer_stats

    targets = _targets(channels, heads, ffn, unstructured, steps, schedule, compile_kwargs)
    _check_heal(heal)
    if heal is not None and not isinstance(heal["batches"], (list, tuple)):
        heal = {**heal, "batches": list(heal["batches"])}  # every step reads them: a generator once
    args = as_args(example_inputs, model)
    if compile_kwargs.get("calibration") is not None:  # every step reads it: a generator once
        compile_kwargs["calibration"] = take_batches(
            compile_kwargs["calibration"], compile_kwargs.get("calibration_batches"), model
        )
    mode = compile_kwargs.get("mode", "auto")
    leaves = compile_kwargs.get("leaf_modules", ())
    traced = capture(model, args, mode=mode, leaf_modules=leaves, heads="heads" in targets)
    allow = compile_kwargs.get("allow_approximate", False)
    structural = {k: v for k, v in targets.items() if k != "unstructured"}
    original = _original_groups(build_graph(traced.gm, allow), traced, structural)
    stats0 = layer_stats(traced.gm)
    out = IterativeResult(
        model,
        params=sum(p.numel() for p in model.parameters()),
        macs=sum(v["macs"] for v in stats0.values()),
    )
    if evaluate is not None:
        with torch.no_grad(), eval_mode(model):  # each submodule's own flag comes back after
            out.baseline = float(evaluate(model))
    step_mode = traced.mode  # every step captures the way the dense model had to be captured
    pass_kw = {k: v for k, v in compile_kwargs.items() if k not in ("round_to", "mode")}
    pass_kw["round_to"] = 1  # alignment is already in the kept counts computed below
    pass_kw["mode"] = step_mode
    cfgs = _configs(compile_kwargs)
    current = model
    for k in range(1, steps + 1):
        t0 = time.perf_counter()
        ratios = {kind: schedule_ratio(schedule, k, steps, s) for kind, s in targets.items()}
        cur = capture(current, args, mode=step_mode, leaf_modules=leaves)
        rel = _step_ratios(build_graph(cur.gm, allow), original, cfgs, ratios, k, step_mode)
        if "unstructured" in ratios:  # of every weight: the earlier steps' zeros rank first
            rel["unstructured"] = ratios["unstructured"]
        tune = (finetune, evaluate, None if heal is None else (model, heal))
        step = _step(current, args, k, ratios, rel, pass_kw, tune)
        step.seconds = time.perf_counter() - t0
        out.steps.append(step)
        current = step.result.module
    out.module = current
    return out


def _targets(
    channels, heads, ffn, unstructured, steps, schedule, compile_kwargs
) -> dict[str, float]:
    """The kinds to prune and their final fractions, the arguments checked."""
    given = (("channels", channels), ("heads", heads), ("ffn", ffn), ("unstructured", unstructured))
    targets = {k: v for k, v in given if v}
    if not targets:
        raise ConfigError(
            "give a target: channels=, heads=, ffn= or unstructured= (fractions in (0, 1))"
        )
    for k, v in targets.items():
        if isinstance(v, bool) or not isinstance(v, float) or not 0 < v < 1:
            raise ConfigError(f"{k}={v!r}: iterative pruning needs a fraction in (0, 1)")
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"steps={steps!r}: must be an integer >= 1")
    schedule_ratio(schedule, 1, 1, 0.5)  # validates the name
    for k in ("layer_ratios", "head_ratios", "ffn_ratios", "global_ranking", "inplace"):
        if compile_kwargs.get(k):
            raise ConfigError(f"{k}= is not supported by iterative_prune (per-step ratios)")
    return targets


def _original_groups(graph, traced, targets) -> dict:
    """The groups to schedule, by the layer that names them, with their original size; a kind
    asked for that the graph has none of is an error naming why (not a silent no-op)."""
    from fxprune.graph import hidden_attention

    kind_of = {"channels": "channels", "ffn": "ffn" if "ffn" in targets else "channels"}
    kind_of["heads"] = "heads"
    original = {}
    for g in graph.groups:
        k = kind_of.get(g.kind)
        if k in targets and len(g.units):
            original[g.layers(graph)[0]] = (k, g)
    missing = [k for k, r in targets.items() if r and all(k != v[0] for v in original.values())]
    if missing:
        k = missing[0]
        hidden = hidden_attention(traced.gm) if k == "heads" else []
        raise NothingToPruneError(
            f"iterative_prune {k}={targets[k]}: the graph captured with {traced.mode} has no "
            f"prunable {k} group"
            + (
                f" (torch.fx cannot see into {', '.join(hidden[:3])}: use mode='auto' or "
                "mode='export')"
                if hidden
                else ""
            )
        )
    return original


_ARG_OF = {"channels": "layer_ratios", "heads": "head_ratios", "ffn": "ffn_ratios"}


def _step_ratios(graph, original, cfgs, ratios, k: int, step_mode: str) -> dict:
    """Per-layer ratios that take the current model to step k's kept counts (counted against
    the original groups, so rounding never drifts)."""
    by_layer = {g.layers(graph)[0]: g for g in graph.groups}
    rel: dict[str, dict[str, float]] = {}
    for layer, (kind, g0) in original.items():
        keep = cfgs[kind].units_to_keep(g0, ratios[kind])
        g = by_layer.get(layer)
        if g is None:
            raise ConfigError(
                f"iterative_prune step {k}: the {kind} group of layer {layer!r} is not in "
                f"the graph of the previous step's model (captured with {step_mode})"
            )
        if keep < len(g.units):
            n = len(g.units)
            rel.setdefault(_ARG_OF[kind], {})[layer] = (n - keep) / n
    return rel


def _check_heal(heal) -> None:
    if heal is None:
        return
    if not isinstance(heal, dict):
        raise ConfigError(
            f"heal=: got {type(heal).__name__}; give a dict of fxprune.heal arguments"
        )
    missing = [k for k in ("batches", "steps", "lr") if k not in heal]
    if missing:
        raise ConfigError(f"heal=: fxprune.heal needs {', '.join(missing)}")
    import inspect

    from fxprune.heal import heal as heal_fn

    known = set(inspect.signature(heal_fn).parameters) - {"model", "teacher", "masks"}
    unknown = sorted(set(heal) - known - {"teacher", "masks", "model"})
    if unknown:
        raise ConfigError(f"heal=: {unknown} are not fxprune.heal arguments ({sorted(known)})")
    for k in ("teacher", "masks", "model"):
        if k in heal:
            raise ConfigError(
                f"heal={{'{k}': ...}}: iterative_prune sets it (the dense model, each step's masks)"
            )


def _step(current, args, k, ratios, rel, pass_kw, tune) -> Step:
    """Prune, prove, heal / fine-tune (masks re-applied: a revived N:M weight is zeroed and
    counted) and evaluate one step."""
    from fxprune.api import compile as fx_compile
    from fxprune.heal import heal as heal_fn
    from fxprune.verify import equivalence

    finetune, evaluate, healing = tune

    ignore = pass_kw.get("ignore", ())
    res = fx_compile(
        current,
        args,
        ignore=ignore,
        **rel,
        **{k2: v for k2, v in pass_kw.items() if k2 != "ignore"},
    )
    ok = equivalence(current, res, args).ok
    params = sum(p.numel() for p in res.module.parameters())
    step = Step(k, ratios, res, ok, params, res.summary.macs_after)
    if healing is not None:
        teacher, kw = healing
        kw = dict(kw)
        if kw.get("loss") == "lm":  # the next-token loss reads no teacher
            teacher = None
        step.heal = heal_fn(res.module, teacher, kw.pop("batches"), masks=step.masks, **kw)
        res.module.eval()
    if finetune is not None:
        finetune(res.module, step)
        res.module.eval()
    if step.masks:
        with torch.no_grad():
            for name, mask in step.masks.items():
                p = res.module.get_parameter(name)
                step.revived += int(((p != 0) & ~mask.to(p.device)).sum())
                p.mul_(mask.to(p.device))
    if evaluate is not None:
        res.module.eval()  # measured like the dense baseline
        with torch.no_grad():
            step.metric = float(evaluate(res.module))
    return step
