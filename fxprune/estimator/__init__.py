"""Price unstructured, 2:4 and structured pruning before doing any of it: parameters, bytes in
fp32 / fp16 / int8 (with the index overhead of each storage format), FLOPs, and the speedup a
piece of hardware will really give, each figure with its formula and the user's numbers.

The cost model (docs/design.md, "The savings estimator") is a roofline per layer, read off the traced graph:

    t(layer) = max(FLOPs / peak, bytes / bandwidth)        bytes = weights + inputs + outputs

summed over every conv / linear / matmul and every other op that moves memory (element-wise,
norms, pooling; views cost nothing). Speedups are ratios of these sums, so the absolute kernel
efficiency (real kernels reach 50-80 % of the roof) cancels; what does not cancel is stated:

- unstructured sparsity s: dense kernels run over the zeros, so the GPU time is unchanged below
  ``hw.unstructured_threshold`` (~95 %); above it a sparse kernel on CUDA cores (fp32 peak, CSR
  bytes) is assumed. CPUs: stock runtimes (ONNX Runtime, PyTorch) use dense kernels: 1.0x.
- 2:4: Amdahl's law over the share ``f`` of dense time spent in eligible GEMMs, which run
  ``k_eff`` times faster (``hw.sparse_factor`` on the math, compressed weights on the bytes;
  GEMMs with fewer than ``hw.sparse_min_rows`` rows gain nothing):
  ``S = 1 / ((1 - f) + f / k_eff)``.
- structured: the pruned model is a smaller dense model; it is actually built (``fxprune.compile``
  on a copy) and costed with the same roofline, so its numbers are exact counts, not guesses.

This module holds the entry point :func:`estimate` and the package's public names. The pieces:
``hardware`` (the profiles), ``costs`` (the per-op cost model), ``scenarios`` (the dense,
unstructured and 2:4 pricing and the context they share), ``structured`` (the structured
scenario, built and costed) and ``report`` (the :class:`EstimateReport` returned).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fxprune.errors import ConfigError
from fxprune.estimator.costs import (
    LayerCost,
    RooflineRow,
    bitmask_bytes,
    csr_bytes,
    layer_costs,
    nm_bytes_ratio,
    roofline_rows,
)
from fxprune.estimator.hardware import BYTES, HARDWARE, Hardware
from fxprune.estimator.report import EstimateReport, Scenario
from fxprune.estimator.scenarios import (
    PricingContext,
    dense_scenario,
    distinct_weights,
    gemm_flops,
    nm_scenario,
    unstructured_scenario,
)
from fxprune.estimator.structured import structured_scenario
from fxprune.graph.trace import as_args

__all__ = [
    "BYTES",
    "HARDWARE",
    "EstimateReport",
    "Hardware",
    "LayerCost",
    "RooflineRow",
    "Scenario",
    "bitmask_bytes",
    "csr_bytes",
    "estimate",
    "layer_costs",
    "nm_bytes_ratio",
]


def _batch_of(args: tuple) -> int:
    for a in args:
        if isinstance(a, torch.Tensor) and a.ndim:
            return int(a.shape[0])
    return 1


def estimate(
    model: torch.nn.Module,
    example_inputs,
    sparsity: float | None = 0.9,
    nm: str | None = "2:4",
    structured=0.5,
    hardware: Sequence[str | Hardware] = ("A100", "H100", "L4", "cpu"),
    batch_sizes: Sequence[int] | None = None,
    dtype: str | None = None,
    exclude: Sequence[str] = (),
    fused: bool = True,
    mode: str = "auto",
    leaf_modules: Sequence[str | type] = (),
    **prune_kwargs,
) -> EstimateReport:
    """Price unstructured, 2:4 and structured pruning of ``model`` before pruning it.

    Args:
        model: the dense model (not modified).
        example_inputs: a tensor or tuple with the shapes the model runs at; their first dim is
            the batch, and other batch sizes are costed by scaling activations and FLOPs.
        sparsity: the unstructured sparsity s to price (None: skip).
        nm: the semi-structured pattern (only ``"2:4"``; None: skip).
        structured: a fraction of channels per group (``fxprune.compile(channels=...)``), a dict
            of ``fxprune.compile`` arguments (``{"heads": 0.5, "ffn": 0.5}``), an existing
            :class:`fxprune.CompileResult`, or None to skip.
        hardware: profile names from ``fxprune.estimator.HARDWARE`` or :class:`Hardware` objects.
        batch_sizes: batch sizes to price (default: 1 and 8).
        dtype: ``"fp32"``, ``"fp16"`` or ``"int8"`` for every profile (default: fp16 on GPUs,
            fp32 on CPUs).
        exclude: modules the unstructured and 2:4 scenarios keep dense (e.g. the classifier).
        fused: cost element-wise ops after a conv / GEMM as fused into its epilogue (what
            TensorRT, ONNX Runtime and inductor do); False costs each as its own memory pass.
        mode, leaf_modules: how to trace (as in ``fxprune.compile``).
        **prune_kwargs: further ``fxprune.compile`` arguments for the structured scenario.

    Returns:
        An :class:`EstimateReport`: ``scenarios`` (dense, unstructured, 2:4, structured) with
        params, bytes per format and dtype, FLOPs, speedup per hardware and batch, and the
        formulas with the numbers substituted; ``roofline`` per hardware and batch.

    Example:
        >>> rep = fxprune.estimate(model, x, sparsity=0.9, structured=0.5)
        >>> print(rep.table()); rep.scenario("2:4").speedup["H100"][8]
    """
    from fxprune.graph import trace

    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity={sparsity!r}: give an unstructured sparsity in [0, 1)")
    if nm is not None and str(nm) != "2:4":
        raise ConfigError(f"nm={nm!r}: only '2:4' has hardware support to price")
    hws = _profiles(hardware)
    if dtype is not None and dtype not in BYTES:
        raise ConfigError(f"dtype={dtype!r}: choose one of {sorted(BYTES)}")
    batches = list(batch_sizes or (1, 8))
    if any(not isinstance(b, int) or b < 1 for b in batches):
        raise ConfigError(f"batch_sizes={batch_sizes!r}: give positive integers")
    args = as_args(example_inputs, model)
    gm = trace(model, args, mode=mode, leaf_modules=leaf_modules).gm
    costs = layer_costs(gm, exclude, fused)
    ctx = PricingContext(
        costs,
        distinct_weights(costs),
        sum(p.numel() for p in model.parameters()),
        gemm_flops(costs),
        hws,
        {h.name: dtype or ("fp16" if h.kind == "gpu" else "fp32") for h in hws},
        batches,
        _batch_of(args),
        tuple(exclude),
    )
    scen = [dense_scenario(ctx)]
    if sparsity is not None:
        scen.append(unstructured_scenario(ctx, float(sparsity)))
    if nm is not None:
        scen.append(nm_scenario(ctx))
    if structured is not None:
        scen.append(
            structured_scenario(
                model,
                fused,
                args,
                structured,
                costs,
                hws,
                ctx.dtypes,
                batches,
                ctx.b0,
                mode,
                leaf_modules,
                prune_kwargs,
            )
        )
    roof = {
        hw.name: {b: roofline_rows(costs, hw, ctx.dtypes[hw.name], b / ctx.b0) for b in batches}
        for hw in hws
    }
    return EstimateReport(
        type(model).__name__,
        ctx.b0,
        batches,
        [h.name for h in hws],
        ctx.dtypes,
        scen,
        roof,
        _notes(hws, fused),
        ridges={h.name: h.ridge(ctx.dtypes[h.name]) for h in hws},
    )


def _profiles(hardware) -> list[Hardware]:
    hws = []
    for h in hardware:
        if isinstance(h, Hardware):
            hws.append(h)
        elif h in HARDWARE:
            hws.append(HARDWARE[h])
        else:
            raise ConfigError(f"hardware {h!r}: choose from {sorted(HARDWARE)} or pass a Hardware")
    return hws


def _notes(hws, fused: bool) -> list[str]:
    notes = [
        "times are per-layer roofline bounds, max(FLOPs / peak, bytes / bandwidth); speedups "
        "are ratios of their sums, so kernel efficiency mostly cancels",
        "bytes moved count weights + layer inputs + outputs once per call; ops that only "
        "reshape or select count nothing; 'other' ops are element-wise, norms and pooling; "
        + (
            "'fused' ops ran in the epilogue of the conv / GEMM before them and read only "
            "their other operands"
            if fused
            else "no op is fused"
        ),
    ]
    return notes + [f"{h.name}: {h.source}" for h in hws]
