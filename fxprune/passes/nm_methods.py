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

from fxprune._util import lookup, registrar, ticking
from fxprune.graph.weighted import WeightedLayer
from fxprune.passes.nm import apply_nm
from fxprune.passes.nm_data import sparsegpt
from fxprune.passes.sparsegpt import hessian_factor


class NMMethod:
    """Base of the N:M selection methods."""

    name: ClassVar[str] = ""
    data: ClassVar[bool] = True  # reads calibration batches
    hessian: ClassVar[bool] = False  # ... and needs each layer's input Hessian

    def mask(
        self, w: torch.Tensor, c: WeightedLayer, n: int, m: int, acc, updated: dict
    ) -> tuple[torch.Tensor, float, float]:
        raise NotImplementedError

    def mask_all(self, chosen, n: int, m: int, acc, updated: dict) -> dict:
        """``mask`` for every (layer, weight) in ``chosen``: param -> (mask, before, after)."""
        return {c.param: self.mask(w, c, n, m, acc, updated) for c, w in chosen}


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
        norm = None
        if acc is not None and c.param in acc.sq:
            norm = acc.sq[c.param].float().sqrt()  # |W| x ||x||, scored block by block
        return apply_nm(w, n, m, c.reduce_dim, scale=norm)


@nm_method("sparsegpt")
class SparseGPT(Wanda):
    """Second-order reconstruction: the kept weights change too (into ``updated``); Wanda
    where a layer has no Hessian (a conv it cannot unfold). Linear layers that share a Hessian
    (q / k / v, gate / up read one input) share its factorisation and are swept as one stack
    of rows (exactly what one sweep each gives: rows are independent)."""

    hessian = True

    def mask(self, w, c, n, m, acc, updated):
        return self.mask_all([(c, w)], n, m, acc, updated)[c.param]

    def mask_all(self, chosen, n, m, acc, updated):
        out, stacks = {}, {}
        for c, w in chosen:
            if acc is None or c.param not in acc.hess:
                out[c.param] = Wanda.mask(self, w, c, n, m, acc, updated)
            else:
                stacked = c.kind == "linear" and c.reduce_dim == 1
                key = id(acc.hess[c.param]) if stacked else c.param
                stacks.setdefault(key, []).append((c, w))
        for group in ticking(list(stacks.values()), "SparseGPT layers"):
            c0 = group[0][0]
            factor = hessian_factor(acc.hess[c0.param].to(group[0][1].device), acc.count[c0.param])
            ws = [w for _, w in group]
            big = (
                torch.cat([w.detach().reshape(w.shape[0], -1) for w in ws])
                if len(ws) > 1
                else ws[0]
            )
            new, keep = sparsegpt(big, c0, None, 0, n, m, factor=factor)
            for (c, w), nw, kp in zip(
                group,
                new.split([w.shape[0] for w in ws]),
                keep.split([w.shape[0] for w in ws]),
                strict=True,
            ):
                before = float(w.abs().sum())
                after = float(w.abs().mul_(kp).sum())
                w.copy_(nw)  # zero where not kept: the sweep zeroes what it prunes
                updated[c.param] = w.detach().clone()
                out[c.param] = (kp, before, after)
        return out


METHODS = tuple(REGISTRY)  # the built-in names
