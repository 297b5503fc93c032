"""N:M semi-structured sparsity: keep the N largest of every M consecutive weights along the
reduction axis of each eligible Linear and Conv (2:4 is what sparse tensor cores accelerate).

Axis rule: the groups of M run along the axis the layer reduces over, because that is the axis the
hardware (and TensorRT's check) reads in groups: ``in_features`` for a Linear weight ``[O, I]``;
input channels ``C`` for a conv weight ``[K, C, R, S]``, for every output channel and kernel
position (grouping the flattened weight would mix kernel positions, which TensorRT rejects).

The mask is computed for all groups at once (reshape to ``[..., C/M, M]``, ``topk``), so a billion
weights take seconds on a CPU. Layers that cannot carry the pattern are listed with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune._util import module_matches
from fxprune.errors import ConfigError, NothingToPruneError
from fxprune.graph.depgraph import DependencyGraph
from fxprune.graph.weighted import WeightedLayer, weighted_layer
from fxprune.passes import PassResult

aten = torch.ops.aten


@dataclass(frozen=True)
class NM:
    """Options of the N:M pass.

    Args:
        n: weights kept per group.
        m: group length along the reduction axis.
        include: module names / globs to consider (default: every Linear and Conv).
        exclude: module names / globs never sparsified (e.g. the classifier).
        layers: replay mode: exactly these weights (from a saved plan).
        method: ``"magnitude"`` (|w|), ``"wanda"`` (|w| x input norm) or ``"sparsegpt"``
            (second-order reconstruction that also updates kept weights); see ``nm_data.py``.
        calibration: batches for wanda / sparsegpt (default: the example inputs).
    """

    n: int = 2
    m: int = 4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layers: tuple[str, ...] | None = field(default=None, compare=False)
    method: str = "magnitude"
    calibration: tuple | None = field(default=None, compare=False, hash=False)

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ConfigError(f"sparsity {self.n}:{self.m}: need integers 0 < N < M (e.g. '2:4')")
        from fxprune.passes.nm_data import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"sparsity_method={self.method!r}: choose one of {METHODS}")

    @classmethod
    def parse(cls, spec: str, **kw) -> NM:
        """``"2:4"`` -> ``NM(2, 4)``."""
        try:
            n, m = (int(v) for v in str(spec).split(":"))
        except ValueError:
            raise ConfigError(f"sparsity={spec!r}: write it as 'N:M', e.g. '2:4'") from None
        return cls(n, m, **kw)


def magnitude_order(w: torch.Tensor) -> torch.Tensor:
    """A tensor that orders like ``|w|``: for IEEE floats the bit pattern with the sign cleared
    (one integer op, no float conversion of a bf16 / fp16 weight), else ``w.abs()``."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
    if w.dtype in bits:
        return w.detach().view(bits[w.dtype]) & torch.iinfo(bits[w.dtype]).max
    return w.detach().abs()


