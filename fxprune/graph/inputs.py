"""Normalise example inputs and the dims a capture leaves dynamic.

Example inputs come as a tensor, a tuple of tensors or a dict of keyword inputs; they become the
positional tuple the graph is captured with. ``dynamic_shapes`` (torch.export's spelling) or the
defaults (batch, and sequence length of integer 2-D inputs) become per-input maps of free dims.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch

from fxprune.errors import ConfigError


def as_args(example_inputs, model=None) -> tuple:
    """Normalise ``example_inputs`` to a positional tuple: a tensor, a tuple/list of them, or a
    dict of keyword inputs (``{"input_ids": ids, "attention_mask": mask}``), which needs the
    ``model`` whose forward signature orders them (see :func:`bind_keywords`)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping):
        if model is None:
            raise ConfigError("keyword example_inputs need the model: pass it as well")
        return bind_keywords(model, example_inputs)
    raise ConfigError(
        "example_inputs must be a tensor, a tuple of tensors or a dict of keyword inputs, got "
        f"{type(example_inputs).__name__}"
    )


def bind_keywords(model, kwargs: Mapping) -> tuple:
    """Keyword inputs as the positional tuple the graph is captured with: in the order of
    ``model.forward``'s parameters, a parameter left out before the last given one passed as
    ``None`` (allowed only where that is its default, so nothing changes meaning)."""
    sig = inspect.signature(model.forward)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in sig.parameters.values() if p.kind in kinds]
    names = [p.name for p in params]
    what = f"{type(model).__name__}.forward"
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise ConfigError(
            f"example_inputs: {what} has no parameter {unknown[0]!r} that can be passed by "
            f"position (it takes {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
        )
    if not kwargs:
        raise ConfigError("example_inputs: the dict of keyword inputs is empty")
    last = max(names.index(k) for k in kwargs)
    out = []
    for p in params[: last + 1]:
        if p.name in kwargs:
            out.append(kwargs[p.name])
        elif p.default is None:
            out.append(None)
        else:
            given = next(k for k in names if k in kwargs and names.index(k) > names.index(p.name))
            raise ConfigError(
                f"example_inputs: {what} takes {p.name!r} before {given!r} and its default is "
                f"{p.default!r}, not None: give {p.name!r} too (inputs are captured by position)"
            )
    return tuple(out)


def default_dynamic_dims(args: tuple) -> list[list[int]]:
    """The dims kept dynamic unless told otherwise, per input: batch and sequence length of an
    integer 2-D input (token ids, attention mask, token type ids), else the batch only (spatial
    dims stay static: conv output sizes and view constants depend on them)."""
    out = []
    for a in args:
        if not isinstance(a, torch.Tensor) or a.ndim == 0:
            out.append([])
        elif a.ndim == 2 and not (a.is_floating_point() or a.is_complex()):
            out.append([0, 1])
        else:
            out.append([0])
    return out


def dims_spec(dims: Sequence[Sequence[int]]) -> tuple:
    """torch.export ``dynamic_shapes`` with ``Dim.AUTO`` at the listed dims of each input: the
    spelling of the per-input dim lists a plan records (``plan.config["dynamic_shapes"]``)."""
    return tuple({int(d): torch.export.Dim.AUTO for d in ds} if ds else None for ds in dims)


def _is_dynamic(v) -> bool:
    """Whether a torch.export dim spec leaves the dim free (None, an int, Dim.STATIC fix it)."""
    if v is None or isinstance(v, int):
        return False
    return getattr(getattr(v, "type", None), "name", None) != "STATIC"


def spec_maps(dynamic_shapes, model, args: tuple) -> list[dict]:
    """``dynamic_shapes`` as torch.export takes it (a tuple with one entry per input, or a dict
    keyed by the forward's argument names; an entry is None, ``{dim: Dim}`` or a per-dim tuple)
    -> per input ``{dim: Dim}`` of the free dims. None: :func:`default_dynamic_dims`."""
    if dynamic_shapes is None:
        return [dict(dims_spec([ds])[0] or {}) for ds in default_dynamic_dims(args)]
    if isinstance(dynamic_shapes, Mapping):
        names = list(inspect.signature(model.forward).parameters)[: len(args)]
        unknown = [k for k in dynamic_shapes if k not in names]
        if unknown:
            raise ConfigError(
                f"dynamic_shapes names {unknown}, which are not among the forward's first "
                f"{len(args)} arguments {names}; key it by those names or give a tuple with one "
                "entry per example input"
            )
        dynamic_shapes = [dynamic_shapes.get(n) for n in names]
    if not isinstance(dynamic_shapes, (tuple, list)) or len(dynamic_shapes) != len(args):
        raise ConfigError(
            f"dynamic_shapes must have one entry per example input ({len(args)}), as "
            f"torch.export takes it, e.g. ({{0: Dim.AUTO, 1: Dim.AUTO}},); got {dynamic_shapes!r}"
        )
    maps = []
    for i, (entry, a) in enumerate(zip(dynamic_shapes, args, strict=True)):
        ndim = a.ndim if isinstance(a, torch.Tensor) else 0
        if isinstance(entry, (tuple, list)) and len(entry) == ndim:
            entry = dict(enumerate(entry))
        if not (entry is None or isinstance(entry, Mapping)):
            raise ConfigError(
                f"dynamic_shapes[{i}]: give None, {{dim: Dim}} or one spec per dim of the "
                f"{ndim}-D input, got {entry!r}"
            )
        free = {}
        for d, v in (entry or {}).items():
            if not isinstance(d, int) or not -ndim <= d < ndim:
                raise ConfigError(
                    f"dynamic_shapes[{i}]: dim {d!r} is not a dim of a {ndim}-D input"
                )
            if _is_dynamic(v):
                free[d % ndim] = v
        maps.append(free)
    return maps


def widen(args: tuple, free_dims: Sequence) -> tuple:
    """The example inputs with every free dim of size 1 repeated to 2 (``free_dims[i]``: the
    free dims of input ``i``, a list or a ``{dim: Dim}``): torch.export specialises a dim of
    size 1 to the constant 1 (the "0/1 specialisation"), which would bake in a batch of 1."""
    out = []
    for a, free in zip(args, free_dims, strict=True):
        reps = [2 if d in free and a.shape[d] == 1 else 1 for d in range(a.ndim)] if free else []
        out.append(a.repeat(*reps) if any(r > 1 for r in reps) else a)
    return tuple(out)
