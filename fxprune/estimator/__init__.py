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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fxprune._util import module_matches
from fxprune.errors import ConfigError, FxPruneError
from fxprune.estimator.costs import (
    LayerCost,
    RooflineRow,
    bitmask_bytes,
    csr_bytes,
    dense_time_ms,
    layer_costs,
    nm_bytes_ratio,
    nm_time_ms,
    roofline_rows,
    unstructured_time_ms,
)
from fxprune.estimator.hardware import BYTES, HARDWARE, NM_META_BITS, Hardware
from fxprune.estimator.report import EstimateReport, Scenario, fmt_count, fmt_mb
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


def _bytes_all(n: float) -> dict[str, float]:
    return {d: n * b for d, b in BYTES.items()}


def _weights(costs: list[LayerCost]) -> dict[str, LayerCost]:
    """One cost row per distinct weight (a layer called twice stores its weight once)."""
    out: dict[str, LayerCost] = {}
    for c in costs:
        if c.weight and c.name not in out:
            out[c.name] = c
    return out


def _gemm_flops(costs: list[LayerCost]) -> float:
    return sum(c.flops for c in costs if c.op != "other")


def _speedups(
    base: list[LayerCost],
    per_layer,
    hws: list[Hardware],
    dtypes: dict[str, str],
    batches: list[int],
    b0: int,
) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for hw in hws:
        out[hw.name] = {}
        for b in batches:
            sc = b / b0
            t_dense = sum(dense_time_ms(c, hw, dtypes[hw.name], sc) for c in base)
            t_new = per_layer(hw, dtypes[hw.name], sc)
            out[hw.name][b] = t_dense / t_new if t_new else float("inf")
    return out


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
    ctx = _Ctx(
        costs,
        _weights(costs),
        sum(p.numel() for p in model.parameters()),
        _gemm_flops(costs),
        hws,
        {h.name: dtype or ("fp16" if h.kind == "gpu" else "fp32") for h in hws},
        batches,
        _batch_of(args),
        tuple(exclude),
    )
    scen = [_dense_scenario(ctx)]
    if sparsity is not None:
        scen.append(_unstructured_scenario(ctx, float(sparsity)))
    if nm is not None:
        scen.append(_nm_scenario(ctx))
    if structured is not None:
        scen.append(
            _structured(
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


@dataclass(frozen=True)
class _Ctx:
    """What every scenario's pricing reads: the traced costs and the profiles asked for."""

    costs: list
    weights: dict
    P: int  # every parameter of the model
    gflops: float  # FLOPs of one call at the example batch
    hws: list
    dtypes: dict
    batches: list
    b0: int
    exclude: tuple

    @property
    def W(self) -> int:  # parameters in conv / linear weights (prunable)
        return sum(c.weight for c in self.weights.values())

    def speedups(self, total_ms) -> dict:
        return _speedups(self.costs, total_ms, self.hws, self.dtypes, self.batches, self.b0)


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


def _dense_scenario(ctx: _Ctx) -> Scenario:
    P, W = ctx.P, ctx.W
    dense = Scenario("dense", P, {"dense": _bytes_all(P)}, ctx.gflops, ctx.gflops)
    dense.speedup = {h.name: {b: 1.0 for b in ctx.batches} for h in ctx.hws}
    dense.formulas.append(
        f"P = {fmt_count(P)} parameters, of which {fmt_count(W)} in {len(ctx.weights)} "
        f"conv/linear weights (prunable) and {fmt_count(P - W)} others (biases, norms, "
        "embeddings)"
    )
    dense.formulas.append(
        "bytes = P x bytes per value = "
        + ", ".join(f"{fmt_count(P)} x {b} = {fmt_mb(P * b)} ({d})" for d, b in BYTES.items())
    )
    dense.formulas.append(f"FLOPs = 2 x MACs = {ctx.gflops / 1e9:.3f} GFLOPs per batch of {ctx.b0}")
    return dense


def _unstructured_scenario(ctx: _Ctx, s: float) -> Scenario:
    costs, weights, other = ctx.costs, ctx.weights, ctx.P - ctx.W
    excl = {k for k in weights if any(module_matches(k, p) for p in ctx.exclude)}
    sparse_w = {k: c for k, c in weights.items() if k not in excl}
    dense_rest = other + sum(c.weight for k, c in weights.items() if k in excl)
    kept = sum(round(c.weight * (1 - s)) for c in sparse_w.values())
    csr = {
        d: dense_rest * BYTES[d] + sum(csr_bytes(c, s, d) for c in sparse_w.values()) for d in BYTES
    }
    bm = {
        d: dense_rest * BYTES[d] + sum(bitmask_bytes(c, s, d) for c in sparse_w.values())
        for d in BYTES
    }
    wflops = sum(c.flops for c in costs if c.weight and c.name not in excl)
    sc = Scenario(
        f"unstructured {s:.0%}",
        dense_rest + kept,
        {"CSR": csr, "bitmask": bm},
        ctx.gflops,
        ctx.gflops - wflops * s,
    )
    sc.speedup = ctx.speedups(
        lambda hw, d, k: sum(
            dense_time_ms(c, hw, d, k) if c.name in excl else unstructured_time_ms(c, hw, d, k, s)
            for c in costs
        )
    )
    big = max(sparse_w.values(), key=lambda c: c.weight, default=None)
    Ws = ctx.W - (dense_rest - other)
    sc.formulas.append(
        f"remaining = P x (1 - s) = {fmt_count(Ws)} x (1 - {s:g}) = {fmt_count(Ws * (1 - s))} "
        f"(+ {fmt_count(dense_rest)} not pruned) = {fmt_count(dense_rest + kept)} parameters"
    )
    if big is not None:
        nnz = round(big.weight * (1 - s))
        sc.formulas.append(
            f"CSR bytes = nnz x (value + 4-byte column index) + (rows + 1) x 4, e.g. "
            f"{big.name} fp16: {fmt_count(nnz)} x (2 + 4) + ({big.out_features} + 1) x 4 = "
            f"{fmt_count(csr_bytes(big, s, 'fp16'))} vs dense {fmt_count(big.weight * 2)}"
        )
        sc.formulas.append(
            f"bitmask bytes = nnz x value + positions / 8, e.g. {big.name} fp16: "
            f"{fmt_count(nnz)} x 2 + {fmt_count(big.weight)} / 8 = "
            f"{fmt_count(bitmask_bytes(big, s, 'fp16'))}"
        )
    for hw in ctx.hws:
        if hw.unstructured_threshold is None:
            why = "stock runtimes run dense kernels over the zeros: speedup 1.00x"
        elif s < hw.unstructured_threshold:
            why = (
                f"s = {s:g} < {hw.unstructured_threshold:g}: dense kernels run over the "
                "zeros (scattered zeros cannot be skipped by tensor cores): speedup 1.00x"
            )
        else:
            why = (
                f"s = {s:g} >= {hw.unstructured_threshold:g}: per layer the faster of dense "
                f"and a CSR kernel on CUDA cores ({hw.cuda_tflops:g} TFLOP/s, CSR bytes): "
                + ", ".join(f"batch {b} {sc.speedup[hw.name][b]:.2f}x" for b in ctx.batches)
            )
        sc.formulas.append(f"{hw.name}: {why}")
    return sc


def _nm_scenario(ctx: _Ctx) -> Scenario:
    costs, weights, P = ctx.costs, ctx.weights, ctx.P
    elig = {k: c for k, c in weights.items() if c.nm_reason is None}
    E = sum(c.weight for c in elig.values())
    by = {d: (P - E) * BYTES[d] + E * BYTES[d] * nm_bytes_ratio(d) for d in BYTES}
    eflops = sum(c.flops for c in costs if c.weight and c.nm_reason is None)
    sc = Scenario(
        "2:4", P - E // 2, {"compressed": by}, ctx.gflops - eflops / 2, ctx.gflops - eflops / 2
    )
    sc.speedup = ctx.speedups(lambda hw, d, k: sum(nm_time_ms(c, hw, d, k) for c in costs))
    inel = {k: c.nm_reason for k, c in weights.items() if c.nm_reason is not None}
    sc.formulas.append(
        f"eligible weights E = {fmt_count(E)} in {len(elig)} of {len(weights)} layers"
        + (
            f" (not: {', '.join(f'{k}: {v}' for k, v in list(inel.items())[:3])}"
            + (f" and {len(inel) - 3} more" if len(inel) > 3 else "")
            + ")"
            if inel
            else ""
        )
    )
    sc.formulas.append(
        f"remaining = P - E / 2 = {fmt_count(P)} - {fmt_count(E // 2)} = {fmt_count(P - E // 2)}"
    )
    sc.formulas.append(
        f"bytes of an eligible weight = dense x (1/2 + 1/2 x {NM_META_BITS} bits / value "
        f"bits) = dense x {nm_bytes_ratio('fp16'):.4f} (fp16), "
        f"{nm_bytes_ratio('int8'):.4f} (int8), {nm_bytes_ratio('fp32'):.4f} (fp32)"
    )
    for hw in ctx.hws:
        sc.formulas.append(_nm_formula(ctx, hw, sc))
    return sc


def _nm_formula(ctx: _Ctx, hw: Hardware, sc: Scenario) -> str:
    """Amdahl's law per batch: the eligible GEMMs' share of the time and their sparse speedup."""
    if not hw.sparse_24:
        return f"{hw.name}: no 2:4 sparse math: speedup 1.00x"
    d, parts = ctx.dtypes[hw.name], []
    elig = [c for c in ctx.costs if c.weight and c.nm_reason is None]
    for b in ctx.batches:
        k = b / ctx.b0
        t_all = sum(dense_time_ms(c, hw, d, k) for c in ctx.costs)
        t_e = sum(dense_time_ms(c, hw, d, k) for c in elig)
        t_es = sum(nm_time_ms(c, hw, d, k) for c in elig)
        f = t_e / t_all if t_all else 0.0
        keff = t_e / t_es if t_es else 1.0
        parts.append(
            f"batch {b}: f = {t_e:.4f} / {t_all:.4f} ms = {f:.3f}, k_eff = {keff:.2f}, "
            f"S = 1 / ((1 - {f:.3f}) + {f:.3f} / {keff:.2f}) = {sc.speedup[hw.name][b]:.2f}x"
        )
    return (
        f"{hw.name} (sparse factor {hw.sparse_factor:g}, GEMMs with >= "
        f"{hw.sparse_min_rows} rows): " + "; ".join(parts)
    )


def _structured(
    model, fused, args, structured, costs, hws, dtypes, batches, b0, mode, leaf_modules, kw
):
    from fxprune.api import compile as fx_compile
    from fxprune.graph import trace
    from fxprune.plan import CompileResult

    if isinstance(structured, CompileResult):
        res = structured
        what = " + ".join(p.name for p in res.passes if p.changed or p.name == "nm")
        what = f"pruned: {what}" if what else "pruned"
    else:
        if isinstance(structured, Mapping):
            opts = dict(structured)
        elif isinstance(structured, (int, float)) and 0 < structured < 1:
            opts = {"channels": float(structured)}
        else:
            raise ConfigError(
                f"structured={structured!r}: give a fraction of channels, a dict of "
                "fxprune.compile arguments, a CompileResult or None"
            )
        opts = {"mode": mode, "leaf_modules": leaf_modules, **kw, **opts}
        what = ", ".join(
            f"{k}={v!r}"
            for k, v in opts.items()
            if k not in ("mode", "leaf_modules") and v not in ((), None)
        )
        try:
            res = fx_compile(model, args, **opts)
        except FxPruneError as e:
            return Scenario(f"structured ({what})", 0, {}, 0.0, 0.0, skipped=str(e))
    P2 = sum(p.numel() for p in res.module.parameters())
    masked = {k for p in res.passes if p.name == "nm" for k in p.masks}
    if P2 == sum(p.numel() for p in model.parameters()) and not masked:
        why = "; ".join(f"{b['node']}: {b['reason']}" for b in res.barriers[:2])
        return Scenario(
            f"structured ({what})",
            P2,
            {},
            0.0,
            0.0,
            skipped="nothing was removed" + (f" (barriers: {why})" if why else ""),
        )
    pcosts = layer_costs(trace(res.module, args).gm, fused=fused)
    for c in pcosts:  # only weights the N:M pass masked run on sparse math
        if c.weight and c.param not in masked:
            c.nm_reason = "not N:M-masked"
    ms = nm_time_ms if masked else dense_time_ms
    fl = _gemm_flops(pcosts)
    sc = Scenario(f"structured ({what})", P2, {"dense": _bytes_all(P2)}, fl, fl)
    sc.speedup = _speedups(
        costs,
        lambda hw, d, k: sum(ms(c, hw, d, k) for c in pcosts),
        hws,
        dtypes,
        batches,
        b0,
    )
    P = sum(p.numel() for p in model.parameters())
    f0 = _gemm_flops(costs)
    sc.formulas.append(
        f"{what if isinstance(structured, CompileResult) else f'built with fxprune.compile({what})'}: params {fmt_count(P)} -> {fmt_count(P2)} (x{P2 / P:.3f}), "
        f"FLOPs {f0 / 1e9:.3f} -> {fl / 1e9:.3f} G (x{fl / f0 if f0 else 1:.3f}); a smaller "
        "dense model, same kernels"
        + (f"; {len(masked)} weights N:M-masked run as in the 2:4 scenario" if masked else "")
    )
    for hw in hws:
        d = dtypes[hw.name]
        parts = []
        for b in batches:
            k = b / b0
            t0 = sum(dense_time_ms(c, hw, d, k) for c in costs)
            t1 = sum(ms(c, hw, d, k) for c in pcosts)
            parts.append(f"batch {b}: {t0:.4f} / {t1:.4f} ms = {t0 / t1:.2f}x")
        sc.formulas.append(
            f"{hw.name}: S = T_dense / T_pruned (roofline sums): " + "; ".join(parts)
        )
    return sc