def nm_mask(w: torch.Tensor, n: int, m: int, axis: int = 1) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude of every ``m`` consecutive weights along
    ``axis`` (``w.shape[axis]`` must be divisible by ``m``). Ties go to the earlier weight.

    Vectorised: for small M (2:4, 4:8) each weight's rank in its group comes from the
    M*(M-1)/2 pairwise comparisons of the groups' columns (each decides both ranks), on the
    magnitude bits (:func:`magnitude_order`): no float ``abs`` copy, half the comparisons of
    ranking each weight on its own, and ~2x the rate of ``topk`` over a size-4 dim on a CPU
    (a copy transposing the groups into contiguous rows measured slower: its allocation
    costs more than the strided reads). Larger M uses ``topk``.
    """
    moved = magnitude_order(w).movedim(axis, -1)  # [..., C]
    groups = moved.reshape(-1, m)  # one row per group of M along the reduction axis
    if m <= 8:
        cols = groups.unbind(1)
        rank = [torch.zeros(groups.shape[0], dtype=torch.uint8, device=w.device) for _ in cols]
        for i in range(m):
            for j in range(i + 1, m):
                later = cols[j] > cols[i]  # j outranks i; otherwise i (larger or equal, earlier)
                rank[i] += later
                rank[j] += ~later
        keep = torch.stack([r < n for r in rank], 1)
    else:
        top = groups.topk(n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(moved.shape).movedim(-1, axis)


def is_nm(w: torch.Tensor, n: int, m: int, axis: int = 1) -> bool:
    """True when every group of ``m`` along ``axis`` has at most ``n`` non-zeros (False when
    the axis is not a multiple of ``m``). Counted by adding the groups' columns as bytes: a
    sum over a size-M dim is several times slower on a CPU."""
    moved = w.detach().movedim(axis, -1)
    if moved.shape[-1] % m:
        return False
    cols = (moved != 0).reshape(-1, m).unbind(1)
    count = cols[0].to(torch.uint8)
    for c in cols[1:]:
        count += c
    return bool((count <= n).all())


def candidates(gm: fx.GraphModule) -> list[WeightedLayer]:
    """Every Linear / Conv weight in the graph, in graph order (module and functional forms)."""
    out, seen = [], set()
    for node in gm.graph.nodes:
        c = weighted_layer(gm, node)
        if c is not None and c.param not in seen:
            seen.add(c.param)
            out.append(c)
    return out


def eligibility(c: WeightedLayer, w: torch.Tensor, cfg: NM) -> str | None:
    """None when the weight can carry N:M along its reduction axis, else the reason."""
    if cfg.include and not any(module_matches(c.layer, p) for p in cfg.include):
        return "not in sparsity_include"
    if any(module_matches(c.layer, p) for p in cfg.exclude):
        return "in sparsity_exclude"
    if c.transposed:
        return "transposed conv: its reduction axis is not a contiguous weight dim"
    if c.groups != 1:
        return f"grouped conv (groups={c.groups}): sparse kernels need a dense channel reduction"
    reduce = w.shape[c.reduce_dim]
    if reduce % cfg.m:
        return (
            f"reduction size {reduce} is not divisible by M={cfg.m} (with channel pruning, "
            f"round_to={cfg.m} keeps counts divisible)"
        )
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not floating point"
    return None


def prune_nm(graph: DependencyGraph, cfg: NM, args: tuple) -> PassResult:
    """Apply N:M masks in place to every eligible weight; report the ineligible ones and why."""
    gm = graph.gm
    eligible, ineligible, masks, updated = [], {}, {}, {}
    kept_mag = total_mag = 0.0
    chosen: list[tuple[WeightedLayer, torch.Tensor]] = []
    for c in candidates(gm):
        w = gm.get_parameter(c.param)
        if cfg.layers is not None:
            if c.param not in cfg.layers:
                continue
            reason = None if w.shape[c.reduce_dim] % cfg.m == 0 else "reduction not divisible by M"
        else:
            reason = eligibility(c, w, cfg)
        if reason:
            ineligible[c.layer] = reason
            continue
        chosen.append((c, w))
    if not chosen and cfg.layers is None:  # asked for N:M, and not one weight can carry it
        why = "; ".join(f"{k}: {v}" for k, v in list(ineligible.items())[:5])
        raise NothingToPruneError(
            f"sparsity='{cfg.n}:{cfg.m}' masks nothing: no Linear / Conv weight is eligible"
            + (f" ({why})" if why else " (the model has none the N:M pass knows)")
        )
    data = cfg.method != "magnitude" and cfg.layers is None
    fallback: dict[str, str] = {}
    if data:
        from fxprune.calibration import as_batches
        from fxprune.passes.nm_data import calibrate

        acc, fallback = calibrate(
            gm,
            {c.param: c for c, _ in chosen},
            as_batches(cfg.calibration, args),
            hessian=cfg.method == "sparsegpt",
        )
    with torch.no_grad():
        for c, w in chosen:
            total_mag += float(w.abs().sum())
            if data and cfg.method == "sparsegpt" and c.param in acc.hess:
                from fxprune.passes.nm_data import sparsegpt

                new, mask = sparsegpt(w, c, acc.hess[c.param], acc.count[c.param], cfg.n, cfg.m)
                kept_mag += float((w.abs() * mask).sum())
                w.copy_(new * mask)
                updated[c.param] = w.detach().clone()
            else:
                if data and c.param in acc.sq:
                    from fxprune.passes.nm_data import wanda_scores

                    score = wanda_scores(w, c, acc.sq[c.param])
                else:
                    score = w
                mask = nm_mask(score, cfg.n, cfg.m, axis=c.reduce_dim)
                w.masked_fill_(~mask, 0)
                kept_mag += float(w.abs().sum())
            masks[c.param] = mask
            eligible.append(c.param)
    if cfg.layers is not None and set(cfg.layers) - set(eligible):
        from fxprune.errors import PlanError

        missing = sorted(set(cfg.layers) - set(eligible))
        raise PlanError(f"plan's N:M layers cannot be masked in this model: {missing[:5]}")
    details = {
        "n": cfg.n,
        "m": cfg.m,
        "method": cfg.method,
        "layers": eligible,
        "ineligible": ineligible,
        "kept_magnitude": kept_mag / total_mag if total_mag else 1.0,
    }
    if data:  # layers the data-driven method could not serve, and what they got instead
        missing = [c.param for c, _ in chosen if c.param not in acc.sq]
        no_input = dict.fromkeys(missing, "no input captured: magnitude used")
        if cfg.method == "sparsegpt" and fallback:
            details["wanda_fallback"] = {k: v for k, v in fallback.items() if k in acc.sq}
        if no_input:
            details["magnitude_fallback"] = no_input
    return PassResult(
        "nm",
        changed=False,  # shapes are unchanged: the dependency graph stays valid
        details=details,
        masks=masks,
        updated=updated,
        plan={"name": "nm", "n": cfg.n, "m": cfg.m, "method": cfg.method, "layers": eligible},
    )


def masks_from_weights(module: fx.GraphModule, names, n: int, m: int) -> dict[str, torch.Tensor]:
    """N:M masks of weights that already carry the pattern (after loading a checkpoint): the
    non-zeros, completed to N per group along each layer's reduction axis."""
    axis = {c.param: c.reduce_dim for c in candidates(module)}
    return {k: nm_mask(module.get_parameter(k), n, m, axis=axis.get(k, 1)) for k in names}


def keep_masks(module: nn.Module, masks: dict[str, torch.Tensor], optimizer):
    """Re-apply N:M masks after every ``optimizer.step()`` so fine-tuning never revives a pruned
    weight. Returns the hook handle (``.remove()`` to stop)."""
    params = {name: module.get_parameter(name) for name in masks}

    def reapply(*_):
        with torch.no_grad():
            for name, p in params.items():
                p.mul_(masks[name].to(p.device))

    reapply()
    return optimizer.register_step_post_hook(reapply)
