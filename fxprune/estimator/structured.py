"""The structured scenario: build the pruned model (``fxprune.compile`` on a copy, or an existing
:class:`fxprune.CompileResult`) and cost it with the same roofline as the dense one."""

from __future__ import annotations

from collections.abc import Mapping

from fxprune.errors import ConfigError, FxPruneError
from fxprune.estimator.costs import dense_time_ms, layer_costs, nm_time_ms
from fxprune.estimator.report import Scenario, fmt_count
from fxprune.estimator.scenarios import bytes_all, gemm_flops, speedups_over_dense


def structured_scenario(
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
    fl = gemm_flops(pcosts)
    sc = Scenario(f"structured ({what})", P2, {"dense": bytes_all(P2)}, fl, fl)
    sc.speedup = speedups_over_dense(
        costs,
        lambda hw, d, k: sum(ms(c, hw, d, k) for c in pcosts),
        hws,
        dtypes,
        batches,
        b0,
    )
    P = sum(p.numel() for p in model.parameters())
    f0 = gemm_flops(costs)
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
