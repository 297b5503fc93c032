"""The forward timing of the latency verifier: both models prepared by the backend's runner,
warmed up, then timed call by call in rounds of alternating order per batch size, each row
checked against PyTorch eager (``parity``). ``fxprune.verify.latency`` runs it for forward
backends (``fxprune.verify.decode`` times generation instead) and judges the noise after."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxprune._util import eval_mode
from fxprune.verify.latency_report import LatencyRow, median_p10_p90, spread, verdict
from fxprune.verify.latency_runners import RunContext


def repeat_batch(args: tuple, b: int) -> tuple:
    """The example inputs with batch size ``b`` (rows repeated, or cut)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.ndim:
            reps = -(-b // a.shape[0])
            out.append(a.repeat(reps, *([1] * (a.ndim - 1)))[:b].contiguous())
        else:
            out.append(a)
    return tuple(out)


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _time(call: Callable[[object], object], prepared, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call(prepared)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def rounds(runners: dict, ready: dict, repeats: int, bar, timer=_time) -> dict[str, list[list]]:
    """``repeats`` timed calls per model in about ten rounds of alternating order (dense first,
    then pruned first, ...): the samples of each round, per model. ``timer(call, prepared, n)``
    returns ``n`` samples of ``call(prepared)`` (default: milliseconds of each call)."""
    per_round = max(1, repeats // 10)
    out: dict[str, list[list]] = {"dense": [], "pruned": []}
    for k in range(-(-repeats // per_round)):
        order = ("dense", "pruned") if k % 2 == 0 else ("pruned", "dense")
        for name in order:
            out[name].append(timer(runners[name].run, ready[name], per_round))
            bar.update(per_round)
    return out


def _row(b: int, timed: dict, mac_ratio: float, parity: float, other, secs: float) -> LatencyRow:
    """One batch size's row from its per-round samples (noise is judged later, by the
    verifier)."""
    flat = {k: [x for r in v for x in r] for k, v in timed.items()}
    d, p = median_p10_p90(flat["dense"]), median_p10_p90(flat["pruned"])
    speedup = d[0] / p[0] if p[0] else float("inf")
    eff = speedup * mac_ratio
    med = {k: [statistics.median(r) for r in v] for k, v in timed.items()}
    per_round = [a / z for a, z in zip(med["dense"], med["pruned"], strict=True) if z]
    lo, hi = np.percentile(per_round, [10, 90]) if per_round else (speedup, speedup)
    row = LatencyRow(b, *d, *p, speedup, mac_ratio, eff, parity, verdict(speedup, eff))
    row.speedup_p10, row.speedup_p90 = float(lo), float(hi)
    row.round_spread = max(spread(med["dense"]), spread(med["pruned"]))
    row.other_cpu, row.timed_s = other, secs
    return row


def _numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t)


def _parity(runner, prepared, module, args) -> float:
    """Max relative error of the backend's output against PyTorch eager fp32 on the CPU."""
    got = runner.run(prepared)
    got = [_numpy(t) for t in (got if isinstance(got, list) else _tensors(got))]
    with torch.no_grad(), eval_mode(module):
        ref = [t.detach().double().numpy() for t in _tensors(module(*args))]
    err = 0.0
    for r, g in zip(ref, got, strict=False):
        scale = float(np.abs(r).max()) if r.size else 0.0
        diff = float(np.abs(r - g.astype(np.float64)).max()) if r.size else 0.0
        err = max(err, diff / scale if scale else diff)
    return err


def forward_rows(be, dense, pruned, args, rep, batch_sizes, wd, mac_ratio, monitor, bar):
    """One row per batch size: the forward of both models, timed in alternating rounds."""
    module = getattr(pruned, "module", pruned)
    masks = getattr(pruned, "nm_masks", None) or {}
    top, threads = max(batch_sizes), rep.threads
    runners = {
        "dense": be.runner(dense, args, RunContext(threads, wd, "dense", {}, top)),
        "pruned": be.runner(module, args, RunContext(threads, wd, "pruned", masks, top)),
    }
    for r in runners.values():
        rep.notes += r.notes
    for b in batch_sizes:
        xb = repeat_batch(args, b)
        ready = {name: r.prepare(xb) for name, r in runners.items()}
        for name, r in runners.items():
            for _ in range(rep.warmup):
                r.run(ready[name])
                bar.update()
        monitor.start()
        timed = rounds(runners, ready, rep.repeats, bar)
        other, secs = monitor.stop()
        parity = _parity(runners["pruned"], ready["pruned"], module, xb)
        rep.rows.append(_row(b, timed, mac_ratio, parity, other, secs))
