"""The equivalence proof ``fxprune prune --save`` ran, stored in its checkpoint, and whether
``fxprune export`` / ``verify`` may reuse it instead of proving again.

The record (``ckpt["proof"]``, covered by the checkpoint's sha256 digests like the plan, so an
edit to it is a CheckpointError) holds the proof's report (the fields of
``fxprune.verify.EquivalenceReport``) and digests of what it proved:

* ``source``: the source the dense model was built from (``{"model": ..., "seed": ...}``);
* ``dense``: that dense model's weights (its ``state_dict``, every parameter and buffer);
* ``example``: the example input it ran on (the fresh draws are made from it);
* ``module``: the pruned graph module's generated code and layers (``repr``: strides, eps);
* ``weights``: the pruned module's tensors.

:func:`recall` returns the stored report only when every one of them matches what the command
rebuilt; anything else is a reason to prove again, returned as one line. A stored report is
reused as it stands: one that says NOT equivalent stays a failure. A record that is malformed,
or a report that says ``ok`` with an error over its tolerance, is a CheckpointError (the
digests matched, so whatever saved the file wrote it so). The digests are not a signature (see
``fxprune.checkpoint``): ``--reprove`` runs the proof again on a file from elsewhere.
"""

from __future__ import annotations

import dataclasses

from fxprune.checkpoint import sha256_of, state_digest
from fxprune.errors import CheckpointError
from fxprune.verify.proof import EquivalenceReport

ENTRY = "proof"  # the checkpoint entry
VERSION = 1
TIES = ("source", "dense", "example", "module", "weights")
_CASTS = {"bool": bool, "float": float, "int": int, "str": str}


def module_digest(module) -> str:
    """sha256 of what a pruned module computes besides its tensors: a graph module's generated
    code and its layers with their settings."""
    return sha256_of([getattr(module, "code", None), repr(module)])


def shapes(example) -> str:
    """The example's tensor shapes, as a message names them (``[1, 3, 224, 224]``)."""
    args = example if isinstance(example, (tuple, list)) else (example,)
    return ", ".join(str(list(a.shape)) if hasattr(a, "shape") else repr(a)[:20] for a in args)


def record(report: EquivalenceReport, source: dict, model, example, result) -> dict:
    """The stored form of ``report``, the proof ``fxprune.verify.equivalence(model, result,
    example)`` returned, tied to what it proved (see the module docstring); for
    ``CompileResult.save(proof=...)``. Plain values only, so ``weights_only`` loading reads it."""
    fields = {}
    for f in dataclasses.fields(EquivalenceReport):
        v = getattr(report, f.name)
        fields[f.name] = [str(s) for s in v] if f.type == "list[str]" else _CASTS[f.type](v)
    return {
        "version": VERSION,
        "report": fields,
        "source": dict(source),
        "dense": state_digest(model.state_dict()),
        "example": sha256_of(example),
        "shapes": shapes(example),  # for the message when another example is given
        "module": module_digest(result.module),
        "weights": state_digest(result.module.state_dict()),
    }


def recall(
    ckpt: dict, path, source: dict, model, example, result
) -> tuple[EquivalenceReport | None, str]:
    """``(report, "")`` when the proof ``ckpt`` stores proved this ``result`` (replayed from
    ``ckpt``) against this dense ``model``, built from ``source``, on this ``example``; else
    ``(None, why)``, ``why`` one line. ``ckpt`` is read with its digests checked
    (``fxprune.checkpoint.read_checkpoint``).

    Raises:
        CheckpointError: the stored proof is malformed, or says ``ok`` with an error over its
            tolerance.
    """
    rec = ckpt.get(ENTRY)
    if rec is None:
        return None, "it stores no equivalence proof (saved before proofs were stored)"
    if not isinstance(rec, dict) or not isinstance(rec.get("version"), int):
        raise CheckpointError(f"{path}: its stored proof is malformed (not a versioned record)")
    if rec["version"] != VERSION:
        return None, f"its stored proof has format {rec['version']}, this fxprune reads {VERSION}"
    missing = [k for k in ("report", *TIES) if k not in rec]
    if missing:
        raise CheckpointError(f"{path}: its stored proof is malformed (no {missing[0]!r})")
    report = _report(rec["report"], path)
    why = _mismatch(rec, source, model, example, result)
    return (None, why) if why else (report, "")


def _mismatch(rec: dict, source: dict, model, example, result) -> str:
    """Why the stored proof is not about this model (cheapest check first), or ``""``."""
    if rec["source"] != source:
        return f"it was proved against {_named(rec['source'])}, not {_named(source)}"
    if rec["example"] != sha256_of(example):
        then, now = rec.get("shapes"), shapes(example)
        how = f"of shape {now}, it was proved on {then}" if then != now else "its values differ"
        return f"the example input differs from the one it proved ({how})"
    if rec["module"] != module_digest(result.module):
        return "the replayed pruned module's code or layers differ from those it proved"
    if rec["dense"] != state_digest(model.state_dict()):
        return f"the dense weights {_named(source)} builds differ from those it was proved against"
    if rec["weights"] != state_digest(result.module.state_dict()):
        return "the pruned module's tensors differ from those it proved"
    return ""


def _named(source) -> str:
    if not isinstance(source, dict):
        return repr(source)[:80]
    return f"{source.get('model')} (seed {source.get('seed')})"


def _report(fields, path) -> EquivalenceReport:
    """The stored report, checked: every field of its type, and ``ok`` only within tolerance."""
    kinds = {f.name: f.type for f in dataclasses.fields(EquivalenceReport)}
    if not isinstance(fields, dict) or set(fields) != set(kinds):
        raise CheckpointError(f"{path}: its stored proof's report is malformed (its fields)")
    for name, kind in kinds.items():
        v = fields[name]
        fits = (
            isinstance(v, list) and all(isinstance(s, str) for s in v)
            if kind == "list[str]"
            else type(v) is _CASTS[kind]
        )
        if not fits:
            raise CheckpointError(
                f"{path}: its stored proof's report is malformed ({name} is {v!r:.40}, not {kind})"
            )
    report = EquivalenceReport(**fields)
    if report.ok and not report.max_rel_err <= report.tolerance:  # NaN included
        raise CheckpointError(
            f"{path}: its stored proof says equivalent with max_rel_err {report.max_rel_err:.2e}, "
            f"over its tolerance {report.tolerance:.0e}"
        )
    return report
