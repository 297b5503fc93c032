"""Whether the dense model and the result given to the proof belong together: ``result`` is what
``fxprune.compile`` returns, and ``model`` has the parameters, in the dense shapes, that it was
compiled from. Checked before anything runs, so a wrong pair is a :class:`ConfigError` naming the
parameter rather than a shape error from deep inside the zeroed reference."""

from __future__ import annotations

import torch

from fxprune.errors import ConfigError

RESULT_FIELDS = ("module", "passes", "approximate", "plan")
"""What the proof reads off a result (``fxprune.plan.CompileResult``; duck-typed, as the verifier
sits below ``plan``)."""


def dense_shapes(result) -> dict[str, list[int]]:
    """The shape of each parameter of ``result.module`` in the dense model it was compiled from:
    its pruned shape, with every dim a pass shrank or reordered at the size the first pass that
    touched it saw (the length of its kept mask, zeroed-slice mask or gather order)."""
    shapes = {n: list(p.shape) for n, p in result.module.named_parameters()}
    seen: set[tuple[str, int]] = set()
    for p in result.passes:
        for effect in (p.zero, p.keeps, getattr(p, "order", {})):
            for name, dims in effect.items():
                for d, v in dims.items():
                    if name in shapes and (name, d) not in seen and d < len(shapes[name]):
                        seen.add((name, d))
                        shapes[name][d] = len(v)
    return shapes


def check_pair(model, result) -> None:
    """``model`` is a module and ``result`` a compile result of a model shaped like it.

    Raises:
        ConfigError: naming what is wrong: not a module, not a result, a parameter the
            result's passes name that ``model`` lacks, or one of another shape.
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model is a {type(model).__name__}: give the dense nn.Module the result was "
            "compiled from, then the result: equivalence(model, result, x)"
        )
    lacks = [f for f in RESULT_FIELDS if not hasattr(result, f)]
    if lacks:
        raise ConfigError(
            f"result is a {type(result).__name__} (no {', '.join(lacks)}): give the "
            "CompileResult that fxprune.compile (or fxprune.load) returned"
        )
    have = dict(model.named_parameters()) | dict(model.named_buffers())
    want = dense_shapes(result)
    named = {n for p in result.passes for e in (p.zero, p.keeps, p.masks) for n in e}
    missing = sorted(n for n in named if n not in have)
    if missing or not any(n in have for n in want):
        gone = f"{missing[:3]}" if missing else "any parameter of result.module"
        raise ConfigError(
            f"model is not the one the result was compiled from: it has no {gone}; give the "
            "dense model fxprune.compile pruned"
        )
    for name, shape in want.items():
        if name in have and list(have[name].shape) != shape:
            raise ConfigError(
                f"model is not the one the result was compiled from: {name} is "
                f"{tuple(have[name].shape)} in it, {tuple(shape)} in the dense model the result "
                "was compiled from; give that model"
            )
