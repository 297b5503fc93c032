"""``fxprune.heal``: train a pruned model back toward its dense teacher (knowledge distillation).

Structured pruning of an LLM costs quality that one-shot criteria cannot give back; Minitron
(Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice") heals the pruned student with
the dense teacher's logits as soft targets, which recovers far more per token than the plain
next-token loss. ``heal`` is that loop, small and honest:

- ``loss="kd"``: KL(teacher || student) on the temperature-softened distributions, times T^2,
  averaged over the real (unpadded) tokens; ``"lm"``: next-token cross entropy on the batch's own
  ids; ``"kd+lm"``: their sum (fxprune/distill.py).
- Every N:M / unstructured mask stays: the masked weights' gradients are zeroed before each
  optimizer step (so the optimizer keeps no state for them) and the weights re-zeroed after it
  (fxprune/trainmasks.py); a zero stays zero.
- The teacher is never trained: it runs under ``no_grad`` in eval mode (each submodule's flag
  restored after). Its weights are not changed; only under torchrun is it sharded, like the
  student.
- Under ``torchrun`` (``torch.distributed`` initialised, world size > 1) both models are wrapped
  with FSDP2's ``fully_shard`` (each repeated block, then the root) unless already sharded; each
  rank gives its own share of the batches, gradients are averaged across ranks by FSDP and the
  recorded loss is the mean over ranks, so N processes on N shares compute what one process
  computes on the whole batch. Masks are held on the shards.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from fxprune import trainloop
from fxprune._util import Report, jsonable
from fxprune.distill import LOSSES, batch_loss
from fxprune.errors import ConfigError
from fxprune.trainmasks import find_masks, hold, mask_grads, place_masks

SCHEDULES = ("constant", "cosine")


@dataclass
class HealReport(Report):
    """What :func:`heal` did: ``model`` (trained in place), the loss per optimizer step, the
    evaluations asked for, and the masks it held."""

    model: nn.Module
    loss: str
    history: list[float] = field(default_factory=list)  # mean loss per optimizer step
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval_fn(model))
    steps: int = 0
    tokens: int = 0  # real tokens the student saw (all ranks)
    seconds: float = 0.0
    masks_held: int = 0  # weight tensors whose zeros were held
    masked_weights: int = 0  # weights held at zero
    revived: int = 0  # masked weights found non-zero after a step (re-zeroed; 0 expected: their
    # gradients are masked before each step, so the optimizer never moves them)
    world_size: int = 1
    sharded: bool = False
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        first = f"{self.history[0]:.4f}" if self.history else "-"
        last = f"{self.history[-1]:.4f}" if self.history else "-"
        lines = [
            "| heal | loss | steps | tokens | first loss | last loss | masks held | seconds |",
            "|---|---|---|---|---|---|---|---|",
            f"| {'FSDP2 x' + str(self.world_size) if self.sharded else 'one process'} | "
            f"{self.loss} | {self.steps} | {self.tokens:,} | {first} | {last} | "
            f"{self.masks_held} ({self.masked_weights:,} weights) | {self.seconds:.1f} |",
        ]
        if self.evals:
            lines += ["", "| step | eval |", "|---|---|"]
            lines += [f"| {s} | {v:.4f} |" for s, v in self.evals]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def to_dict(self) -> dict:
        keys = ("loss", "history", "evals", "steps", "tokens", "seconds", "masks_held")
        keys += ("masked_weights", "revived", "world_size", "sharded", "notes")
        return jsonable({k: getattr(self, k) for k in keys})


def heal(
    model,
    teacher: nn.Module | None,
    batches: Iterable,
    *,
    steps: int,
    lr: float,
    loss: str = "kd",
    temperature: float = 1.0,
    grad_accum: int = 1,
    masks: Mapping[str, torch.Tensor] | None = None,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    warmup: int = 0,
    max_grad_norm: float | None = 1.0,
    eval_fn: Callable[[nn.Module], float] | None = None,
    eval_every: int = 0,
    shard: bool | None = None,
    progress: bool = True,
) -> HealReport:
    """Train ``model`` toward ``teacher``'s outputs for ``steps`` optimizer steps.

    Args:
        model: the student, trained in place: a ``CompileResult`` (its ``.model``, with its
            masks) or any module (a ``result.model``, a ``result.module``).
        teacher: the dense model whose outputs are the targets (never modified); ``None`` only
            with ``loss="lm"``.
        batches: token id tensors ``[batch, seq]`` or dicts with ``input_ids`` (and
            ``attention_mask``), or any input the model takes for ``loss="kd"``. Read lazily; a
            list is cycled when ``steps * grad_accum`` exceeds it, an iterator that runs out
            stops the run (with a warning and ``notes``). Under torchrun: this rank's share.
        steps: optimizer steps (each of ``grad_accum`` batches).
        lr: peak learning rate of AdamW.
        loss: ``"kd"``, ``"lm"`` or ``"kd+lm"`` (module docstring).
        temperature: KD temperature (the KL term is scaled by T^2, Hinton et al. 2015).
        masks: parameter name -> bool mask of the weights that stay; default: the result's
            masks for a ``CompileResult``, else every weight matrix / kernel that is at least
            10 % exact zeros keeps its zeros (what N:M and unstructured pruning leave).
            ``{}`` holds none.
        weight_decay, schedule, warmup, max_grad_norm: AdamW's decay, ``"cosine"`` (to 10 % of
            ``lr``) or ``"constant"`` after ``warmup`` linear steps, gradient clipping (None: off).
        eval_fn, eval_every: ``eval_fn(model) -> float`` before the first step and every
            ``eval_every`` steps (and after the last), recorded in ``evals``; model in eval mode
            under ``no_grad`` meanwhile.
        shard: wrap both models in FSDP2 (None: when torch.distributed runs with world size > 1).
        progress: a progress bar on stderr (rank 0 only).

    Returns:
        A :class:`HealReport`.

    Raises:
        ConfigError: a bad argument, masks that do not fit the model, no batches.

    Example:
        >>> r = fxprune.compile(llama, ids, heads=0.25, ffn=0.25, uniform=True)
        >>> rep = fxprune.heal(r, llama, batches, steps=200, lr=1e-4)
        >>> rep.model.save_pretrained("healed")  # or r.save_pretrained: r.model was healed
    """
    student, given = _student(model)
    _check(teacher, loss, steps, lr, temperature, grad_accum, schedule, warmup, eval_every)
    _check_training(student, teacher, max_grad_norm, weight_decay, warmup, steps, eval_fn)
    if eval_fn is None and eval_every:
        raise ConfigError(f"eval_every={eval_every} needs eval_fn=: there is nothing to evaluate")
    held = find_masks(student, given if masks is None else masks)
    stream = trainloop.Batches(batches)  # every refusal comes before a model is sharded
    masked_weights = sum(int((~m).sum()) for _, m in held.values())
    world, rank = trainloop.world()
    sharded = trainloop.wants_shard(shard, world)
    if sharded and not isinstance(model, nn.Module):
        raise ConfigError(
            "heal under FSDP2: give result.model (and masks=result.masks), not the CompileResult: "
            "fully_shard replaces result.model's parameters, and result.module would keep the "
            "unhealed tensors"
        )
    if sharded:
        trainloop.shard(student)
        if teacher is not None:
            trainloop.shard(teacher)
    held = place_masks(student, held)
    rep = HealReport(student, loss, world_size=world, sharded=sharded)
    rep.masks_held, rep.masked_weights = len(held), masked_weights
    opt = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, trainloop.lr_lambda(schedule, warmup, steps))
    flag = student.training
    t0 = time.perf_counter()
    bar = _bar(steps, progress and rank == 0)
    run = _Run(
        teacher,
        loss,
        temperature,
        grad_accum,
        max_grad_norm,
        eval_fn,
        eval_every,
        sharded,
        world,
        steps,
    )
    opt.zero_grad(set_to_none=True)  # a gradient left on the model must not join step 1
    try:
        _maybe_eval(rep, eval_fn, 0)
        _set_train(student, True, rep)
        _loop(rep, run, opt, sched, held, stream, bar)
    finally:
        if sharded and hasattr(student, "set_requires_gradient_sync"):
            student.set_requires_gradient_sync(True)
        bar.close()
        _set_train(student, flag, None)
        rep.seconds = time.perf_counter() - t0
    if stream.epochs > 1:
        rep.notes.append(f"the batches were cycled: {stream.epochs} passes over them")
    if not isinstance(model, nn.Module) and rep.steps:
        # the plan says the weights were trained after pruning: its proof against the zeroed
        # dense model no longer holds, and every checkpoint / hand-off record says so
        model.plan.config.setdefault("healed", []).append(
            {"loss": loss, "steps": rep.steps, "tokens": rep.tokens, "lr": lr}
        )
    return rep


@dataclass(frozen=True)
class _Run:
    teacher: nn.Module | None
    loss: str
    temperature: float
    grad_accum: int
    max_grad_norm: float | None
    eval_fn: Callable | None
    eval_every: int
    sharded: bool
    world: int
    steps: int


def _loop(rep, run: _Run, opt, sched, held, stream, bar) -> None:
    """The optimizer steps: accumulate, mask gradients, clip, step, re-zero, record."""
    student = rep.model
    for step in range(1, run.steps + 1):
        total, tokens, batch = 0.0, 0, None
        for micro in range(run.grad_accum):
            batch = stream.next()
            if batch is None:
                break
            if run.sharded and hasattr(student, "set_requires_gradient_sync"):
                student.set_requires_gradient_sync(micro == run.grad_accum - 1)
            value, n = batch_loss(student, run.teacher, batch, run.loss, run.temperature)
            (value / run.grad_accum).backward()
            total += float(value.detach()) / run.grad_accum
            tokens += n
        if batch is None:
            rep.notes.append(f"batches ran out during step {step}; stopped after {step - 1}")
            warnings.warn(f"fxprune.heal: {rep.notes[-1]}", stacklevel=3)
            opt.zero_grad(set_to_none=True)
            return
        mask_grads(held)  # a masked weight gets no gradient, so no optimizer state either
        if run.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), run.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rep.revived += hold(held)
        rep.history.append(trainloop.mean_over_ranks(total, run.world))
        rep.tokens += round(trainloop.mean_over_ranks(tokens, run.world) * run.world)
        rep.steps = step
        bar.update(1)
        bar.set_postfix(loss=f"{rep.history[-1]:.4f}")
        if run.eval_every and (step % run.eval_every == 0 or step == run.steps):
            _maybe_eval(rep, run.eval_fn, step)
    if run.eval_fn is not None and not run.eval_every and rep.steps:
        _maybe_eval(rep, run.eval_fn, rep.steps)


def _check_training(student, teacher, max_grad_norm, weight_decay, warmup, steps, eval_fn):
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool)
        or not isinstance(max_grad_norm, (int, float))
        or not max_grad_norm > 0
    ):
        raise ConfigError(f"max_grad_norm={max_grad_norm!r}: a number > 0, or None (no clipping)")
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or weight_decay < 0
    ):
        raise ConfigError(f"weight_decay={weight_decay!r}: a number >= 0")
    if warmup >= steps:
        raise ConfigError(
            f"warmup={warmup} >= steps={steps}: the peak learning rate is never reached"
        )
    if teacher is not None:
        if teacher is student:
            raise ConfigError("teacher is the model being healed: give the dense model")
        own = {p.data_ptr() for p in student.parameters()}
        shared = [n for n, p in teacher.named_parameters() if p.data_ptr() in own]
        if shared:
            raise ConfigError(
                f"teacher shares {len(shared)} parameters with the model being healed (e.g. "
                f"{shared[0]!r}; inplace=True?): training would change the teacher; give an "
                "unpruned copy"
            )


def _student(model):
    """The module to train and the masks it carries (a CompileResult's, else none given)."""
    from fxprune.plan import CompileResult

    if isinstance(model, CompileResult):
        target = model.model if model.model is not None else model.module
        return target, dict(model.masks)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"heal(model=...): got {type(model).__name__}; give a CompileResult or an nn.Module"
        )
    return model, None


