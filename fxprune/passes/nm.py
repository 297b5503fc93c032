"""N:M semi-structured sparsity: keep the N largest of every M consecutive weights along the
reduction axis of each eligible Linear and Conv (2:4 is what sparse tensor cores accelerate).

Axis rule: the groups of M run along the axis the layer reduces over, because that is the axis the
hardware (and TensorRT's check) reads in groups: ``in_features`` for a Linear weight ``[O, I]``;
input channels ``C`` for a conv weight ``[K, C, R, S]``, for every output channel and kernel
position (grouping the flattened weight would mix kernel positions, which TensorRT rejects).

The tensor work (masks, rewrite, pattern checks) is :mod:`fxprune.passes.nm_kernels`; this
module chooses the layers and runs the methods. Layers that cannot carry the pattern are listed
with the reason.
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
from fxprune.passes import NMResult, PassResult, register_pass
from fxprune.passes.nm_kernels import apply_nm, is_nm, magnitude_order, nm_mask, off_mask

__all__ = [
    "NM",
    "apply_nm",
    "candidates",
    "is_nm",
    "keep_masks",
    "magnitude_order",
    "nm_mask",
    "off_mask",
]

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
        sequential: calibrate layer by layer in one forward: every batch runs through the
            graph together, and each weight is chosen (and, for SparseGPT, updated) on the
            inputs the already pruned layers before it give (SparseGPT's "true sequential"
            order); the pruned graph's outputs on the batches come back in
            ``NMResult.outputs``. Holds every batch's live values at once: meant for one block
            (``fxprune.stream`` uses it, so a block needs one forward, not a calibration pass
            and a second one for the next block's inputs), not a whole model.
    """

    n: int = 2
    m: int = 4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layers: tuple[str, ...] | None = field(default=None, compare=False)
    method: str = "magnitude"
    calibration: tuple | None = field(default=None, compare=False, hash=False)
    sequential: bool = False

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ConfigError(f"sparsity {self.n}:{self.m}: need integers 0 < N < M (e.g. '2:4')")
        from fxprune.passes.nm_methods import resolve

        method = resolve(self.method)  # a ConfigError naming the registered methods
        if self.sequential and self.layers is not None:
            raise ConfigError(
                "NM(sequential=True) with layers= (a replay): the masks come from the saved "
                "weights, nothing is calibrated layer by layer"
            )
        if self.sequential and not method.data:
            raise ConfigError(
                f"NM(sequential=True) with method={self.method!r}: it reads no calibration, "
                "so there is nothing to calibrate layer by layer"
            )

    @classmethod
    def parse(cls, spec: str, **kw) -> NM:
        """``"2:4"`` -> ``NM(2, 4)``."""
        try:
            n, m = (int(v) for v in str(spec).split(":"))
        except ValueError:
            raise ConfigError(f"sparsity={spec!r}: write it as 'N:M', e.g. '2:4'") from None
        return cls(n, m, **kw)


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


def _chosen(gm, cfg: NM) -> tuple[list[tuple[WeightedLayer, torch.Tensor]], dict[str, str]]:
    """The weights the pass masks, and why each other Linear / Conv weight is not masked."""
    chosen, ineligible = [], {}
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
        else:
            chosen.append((c, w))
    if not chosen and cfg.layers is None:  # asked for N:M, and not one weight can carry it
        why = "; ".join(f"{k}: {v}" for k, v in list(ineligible.items())[:5])
        raise NothingToPruneError(
            f"sparsity='{cfg.n}:{cfg.m}' masks nothing: no Linear / Conv weight is eligible"
            + (f" ({why})" if why else " (the model has none the N:M pass knows)")
        )
    return chosen, ineligible


@register_pass(
    "nm",
    NM,
    lambda e: NM(e["n"], e["m"], layers=tuple(e["layers"]), method=e.get("method", "magnitude")),
)
def prune_nm(graph: DependencyGraph, cfg: NM, args: tuple) -> PassResult:
    """Apply N:M masks in place to every eligible weight; report the ineligible ones and why."""
    from fxprune.passes.nm_methods import resolve

    gm = graph.gm
    method = resolve(cfg.method)
    chosen, ineligible = _chosen(gm, cfg)
    acc, fallback, outputs, done, updated = None, {}, None, {}, {}
    with torch.no_grad():
        if method.data and cfg.layers is None:  # data-driven: calibrate (replay: magnitude)
            from fxprune.calibration import as_batches
            from fxprune.passes.nm_data import calibrate

            def ready(params, stats):  # sequential: mask these before they run
                group = [(c, w) for c, w in chosen if c.param in set(params) - set(done)]
                done.update(method.mask_all(group, cfg.n, cfg.m, stats, updated))

            acc, fallback, outputs = calibrate(
                gm,
                {c.param: c for c, _ in chosen},
                as_batches(cfg.calibration, args),
                hessian=method.hessian,
                on_ready=ready if cfg.sequential else None,
            )
        rest = [(c, w) for c, w in chosen if c.param not in done]  # all, unless sequential
        done.update(method.mask_all(rest, cfg.n, cfg.m, acc, updated))
    eligible, masks = [], {}
    kept_mag = total_mag = 0.0
    with torch.no_grad():
        for c, _ in chosen:
            masks[c.param], before, after = done[c.param]
            total_mag += before
            kept_mag += after
            eligible.append(c.param)
    if cfg.layers is not None and set(cfg.layers) - set(eligible):
        from fxprune.errors import PlanError

        missing = sorted(set(cfg.layers) - set(eligible))
        raise PlanError(f"plan's N:M layers cannot be masked in this model: {missing[:5]}")
    wanda, no_input = {}, {}
    if acc is not None:  # layers the data-driven method could not serve, and what they got
        missing = [c.param for c, _ in chosen if c.param not in acc.sq]
        no_input = dict.fromkeys(missing, "no input captured: magnitude used")
        if method.hessian and fallback:
            wanda = {k: v for k, v in fallback.items() if k in acc.sq}
    return NMResult(
        "nm",
        changed=False,  # shapes are unchanged: the dependency graph stays valid
        plan={"name": "nm", "n": cfg.n, "m": cfg.m, "method": cfg.method, "layers": eligible},
        masks=masks,
        updated=updated,
        n=cfg.n,
        m=cfg.m,
        method=cfg.method,
        layers=eligible,
        ineligible=ineligible,
        kept_magnitude=kept_mag / total_mag if total_mag else 1.0,
        wanda_fallback=wanda,
        magnitude_fallback=no_input,
        sequential=cfg.sequential,
        outputs=outputs,
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
