"""Proof that a pruned model computes what the dense model computes with the removed parts zeroed.

What it checks is spelled out in docs/design.md ("Why the result is exact"): each output on its
own scale (an all-zero one on absolute error, ``verify/leaves.py``), in float32 (float64 for a
float64 model) on cast copies, on the example and on fresh random draws at another batch size
(and sequence length), NaN/Inf as failures, and the N:M pattern of every masked weight. What it
is given is checked first (``verify/pairing.py``): a model the result was not compiled from is a
ConfigError, not a shape error from inside the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxprune._util import Report, eval_mode
from fxprune.errors import ConfigError, FxPruneError
from fxprune.graph.trace import as_args
from fxprune.verify.inputs import cast, cast_copy, cast_module, give_back, input_sets
from fxprune.verify.leaves import Mismatch, judged, leaves, measure, named_leaves, what, zero_atol
from fxprune.verify.pairing import check_pair
from fxprune.verify.reference import zeroed_dense

RTOL = 1e-4


@dataclass
class EquivalenceReport(Report):
    """Outcome of :func:`equivalence`.

    ``max_rel_err`` is the worst ``max|pruned - zeroed| / max|zeroed|`` of any one output leaf
    on any input (each output on its own scale, so a small output cannot hide next to a large
    one); an output whose reference is all zero has no scale: it is judged on absolute error
    against its dtype's tolerance (``fxprune.verify.leaves.zero_atol``), and one beyond it counts
    as an infinite relative error, named in the message. ``worst_output`` names the worst leaf
    (``last_hidden_state``, ``[1]``). ``max_abs_err`` and ``reference_scale`` are the largest
    absolute error and ``|zeroed|`` over all outputs. ``pruning_effect`` is the
    per-output measure against the dense model *without* zeroing: it shows the removed parts
    mattered, so a pass is not vacuous. ``dtype`` is what the numbers were computed in,
    ``inputs_checked`` how many input sets ran (the example and the fresh draws), ``skipped``
    which draws did not run, and why.
    """

    ok: bool
    max_abs_err: float
    max_rel_err: float
    pruning_effect: float
    reference_scale: float
    approximate: bool
    tolerance: float
    message: str
    worst_output: str = ""
    dtype: str = "float32"
    inputs_checked: int = 1
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message

    def table(self) -> str:
        skipped = f"; skipped: {'; '.join(self.skipped)}" if self.skipped else ""
        return (
            "| proof | max rel err | worst output | max abs err | pruning effect | dtype | inputs |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {'ok' if self.ok else 'FAILED'} | {self.max_rel_err:.2e} "
            f"(tol {self.tolerance:.0e}) | {self.worst_output or '-'} | {self.max_abs_err:.2e} "
            f"| {self.pruning_effect:.2e} | {self.dtype} | {self.inputs_checked} |\n\n"
            f"{self.message}{skipped}"
        )


def _floats(module: torch.nn.Module):
    return (t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point())


def _compare_dtype(*modules: torch.nn.Module) -> torch.dtype:
    """float64 for a float64 model, else float32: half-precision rounding of two sums of the
    same terms in another order (a half-ulp, ~1e-3 relative) is not an error of the pruning."""
    dts = {t.dtype for m in modules for t in _floats(m)}
    return torch.float64 if torch.float64 in dts else torch.float32


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def nm_violations(result) -> list[str]:
    """Every masked weight of ``result.module`` (N:M or unstructured) that is non-zero where
    its mask is zero, and every N:M-masked one with more than N non-zeros in a group of M along
    its reduction axis, as a message."""
    from fxprune.passes import NMResult
    from fxprune.passes.nm import candidates, off_mask

    out: list[str] = []
    for p in result.passes:
        if not p.masks:
            continue
        n, m = (p.n, p.m) if isinstance(p, NMResult) else (None, None)
        kind = "N:M" if n else "unstructured"
        axis = {c.param: c.reduce_dim for c in candidates(result.module)}
        for name, mask in p.masks.items():
            w = result.module.get_parameter(name).detach().cpu()
            if mask.shape != w.shape:
                out.append(f"{name}: {kind} mask shape {tuple(mask.shape)} != {tuple(w.shape)}")
                continue
            dim = axis.get(name, 1)
            stray, fits = off_mask(w, mask.cpu().bool(), n if n and m else None, m, dim)
            if stray:
                out.append(f"{name}: {stray} non-zeros where its {kind} mask is zero")
            elif not fits:
                out.append(f"{name}: more than {n} non-zeros per {m} along dim {dim}")
    return out


def equivalence(
    model: torch.nn.Module,
    result,
    example_inputs,
    rtol: float = RTOL,
    *,
    fresh_inputs: int = 2,
    seed: int = 0,
    target: str = "module",
) -> EquivalenceReport:
    """Compare ``result.module`` (or ``result.model``: ``target="model"``) with the zeroed
    dense ``model`` (eval, fp32 or fp64) on ``example_inputs`` and on ``fresh_inputs`` random
    draws like them, output by output.

    Each output leaf (tuple item, dict or ``ModelOutput`` field) is judged on its own scale:
    ``max|pruned - zeroed| / max|zeroed|``; a leaf whose reference is all zero, on absolute
    error against its dtype's tolerance (:func:`fxprune.verify.leaves.zero_atol`: 1e-5 in
    float32, 1e-7 in float64, exact for integers, scaled with ``rtol``). Half-precision models
    are compared through float32 copies (neither ``model`` nor ``result.module`` is touched);
    the dense output, which only measures how far pruning moved it, is then the model's own
    forward in its dtype.
    A NaN/Inf in either output, or an N:M-masked weight off its pattern, fails. Fresh draws
    have batch + 1 (floats with the example's mean and std, integers uniform in its [min,
    max]); for a 2-D integer input (token ids) later draws also shorten the sequence by one,
    and a module captured for one length that rejects it is recorded in ``skipped``. A pruned
    module that rejects the example or the larger batch the dense model runs fails.

    Args:
        model: the dense model ``result`` was compiled from (not modified).
        result: a :class:`fxprune.plan.CompileResult`.
        example_inputs: a tensor or tuple of tensors (use real data where you have it).
        rtol: pass threshold on ``max_rel_err``.
        fresh_inputs: how many random draws to check besides the example (0: the example only).
        seed: seeds the draws, so a report is reproducible.
        target: ``"module"`` proves the graph module, ``"model"`` the module tree of the user's
            class (``result.model``, run eagerly).

    Returns:
        An :class:`EquivalenceReport`; ``ok`` is False when an output's error exceeds ``rtol``,
        when an output is non-finite, when an N:M pattern is broken, or when every output is all
        zero (the check would prove nothing).

    Raises:
        ConfigError: ``fresh_inputs`` is negative; ``result`` is not what ``fxprune.compile``
            returns; ``model`` is not the dense model it was compiled from (a parameter of
            another shape, or missing); the dense model cannot run ``example_inputs``.

    Example:
        >>> rep = fxprune.verify.equivalence(model, result, x)
        >>> assert rep.ok, rep
    """
    if not isinstance(fresh_inputs, int) or fresh_inputs < 0:
        raise ConfigError(f"fresh_inputs={fresh_inputs!r}: need an integer >= 0")
    if target not in ("module", "model"):
        raise ConfigError(f"target={target!r}: give 'module' or 'model'")
    check_pair(model, result)
    candidate = getattr(result, target)
    dtype = _compare_dtype(model, candidate)
    native = {t.dtype for m in (model, candidate) for t in _floats(m)} - {dtype}
    args = tuple(cast(a, dtype) for a in as_args(example_inputs, model))
    z = zeroed_dense(model, result, dtype)
    pruned = cast_module(candidate, native, dtype) if native else candidate
    # the dense output only measures how far pruning moved it (not the proof): a model held in
    # one half-precision dtype runs as it is, with its inputs in that dtype (no third copy)
    # (its parameters' one dtype: buffers such as rotary frequencies may stay float32 by design)
    own = {t.dtype for t in model.parameters() if t.is_floating_point()}
    own = own.pop() if len(own) == 1 and own <= native else None
    dense = cast_copy(model, dtype) if native and own is None else model
    rows, skipped = [], []
    try:
        with torch.no_grad(), eval_mode(pruned), eval_mode(dense):
            for label, inp, kind in input_sets(args, fresh_inputs, seed):
                out = _run(label, inp, kind, (z, pruned, dense, own), skipped)
                if out is not None:
                    rows.append(measure(*out, label))
    except Mismatch as e:
        inf = float("inf")
        head = (False, inf, inf, 0.0, 0.0, result.approximate, rtol, str(e))
        return EquivalenceReport(*head, e.output, _dname(dtype), len(rows), skipped)
    finally:  # the copies made here, for the next proof within reused_copies()
        give_back(z, *(m for m in (pruned, dense) if m is not candidate and m is not model))
    return _report(rows, result, rtol, dtype, native, skipped, nm_violations(result), own)


def agreement(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    example_inputs,
    rtol: float = RTOL,
    *,
    fresh_inputs: int = 1,
    seed: int = 0,
) -> tuple[bool, str]:
    """Do two modules compute the same thing (each output on its own scale, NaN/Inf failing) on
    the example and ``fresh_inputs`` draws like it? ``(ok, message)``; a candidate that raises
    where the reference runs is a failure with the error's first line.

    With one draw, the example's rows and the draw's last row run as one batch (batch + 1):
    the example's values and another batch size in one forward of each module, instead of a
    forward of the example and another of the draw. Where the reference cannot take that
    batch, the example runs alone (and must run)."""
    args = as_args(example_inputs, reference)
    sets = input_sets(args, fresh_inputs, seed)
    if fresh_inputs == 1 and len(sets) == 2:
        label, drawn, _ = sets[1]
        joined = tuple(
            torch.cat([a, d[-1:]]) if isinstance(a, torch.Tensor) and a.ndim else a
            for a, d in zip(args, drawn, strict=True)
        )
        batch = label[label.index("batch") :].rstrip(")")
        sets = [(f"the example with a fresh row ({batch})", joined, "joined"), *sets]
    rows = []
    try:
        with torch.no_grad(), eval_mode(reference), eval_mode(candidate):
            for label, inp, kind in sets:
                try:
                    ref = named_leaves(reference(*inp))
                except Exception:  # noqa: BLE001 - a draw the reference cannot take either
                    if kind == "example":
                        raise
                    continue
                try:
                    got = leaves(candidate(*inp))
                except Exception as e:  # noqa: BLE001
                    return False, f"fails on {label}: {_first_line(e)}"
                rows.append(measure(ref, got, [t for _, t in ref], label))
                if kind == "joined":
                    break  # the example and the draw, in one batch
    except Mismatch as e:
        return False, str(e).removeprefix("NOT equivalent: ")
    worst, rel = "output", 0.0
    zeros = {}
    for name, err, _, _, r, tol in judged(rows, _atol(rtol)):
        if r > rel:
            rel, worst = r, name
        if tol is not None and err > tol:
            zeros[name] = (max(err, zeros.get(name, (0.0,))[0]), tol)
    where = "" if worst == "output" else f" in output {worst}"
    msg = f"{_off_zero(zeros)}max_rel_err={rel:.2e}{where} on {len(rows)} inputs"
    return rel <= rtol, msg


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _run(label: str, inp: tuple, kind: str, models, skipped: list[str]):
    """(reference leaves, pruned leaves, dense leaves) of one input set, or None when the draw
    is skipped (the dense model rejects it, or the pruned one rejects another length)."""
    z, pruned, dense, own = models
    try:
        ref = named_leaves(z(*inp))
        orig = leaves(dense(*(tuple(cast(a, own) for a in inp) if own else inp)))
    except FxPruneError:
        raise
    except Exception as e:  # noqa: BLE001 - a draw the model itself cannot take
        if kind == "example":
            given = ", ".join(str(tuple(a.shape)) for a in inp if isinstance(a, torch.Tensor))
            raise ConfigError(
                f"example_inputs ({given}): the dense model cannot run them ({_first_line(e)}); "
                "give inputs like those fxprune.compile was given (result.plan.inputs)"
            ) from e
        skipped.append(f"{label}: the dense model rejects it ({_first_line(e)})")
        return None
    try:
        return ref, leaves(pruned(*inp)), orig
    except Exception as e:  # noqa: BLE001
        if kind == "length":
            skipped.append(
                f"{label}: the pruned module rejects another sequence length (captured for "
                f"one; {_first_line(e)})"
            )
            return None
        raise Mismatch(
            f"NOT equivalent: the pruned module fails on {label}, which the dense model runs: "
            f"{_first_line(e)}"
        ) from e


def _atol(rtol: float):
    """The tolerance of an all-zero reference leaf, by its dtype."""
    return lambda dtype: zero_atol(dtype, rtol, RTOL)


def _off_zero(zeros: dict) -> str:
    """The all-zero reference leaves the pruned output left, by name, for a message."""
    return "".join(
        f"{what(n)} is all zero in the reference but the pruned one reaches {e:.2e} (absolute "
        f"tolerance {t:.0e} for its dtype); "
        for n, (e, t) in zeros.items()
    )


def _report(rows, result, rtol, dtype, native, skipped, nm_bad, own=None) -> EquivalenceReport:
    checked = len(rows)
    abs_err = scale = eff = rel = 0.0
    worst = rows[0][0][0] if rows and rows[0] else "output"
    zeros = {}  # all-zero reference leaves the pruned output left: name -> (abs err, tol)
    for name, err, s, e, r, tol in judged(rows, _atol(rtol)):
        if r > rel:
            rel, worst = r, name
        if tol is not None and err > tol:
            zeros[name] = (max(err, zeros.get(name, (0.0,))[0]), tol)
        eff = max(eff, e / s if s else 0.0)
        abs_err, scale = max(abs_err, err), max(scale, s)
    dt = _dname(dtype)
    if scale == 0:
        ok, msg = False, "outputs are all zero: the check proves nothing (use real weights/data)"
    else:
        ok = rel <= rtol and not nm_bad
        how = f"compared in {dt}" + (
            f" (cast copies of a {'/'.join(sorted(_dname(d) for d in native))} model)"
            if native
            else ""
        )
        broken = f"mask broken: {'; '.join(nm_bad[:5])}; " if nm_bad else ""
        broken += _off_zero(zeros)
        where = "" if worst == "output" else f" in output {worst}"
        msg = (
            f"{'equivalent' if ok else 'NOT equivalent'}: {broken}max_rel_err={rel:.2e}{where} "
            f"(tolerance {rtol:.0e}, each output on its own scale), max_abs_err={abs_err:.2e}, "
            f"{how} on {checked} inputs (the example and {checked - 1} fresh draws), pruning "
            f"changed the dense output by {eff:.2e} relative"
            + (f" (the dense model run in its own {_dname(own)})" if own else "")
        )
        if eff <= rtol:
            msg += (
                "; the pruning effect is within the tolerance: the removed parts changed no "
                "output on any input, so the check was vacuous"
            )
        if skipped:
            msg += f"; skipped {'; '.join(skipped)}"
        if result.approximate:
            msg += "; approximate groups were pruned, so a difference is expected"
        gone = [b for r in result.passes for b in r.bypassed]
        if gone:
            msg += (
                f"; reference has the {len(gone)} removed blocks bypassed (the removal itself "
                "changes the output: see pruning_effect)"
            )
    return EquivalenceReport(
        ok, abs_err, rel, eff, scale, result.approximate, rtol, msg, worst, dt, checked, skipped
    )
