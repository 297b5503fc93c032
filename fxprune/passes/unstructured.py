"""Unstructured pass: zero a fraction of the Linear / Conv weights without changing any shape.

``scope="layer"`` zeroes the same fraction of every weight; ``scope="global"`` ranks every
eligible weight of the model together, so layers with many small weights lose more.
``method="magnitude"`` ranks by ``|w|``; ``method="wanda"`` by ``|w| x ||x||`` (the input
feature's norm on the calibration batches, as for the N:M pass), compared within each output
row as Wanda does (its scores are not comparable across layers, so it has no global scope).

The pruned model is the dense model with those weights zeroed, which the equivalence proof
checks (the masks are part of the result, like N:M masks). It saves no compute on stock
kernels: dense GEMMs run over the zeros (docs/benchmarks.md measures it); what it can save is
storage, with a compressed checkpoint (``CompileResult.save(path, compress=...)``).
Already-zero weights rank first, so pruning an already pruned model (``iterative_prune``) only
adds zeros. A weight may carry an unstructured or an N:M mask, never both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxprune._util import module_matches
from fxprune.errors import ConfigError, NothingToPruneError, PlanError
from fxprune.graph.depgraph import DependencyGraph
from fxprune.graph.weighted import WeightedLayer
from fxprune.passes import PassResult, UnstructuredResult, register_pass
from fxprune.passes.nm import candidates

SCOPES = ("layer", "global")
METHODS = ("magnitude", "wanda")


@dataclass(frozen=True)
class Unstructured:
    """Options of the unstructured pass.

    Args:
        sparsity: fraction of each eligible weight (``scope="layer"``) or of all of them
            (``"global"``) set to zero, in (0, 1).
        scope: ``"layer"`` or ``"global"``.
        method: ``"magnitude"`` or ``"wanda"`` (layer scope only; reads ``calibration``).
        include: module names / globs to consider (default: every Linear and Conv).
        exclude: module names / globs left dense (e.g. the classifier).
        layers: replay: how many weights of each parameter to zero (by magnitude).
        calibration: batches for wanda (default: the example inputs).
    """

    sparsity: float = 0.5
    scope: str = "layer"
    method: str = "magnitude"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layers: tuple[tuple[str, int], ...] | None = field(default=None, compare=False)
    calibration: tuple | None = field(default=None, compare=False, hash=False)

    def __post_init__(self):
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1:
            raise ConfigError(f"unstructured={s!r}: the fraction of weights zeroed, in (0, 1)")
        if self.scope not in SCOPES:
            raise ConfigError(f"unstructured_scope={self.scope!r}: choose one of {SCOPES}")
        if self.method not in METHODS:
            raise ConfigError(f"unstructured_method={self.method!r}: choose one of {METHODS}")
        if self.method == "wanda" and self.scope == "global":
            raise ConfigError(
                "unstructured_method='wanda' compares weights within each output row; its "
                "scores are not comparable across layers: use unstructured_scope='layer'"
            )


def _eligible(gm, cfg: Unstructured) -> tuple[list[tuple[WeightedLayer, torch.Tensor]], dict]:
    chosen, ineligible = [], {}
    wanted = dict(cfg.layers) if cfg.layers is not None else None
    for c in candidates(gm):
        w = gm.get_parameter(c.param)
        if wanted is not None:
            if c.param in wanted:
                chosen.append((c, w))
            continue
        if cfg.include and not any(module_matches(c.layer, p) for p in cfg.include):
            ineligible[c.layer] = "not in unstructured_include"
        elif any(module_matches(c.layer, p) for p in cfg.exclude):
            ineligible[c.layer] = "in unstructured_exclude"
        elif not w.is_floating_point():
            ineligible[c.layer] = f"weight dtype {w.dtype} is not floating point"
        else:
            chosen.append((c, w))
    if wanted is not None and set(wanted) - {c.param for c, _ in chosen}:
        missing = sorted(set(wanted) - {c.param for c, _ in chosen})
        raise PlanError(f"plan's unstructured layers are not in this model: {missing[:5]}")
    if not chosen:
        why = "; ".join(f"{k}: {v}" for k, v in list(ineligible.items())[:5])
        raise NothingToPruneError(
            f"unstructured={cfg.sparsity} zeroes nothing: no Linear / Conv weight is eligible"
            + (f" ({why})" if why else " (the model has none)")
        )
    return chosen, ineligible


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` lowest scores (ties: the earlier index goes first)."""
    return torch.argsort(score.flatten(), stable=True)[:k]


