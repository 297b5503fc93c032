"""``fxprune.backend``'s 2:4 step on CUDA: after a graph's N:M pass, its masked Linear weights
become semi-structured sparse tensors where :mod:`fxprune.verify.semi_structured` measured
them faster at this graph's shapes; a graph on the CPU (no such kernels) or a compiler that
refuses the sparse tensors keeps the dense weights, and the graph's report says which and why.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxprune.verify.semi_structured import (
    SwapPlan,
    plan_semi_structured,
    restore_dense,
    swap_semi_structured,
)

CPU = "the graph runs on the CPU: semi-structured sparse kernels are CUDA-only"


def on_cuda(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


def semi_structured(gm: fx.GraphModule, masks: dict, args: tuple, mode: str, speed: float):
    """(the plan, the dense parameters swapped out) for ``gm``'s N:M ``masks``; None when
    there are no masks."""
    if not masks:
        return None, {}
    if mode == "off" or not on_cuda(args):
        why = "semi_structured='off'" if mode == "off" else CPU
        return SwapPlan(mode, speed, skipped=dict.fromkeys(masks, why)), {}
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
