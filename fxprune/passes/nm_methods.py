"""How the N:M pass picks the weights it keeps: one class per method on a shared base (as
llm-compressor's ``SparsityModifierBase`` does), registered by name, so ``NM(method=...)``, the
CLI's ``--sparsity-method`` and a user's own method go through one table.

A method says what calibration it reads (``data``: input norms for every layer; ``hessian``:
the inputs' Gram matrices too) and masks one weight in place (``mask``), returning the mask
and the weight's L1 norm before and after. The statistics themselves are gathered by
``nm_data.calibrate``; a layer they could not serve falls back to a simpler rule, and the pass
reports it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fxprune._util import lookup, registrar
from fxprune.graph.weighted import WeightedLayer
from fxprune.passes.nm import apply_nm
from fxprune.passes.nm_data import sparsegpt, wanda_scores


class NMMethod:
    """Base of the N:M selection methods."""

    name: ClassVar[str] = ""
    data: ClassVar[bool] = True  # reads calibration batches
    hessian: ClassVar[bool] = False  # ... and needs each layer's input Hessian

    def mask(
        self, w: torch.Tensor, c: WeightedLayer, n: int, m: int, acc, updated: dict
    ) -> tuple[torch.Tensor, float, float]:
        raise NotImplementedError


REGISTRY: dict[str, NMMethod] = {}


nm_method = registrar(__name__, "REGISTRY", NMMethod, "nm_method")
"""``@nm_method("name")``: register an :class:`NMMethod` subclass under ``name``."""


def resolve(name) -> NMMethod:
    """The N:M method ``name`` names (a registered name) or is (an instance)."""
    return lookup(REGISTRY, NMMethod, name, "sparsity_method")


@nm_method("magnitude")
class Magnitude(NMMethod):
    """Keep the N largest |w| of every M."""

    data = False

    def mask(self, w, c, n, m, acc, updated):
        return apply_nm(w, n, m, c.reduce_dim)


@nm_method("wanda")
class Wanda(NMMethod):
    """Keep the N largest |w| x ||x|| of every M (magnitude where no input was captured)."""

    def mask(self, w, c, n, m, acc, updated):
        score = None
        if acc is not None and c.param in acc.sq:
            score = wanda_scores(w, c, acc.sq[c.param])
        return apply_nm(w, n, m, c.reduce_dim, score)


@nm_method("sparsegpt")
class SparseGPT(Wanda):
    """Second-order reconstruction: the kept weights change too (into ``updated``); Wanda
    where a layer has no Hessian (a conv it cannot unfold)."""

    hessian = True

    def mask(self, w, c, n, m, acc, updated):
        if acc is None or c.param not in acc.hess:
            return super().mask(w, c, n, m, acc, updated)
        before = float(w.abs().sum())
        new, keep = sparsegpt(w, c, acc.hess[c.param], acc.count[c.param], n, m)
        after = float((w.abs() * keep).sum())
        w.copy_(new * keep)
        updated[c.param] = w.detach().clone()
        return keep, before, after


METHODS = tuple(REGISTRY)  # the built-in names