def _layer_masks(chosen, cfg: Unstructured, scores: dict) -> dict[str, torch.Tensor]:
    masks = {}
    for c, w in chosen:
        keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        if cfg.layers is not None:
            keep[_lowest(w.detach().abs(), dict(cfg.layers)[c.param])] = False
        elif c.param in scores:  # wanda: the lowest of every output row
            rows = scores[c.param].movedim(_out_dim(c, w), 0).reshape(w.shape[_out_dim(c, w)], -1)
            k = int(rows.shape[1] * cfg.sparsity)
            drop = torch.argsort(rows, dim=1, stable=True)[:, :k]
            row_keep = torch.ones_like(rows, dtype=torch.bool).scatter_(1, drop, False)
            moved = list(w.movedim(_out_dim(c, w), 0).shape)
            keep = row_keep.reshape(moved).movedim(0, _out_dim(c, w)).flatten()
        else:
            keep[_lowest(w.detach().abs(), int(w.numel() * cfg.sparsity))] = False
        masks[c.param] = keep.reshape(w.shape)
    return masks


def _out_dim(c: WeightedLayer, w: torch.Tensor) -> int:
    """The output-feature dim of a weight (HF Conv1D stores [in, out])."""
    return 1 if c.kind == "linear" and c.reduce_dim == 0 else 0


def _global_masks(chosen, cfg: Unstructured) -> dict[str, torch.Tensor]:
    flat = torch.cat([w.detach().abs().float().flatten().cpu() for _, w in chosen])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[_lowest(flat, int(flat.numel() * cfg.sparsity))] = False
    masks, start = {}, 0
    for c, w in chosen:
        masks[c.param] = keep[start : start + w.numel()].reshape(w.shape).to(w.device)
        start += w.numel()
    return masks


@register_pass(
    "unstructured",
    Unstructured,
    lambda e: Unstructured(
        e["sparsity"],
        e.get("scope", "layer"),
        layers=tuple(e["layers"].items()),
    ),
)
def prune_unstructured(graph: DependencyGraph, cfg: Unstructured, args: tuple) -> PassResult:
    """Zero the chosen weights in place; report each weight's count and the kept magnitude."""
    gm = graph.gm
    chosen, ineligible = _eligible(gm, cfg)
    scores, no_input = {}, {}
    if cfg.method == "wanda" and cfg.layers is None:
        from fxprune.calibration import as_batches
        from fxprune.passes.nm_data import calibrate, wanda_scores

        layers = {c.param: c for c, _ in chosen}
        acc, _, _ = calibrate(gm, layers, as_batches(cfg.calibration, args), hessian=False)
        for c, w in chosen:
            if c.param in acc.sq:
                scores[c.param] = wanda_scores(w, c, acc.sq[c.param])
            else:
                no_input[c.param] = "no input captured: magnitude used"
    if cfg.scope == "global" and cfg.layers is None:
        masks = _global_masks(chosen, cfg)
    else:
        masks = _layer_masks(chosen, cfg, scores)
    before = after = 0.0
    zeros = {}
    with torch.no_grad():
        for c, w in chosen:
            before += float(w.abs().sum(dtype=torch.float32))
            w.masked_fill_(~masks[c.param], 0)
            after += float(w.abs().sum(dtype=torch.float32))
            zeros[c.param] = int((~masks[c.param]).sum())
    total = sum(w.numel() for _, w in chosen)
    return UnstructuredResult(
        "unstructured",
        changed=False,  # shapes are unchanged: the dependency graph stays valid
        plan={
            "name": "unstructured",
            "sparsity": cfg.sparsity,
            "scope": cfg.scope,
            "method": cfg.method,
            "layers": zeros,
        },
        masks=masks,
        sparsity=sum(zeros.values()) / total if total else 0.0,
        scope=cfg.scope,
        method=cfg.method,
        layers=zeros,
        ineligible=ineligible,
        kept_magnitude=after / before if before else 1.0,
        magnitude_fallback=no_input,
    )
