"""The pricing of the scenarios the estimator reads off the dense model's traced costs (dense,
unstructured, 2:4), the :class:`PricingContext` they share, and the helpers every scenario
(structured too) uses to count bytes, FLOPs and speedups."""

from __future__ import annotations

from dataclasses import dataclass

from fxprune._util import module_matches
from fxprune.estimator.costs import (
    LayerCost,
    bitmask_bytes,
    csr_bytes,
    dense_time_ms,
    nm_bytes_ratio,
    nm_time_ms,
    unstructured_time_ms,
)
from fxprune.estimator.hardware import BYTES, NM_META_BITS, Hardware
from fxprune.estimator.report import Scenario, fmt_count, fmt_mb


def bytes_all(n: float) -> dict[str, float]:
    return {d: n * b for d, b in BYTES.items()}


def distinct_weights(costs: list[LayerCost]) -> dict[str, LayerCost]:
    """One cost row per distinct weight (a layer called twice stores its weight once)."""
    out: dict[str, LayerCost] = {}
    for c in costs:
        if c.weight and c.name not in out:
            out[c.name] = c
    return out


def gemm_flops(costs: list[LayerCost]) -> float:
    return sum(c.flops for c in costs if c.op != "other")


def speedups_over_dense(
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


@dataclass(frozen=True)
class PricingContext:
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
        return speedups_over_dense(
            self.costs, total_ms, self.hws, self.dtypes, self.batches, self.b0
        )


def dense_scenario(ctx: PricingContext) -> Scenario:
    P, W = ctx.P, ctx.W
    dense = Scenario("dense", P, {"dense": bytes_all(P)}, ctx.gflops, ctx.gflops)
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


def unstructured_scenario(ctx: PricingContext, s: float) -> Scenario:
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


def nm_scenario(ctx: PricingContext) -> Scenario:
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


def _nm_formula(ctx: PricingContext, hw: Hardware, sc: Scenario) -> str:
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
