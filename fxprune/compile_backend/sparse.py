"""``fxprune.backend``'s 2:4 step on CUDA: after a graph's N:M pass, its masked Linear weights
become semi-structured sparse tensors where :mod:`fxprune.verify.semi_structured` measured
them faster at this graph's shapes (each Linear alone, eager: the kernel choice, not what the
compiler fuses around it); a graph on the CPU (no such kernels) or a compiler that refuses the
sparse tensors keeps the dense weights, and the graph's report says which and why.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxprune.errors import ConfigError
from fxprune.verify.semi_structured import (
    MIN_SPEEDUP,
    SwapPlan,
    plan_semi_structured,
    restore_dense,
    swap_semi_structured,
)

CPU = "the graph runs on the CPU: semi-structured sparse kernels are CUDA-only"


def check_all(mode: str, plan, recipe, options: dict) -> None:
    """``semi_structured="all"`` asks for sparse tensors: a source that sets no N:M masks
    would leave it nothing to do, so it is refused."""
    from fxprune.passes import NM

    if mode != "all":
        return
    if plan is not None:
        nm = any(e["name"] == "nm" for e in plan.passes)
    elif recipe is not None:
        nm = any(isinstance(c, NM) for c in recipe.passes)
    else:
        nm = options.get("sparsity") is not None
    if not nm:
        raise ConfigError(
            "semi_structured='all': this source sets no N:M masks (no sparsity='2:4' pass), "
            "so no weight could become a semi-structured sparse tensor"
        )


def on_cuda(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


def semi_structured(gm: fx.GraphModule, masks: dict, args: tuple, mode: str, speed):
    """(the plan, the dense parameters swapped out) for ``gm``'s N:M ``masks`` (``speed``: the
    ``min_speedup`` given, or None); None when there are no masks."""
    if not masks:
        return None, {}
    if mode == "all" and not on_cuda(args):
        raise ConfigError(f"semi_structured='all': {CPU}; move the model and inputs to CUDA")
    if mode == "off" or not on_cuda(args):
        why = "semi_structured='off'" if mode == "off" else CPU
        margin = MIN_SPEEDUP if speed is None else speed
        return SwapPlan(mode, margin, skipped=dict.fromkeys(masks, why)), {}
    plan = plan_semi_structured(gm, masks, args, mode, speed)
    originals = {n: gm.get_parameter(n) for n in plan.swapped}
    done = swap_semi_structured(gm, plan)
    return plan, {n: originals[n] for n in done}


def compile_sparse(compiler, gm: fx.GraphModule, inputs: list, plan, originals: dict):
    """``compiler(gm, inputs)``; when it refuses the sparse weights, the dense ones go back,
    each swapped row says why, and the dense graph is compiled."""
    try:
        return compiler(gm, inputs)
    except Exception as e:  # noqa: BLE001 - any compiler's refusal of a tensor subclass
        if not originals:
            raise
        restore_dense(gm, originals)
        why = f"the compiler refused it: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        for row in plan.rows:
            if row.name in originals:
                row.swap, row.reason = False, why
        return compiler(gm, inputs)
