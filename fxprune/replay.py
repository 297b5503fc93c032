"""Replaying a saved prune on a fresh dense model: ``fxprune.apply_plan`` (a plan's pruned
architecture, weights sliced from the model) and ``fxprune.load`` (a checkpoint's plan and its
saved weights, digests checked)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.nn as nn

from fxprune.api import run
from fxprune.checkpoint import expand_state, read_checkpoint
from fxprune.errors import CheckpointError, PlanError
from fxprune.graph.trace import as_args, dims_spec
from fxprune.passes import REGISTRY as PASSES
from fxprune.plan import CompileResult, Plan


def apply_plan(
    model: nn.Module,
    plan: Plan | dict | str,
    example_inputs=None,
    leaf_modules: Sequence[str | type] = (),
    _weights_follow: bool = False,
    dynamic_shapes=None,
) -> CompileResult:
    """Rebuild a plan's pruned architecture from a fresh dense ``model`` (weights sliced from it).

    Load a saved pruned state_dict into ``result.module`` afterwards, or use :func:`load`.
    ``example_inputs`` default to zeros of the shapes recorded in the plan; ``dynamic_shapes``
    (torch.export's spelling) to the free dims the plan recorded.

    Raises:
        PlanError: the plan is malformed (not JSON, a missing entry, kept indices that are
            negative, repeated or out of range for their layer) or names layers ``model`` lacks.
    """
    if isinstance(plan, str):
        plan = Plan.from_json(plan)
    elif isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    elif not isinstance(plan, Plan):
        raise PlanError(f"plan must be a Plan, a dict or a JSON string, got {type(plan).__name__}")
    args = as_args(example_inputs, model) if example_inputs is not None else plan.example_inputs()
    data = [e.get("method") for e in plan.passes if e["name"] in ("nm", "unstructured")]
    data = [m for m in data if m not in (None, "magnitude")]
    if data and not _weights_follow:
        raise PlanError(
            f"this plan's masks were chosen by {data[0]!r} on calibration data and cannot "
            "be recomputed from the dense weights; open the checkpoint with "
            "fxprune.load(path, model), which reads the masks off the saved weights"
        )
    passes = [_replayed(i, entry) for i, entry in enumerate(plan.passes)]
    allow = bool(plan.config.get("allow_approximate", False))
    recorded = plan.config.get("dynamic_shapes")
    if dynamic_shapes is None and recorded is not None:
        dynamic_shapes = dims_spec(recorded)
    return run(
        model, args, passes, plan.mode, leaf_modules, allow, False, plan.config, dynamic_shapes
    )


def _replayed(i: int, entry: dict):
    """The config replaying plan entry ``i`` (the pass registry says how); a malformed entry is
    a PlanError."""
    if entry["name"] not in PASSES:
        raise PlanError(f"plan pass {i} is {entry['name']!r}, not one of {sorted(PASSES)}")
    try:
        return PASSES[entry["name"]].replay(entry)
    except KeyError as e:
        raise PlanError(f"plan pass {i} ({entry['name']}) has no {e.args[0]!r} entry") from e
    except (TypeError, ValueError) as e:  # ConfigError included: the plan holds the values
        raise PlanError(f"plan pass {i} ({entry['name']}) is malformed: {e}") from e


def load(path: str | Path, model: nn.Module, trust: bool = False) -> CompileResult:
    """Load a checkpoint written by ``CompileResult.save`` onto a fresh dense ``model``.

    Uses ``torch.load(weights_only=True)`` unless ``trust=True``; checks every tensor and the
    plan against the sha256 digests the save stored (a file without them loads with a warning).
    The result is in eval mode, whatever mode ``model`` is in, as ``from_pretrained`` returns a
    model: call ``.train()`` to fine-tune it.

    Args:
        path: the checkpoint file.
        model: a dense model of the architecture the checkpoint was pruned from (not changed).
        trust: allow pickled Python objects in the file (only for files you trust).

    Returns:
        The :class:`fxprune.plan.CompileResult`, the saved weights in ``.module`` and ``.model``.

    Raises:
        CheckpointError: the file is missing, corrupt, changed since it was saved (named: the
            tensor or plan whose digest differs), not an fxprune checkpoint, holds pickled code
            without ``trust``, or its plan or weights do not fit ``model`` (names the file).

    Example:
        >>> fxprune.load("r50.pt", torchvision.models.resnet50()).module.training  # doctest: +SKIP
        False
    """
    return restore(read_checkpoint(path, trust), path, model)


def restore(ckpt: dict, path: str | Path, model: nn.Module) -> CompileResult:
    """:func:`load` of a checkpoint already read (``fxprune.checkpoint.read_checkpoint``, its
    digests checked): its plan replayed on ``model``, its weights loaded, eval mode. ``path``
    names the file in errors. Raises CheckpointError as :func:`load` does."""
    try:
        res = apply_plan(model, ckpt["plan"], _weights_follow=True)
    except CheckpointError:
        raise
    except PlanError as e:
        raise CheckpointError(f"{path}: {e}") from e
    try:
        res.module.load_state_dict(expand_state(ckpt, path, res.module.state_dict()))
    except (RuntimeError, KeyError, TypeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:3] or [str(e)]
        raise CheckpointError(
            f"{path}: its weights do not fit this {type(model).__name__} "
            f"({'; '.join(lines)}); was it saved from another architecture?"
        ) from e
    res.masks_from_weights()  # the saved weights carry the masks the plan's method chose
    for m in (res.module, res.model) if isinstance(res.model, nn.Module) else (res.module,):
        m.eval()
    return res