def _check(teacher, loss, steps, lr, temperature, grad_accum, schedule, warmup, eval_every):
    if loss not in LOSSES:
        raise ConfigError(f"loss={loss!r}: choose one of {LOSSES}")
    if teacher is None and loss != "lm":
        raise ConfigError(f"loss={loss!r} distils from a teacher: give teacher=, or loss='lm'")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher: got {type(teacher).__name__}; give the dense nn.Module")
    for name, v, lo in (("steps", steps, 1), ("grad_accum", grad_accum, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name}={v!r}: must be an integer >= {lo}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise ConfigError(f"eval_every={eval_every!r}: must be an integer >= 0")
    for name, v in (("lr", lr), ("temperature", temperature)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"{name}={v!r}: must be a number > 0")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r}: choose one of {SCHEDULES}")
    if loss == "lm" and temperature != 1.0:
        raise ConfigError("temperature= only shapes the KD term; loss='lm' does not read it")
    if loss == "lm" and teacher is not None:
        raise ConfigError("loss='lm' trains on the batches' own tokens: pass teacher=None")


def _set_train(model, mode: bool, rep) -> None:
    """Train mode where the module allows it (a torch.export GraphModule refuses: it then trains
    in eval mode, which for a model without dropout or batch statistics is the same)."""
    from fxprune.errors import TrainModeError

    try:
        model.train(mode)
    except TrainModeError as e:
        if rep is not None:
            rep.notes.append(f"trained in eval mode: {e}")


def _maybe_eval(rep, eval_fn, step) -> None:
    if eval_fn is None:
        return
    flag = rep.model.training
    _set_train(rep.model, False, None)
    with torch.no_grad():
        rep.evals.append((step, float(eval_fn(rep.model))))
    _set_train(rep.model, flag, None)


def _bar(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="heal", unit="step", file=sys.stderr, disable=not show)
