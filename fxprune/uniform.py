"""``uniform=True``: one count per role for every repeated layer, so a Hugging Face config can
hold the pruned model.

A config describes the repeated layers (``num_attention_heads``, ``intermediate_size``), not the
modules around them: BERT's pooler and a classification head's ``dense`` are MLP-shaped groups,
an attention pool is a head group, and neither has a config field. :func:`uniform_scope` keeps
those whole (the pass's ``ignore`` takes every Linear outside the repeated stacks), and
:func:`check_uniform` refuses counts that still come out unequal.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from fxprune.errors import ConfigError
from fxprune.hf import ffn_role
from fxprune.passes.units import UnitSelection

SCOPED_KINDS = ("heads", "ffn")
"""Group kinds a config counts per layer: outside the stacks they are kept whole."""


def stacks(model: nn.Module) -> list[str]:
    """Names of the repeated stacks: ``ModuleList`` / ``Sequential`` of two or more children of
    one class (``bert.encoder.layer``, ``model.layers``, T5's ``encoder.block``)."""
    out = []
    for name, m in model.named_modules():
        kids = list(m.children()) if isinstance(m, (nn.ModuleList, nn.Sequential)) else []
        if len(kids) >= 2 and len({type(k) for k in kids}) == 1:
            out.append(name)
    return out


def in_stack(name: str, tops: list[str]) -> bool:
    return any(name == t or name.startswith(t + ".") for t in tops)


def outside_stacks(model: nn.Module) -> tuple[str, ...]:
    """Linear layers that no repeated stack holds (empty when the model has no stack)."""
    tops = stacks(model)
    if not tops:
        return ()
    return tuple(
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not in_stack(n, tops)
    )


def uniform_scope(model: nn.Module, passes: list) -> tuple[list, tuple[str, ...]]:
    """``(passes, kept whole)``: each unit pass that prunes heads or FFN neurons also ignores
    the Linears outside the repeated stacks."""
    whole = outside_stacks(model)
    if not whole:
        return passes, ()
    out = []
    for p in passes:
        scoped = isinstance(p, UnitSelection) and set(p.kinds) & set(SCOPED_KINDS)
        if scoped and p.kept is None:
            p = dataclasses.replace(p, ignore=tuple(dict.fromkeys((*p.ignore, *whole))))
        out.append(p)
    return out, whole


def check_uniform(results) -> None:
    """Refuse per-layer counts that differ (``uniform=True``), naming two layers that differ."""
    for r in results:
        units = r.units if r.name in ("heads", "ffn") else None
        roles: dict = {}  # FFN layers of different roles (routed / shared experts) may differ
        for layer, v in (units or {}).items():
            role = ffn_role(layer)[0] if r.name == "ffn" else ""
            roles.setdefault(role, {}).setdefault(tuple(v), layer)
        for seen in roles.values():
            if len(seen) > 1:
                (a, la), (b, lb) = list(seen.items())[:2]
                raise ConfigError(
                    f"uniform=True: the {r.name} pass left layers with different counts ({la}: "
                    f"{a[0]} -> {a[1]}, {lb}: {b[0]} -> {b[1]}); the layers differ in size or a "
                    "minimum bound in some of them"
                )
