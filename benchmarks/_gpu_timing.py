"""Timing, statistics and formatting helpers for ``benchmarks/gpu_semi_structured.py``.

* ``bench_interleaved``: CUDA-event timing of several variants, interleaved in rounds (order
  rotated each round) so clock/thermal drift hits all of them; median and p10/p90 per call.
* ``capture_graph``: warm up on a side stream, then capture calls into a CUDA graph (kernel
  time without Python / launch overhead when replayed).
* ``host_us``: host (CPU) time per eager call, no sync inside the loop.
* ``micro_linear``: the Linear-only microbenchmark (dense vs 2:4 ``F.linear`` per distinct
  weight shape, eager and, where capture works, under a CUDA graph).
* ``header`` / ``fmt`` / ``print_table_header`` / ``print_row``: the printed environment
  lines and markdown table pieces; ``print_*_table``: the main run's markdown tables (whole
  model eager, Linear-only vs Amdahl, per-shape GEMMs, torch.compile).

Not a package: the entry script puts this directory on ``sys.path``.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from _gpu_models import DTYPE, cutlass_forced, mask_2_4

GRAPH_REPS = 20  # F.linear calls per captured CUDA graph in the microbenchmarks


# --------------------------------------------------------------------------
# Statistics and formatting
# --------------------------------------------------------------------------
def pct(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(xs):
    return {"med": statistics.median(xs), "p10": pct(xs, 0.10), "p90": pct(xs, 0.90), "n": len(xs)}


def per_call(summary: dict, reps: int) -> dict:
    """A summary of `reps` calls per sample turned into one per call (the count `n` unchanged)."""
    return {k: (v / reps if k != "n" else v) for k, v in summary.items()}


def fmt(s):
    return f"{s['med']:.3f} [{s['p10']:.3f}-{s['p90']:.3f}]"


def print_row(cells) -> None:
    print("| " + " | ".join(cells) + " |")


def print_table_header(cols) -> None:
    print_row(cols)
    print("|" + "---|" * len(cols))


def header(backends):
    p = torch.cuda.get_device_properties(0)
    cslt = "n/a"
    try:
        if torch.backends.cusparselt.is_available():
            cslt = str(torch.backends.cusparselt.version())
    except Exception:  # noqa: BLE001
        pass
    lines = [
        f"- GPU: {torch.cuda.get_device_name(0)} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB)",
        f"- torch: {torch.__version__}; CUDA (torch.version.cuda): {torch.version.cuda}; cuSPARSELt: {cslt}",
        f"- dtype: {DTYPE} (weights and activations); mode: eager, torch.no_grad(); default 2:4 backend: {backends[0]}",
        f"- 2:4 backends measured: {', '.join(backends)}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------
def bench_interleaved(fns: dict, rounds: int, iters: int, warmup: int, inner: int = 1) -> dict:
    """fns: name -> zero-arg callable. Each round runs every fn `iters` times,
    each timed with CUDA events around `inner` back-to-back calls; the order
    of fns rotates each round. Returns name -> summary (ms per call)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    torch.cuda.synchronize()
    samples = {k: [] for k in fns}
    names = list(fns)
    pool = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(iters * len(fns))
    ]
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        evs = []
        for k in order:
            f = fns[k]
            for _ in range(iters):
                s, e = pool[len(evs)]
                s.record()
                for _ in range(inner):
                    f()
                e.record()
                evs.append((k, s, e))
        torch.cuda.synchronize()
        for k, s, e in evs:
            samples[k].append(s.elapsed_time(e) / inner)
    return {k: summarize(v) for k, v in samples.items()}


def capture_graph(f, reps: int = 1):
    """Run `f` 3 times on a side stream, then capture `reps` calls of it into a CUDA graph."""
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        for _ in range(3):
            f()
    torch.cuda.current_stream().wait_stream(st)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            f()
    return g


def host_us(f, n: int = 200) -> float:
    """Host (CPU) time per call, no sync inside the loop."""
    for _ in range(10):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


# --------------------------------------------------------------------------
# Linear-only microbenchmark
# --------------------------------------------------------------------------
def _linear_fns(o: int, i: int, M: int, backends: list) -> dict:
    """Random x[M, i], W[o, i], bias[o]: variant -> zero-arg F.linear call (dense, 2:4 per backend)."""
    from torch.sparse import to_sparse_semi_structured

    x = torch.randn(M, i, device="cuda", dtype=DTYPE)
    w = torch.randn(o, i, device="cuda", dtype=DTYPE) * 0.02
    bias = torch.randn(o, device="cuda", dtype=DTYPE) * 0.02
    wm = w * mask_2_4(w)
    ws = {}
    for b in backends:
        with cutlass_forced(b == "cutlass"):
            ws[b] = to_sparse_semi_structured(wm)
    fns = {"dense": (lambda x=x, w=w, bias=bias: F.linear(x, w, bias))}
    for b in backends:
        fns[b] = lambda x=x, w=ws[b], bias=bias: F.linear(x, w, bias)
    return fns


def _graph_linear(fns: dict, rounds: int) -> dict | None:
    """CUDA-graph timing (GRAPH_REPS calls per replay) of `fns`; None (with a note) if capture fails."""
    try:
        gfns = {k: capture_graph(f, reps=GRAPH_REPS).replay for k, f in fns.items()}
        r_g = bench_interleaved(gfns, rounds=rounds, iters=5, warmup=3, inner=1)
        return {k: per_call(v, GRAPH_REPS) for k, v in r_g.items()}
    except Exception as e:  # noqa: BLE001
        print(
            f"  [note] CUDA-graph capture of F.linear failed ({type(e).__name__}: {e}); graph column n/a"
        )
        return None


def micro_linear(shapes: dict, M: int, backends: list, rounds: int, graph_ok: bool) -> dict:
    """Per distinct (out, in) Linear shape: dense vs 2:4 F.linear at M rows.
    Returns {'eager': {variant: total_ms}, 'graph': {...} or None, 'per_shape': [...]};
    'graph' is None when `graph_ok` is false or a capture failed (later shapes then skip it)."""
    tot_eager = {"dense": 0.0, **{b: 0.0 for b in backends}}
    tot_graph = {"dense": 0.0, **{b: 0.0 for b in backends}}
    per_shape = []
    for (o, i), cnt in shapes.items():
        fns = _linear_fns(o, i, M, backends)
        with torch.no_grad():
            r_e = bench_interleaved(fns, rounds=rounds, iters=5, warmup=10, inner=20)
            # CUDA-graph variant: kernel time without Python / launch overhead.
            r_g = _graph_linear(fns, rounds) if graph_ok else None
            graph_ok = graph_ok and r_g is not None
        for k in tot_eager:
            tot_eager[k] += cnt * r_e[k]["med"]
            if r_g is not None:
                tot_graph[k] += cnt * r_g[k]["med"]
        per_shape.append({"shape": (o, i), "count": cnt, "eager": r_e, "graph": r_g})
    return {"eager": tot_eager, "graph": tot_graph if graph_ok else None, "per_shape": per_shape}


# --------------------------------------------------------------------------
# Markdown tables of the main run
# --------------------------------------------------------------------------
def print_whole_model_table(results: list, backends: list) -> None:
    print("### Whole model, eager (ms per forward, median [p10-p90])\n")
    cols = ["model", "batch", "tokens M", "dense fp16"]
    for b in backends:
        cols += [f"2:4 {b}", f"speedup {b}"]
    cols += [f"max abs diff {b} (vs masked dense; max abs out)" for b in backends]
    print_table_header(cols)
    for row in results:
        r = row["r"]
        cells = [row["model"], str(row["bs"]), str(row["M"]), fmt(r["dense"])]
        for b in backends:
            cells += [fmt(r[b]), f"{r['dense']['med'] / r[b]['med']:.2f}x"]
        cells += [f"{row['diff'][b]:.3g} ({row['ref_scale']:.3g})" for b in backends]
        print_row(cells)


def print_amdahl_table(results: list, db: str) -> None:
    print(f"\n### Linear-only microbenchmark vs whole model ({db}; Amdahl)\n")
    print(
        "Linear-only = sum over the model's converted Linear layers of F.linear(x[M,in], W[out,in], b) median time "
        "(each distinct shape timed, times its count). f = linear-only dense eager time / whole-model dense time. "
        "Amdahl prediction = 1 / ((1 - f) + f / s_linear_eager).\n"
    )
    cols = [
        "model",
        "batch",
        "M",
        "linear dense ms (eager)",
        "linear 2:4 ms (eager)",
        "s_linear eager",
        "s_linear CUDA graph",
        "f",
        "Amdahl predicted",
        "measured whole model",
    ]
    print_table_header(cols)
    for row in results:
        me, mg = row["micro"]["eager"], row["micro"]["graph"]
        s_lin = me["dense"] / me[db]
        s_g = f"{mg['dense'] / mg[db]:.2f}x" if mg else "n/a"
        f = me["dense"] / row["r"]["dense"]["med"]
        amd = 1.0 / ((1 - f) + f / s_lin) if f < 1 else float("nan")
        meas = row["r"]["dense"]["med"] / row["r"][db]["med"]
        print(
            f"| {row['model']} | {row['bs']} | {row['M']} | {me['dense']:.3f} | {me[db]:.3f} | {s_lin:.2f}x | {s_g} | "
            f"{f:.2f} | {amd:.2f}x | {meas:.2f}x |"
        )


def print_per_shape_table(results: list, backends: list, db: str) -> None:
    print("\n### Per-shape Linear GEMMs (ms per call, median [p10-p90]; eager / CUDA graph)\n")
    with_cutlass = "cutlass" in backends and db != "cutlass"
    cols = [
        "model",
        "M",
        "W [out,in]",
        "count/model",
        "dense eager",
        f"2:4 {db} eager",
        "speedup eager",
        "dense graph",
        f"2:4 {db} graph",
        "speedup graph",
    ]
    if with_cutlass:
        cols += ["2:4 cutlass graph", "speedup cutlass graph"]
    print_table_header(cols)
    for row in results:
        for ps in row["micro"]["per_shape"]:
            e, g = ps["eager"], ps["graph"]
            cells = [
                row["model"].split(" ")[0],
                str(row["M"]),
                f"{ps['shape'][0]}x{ps['shape'][1]}",
                str(ps["count"]),
                fmt(e["dense"]),
                fmt(e[db]),
                f"{e['dense']['med'] / e[db]['med']:.2f}x",
            ]
            if g:
                cells += [fmt(g["dense"]), fmt(g[db]), f"{g['dense']['med'] / g[db]['med']:.2f}x"]
            else:
                cells += ["n/a"] * 3
            if with_cutlass:
                cells += (
                    [fmt(g["cutlass"]), f"{g['dense']['med'] / g['cutlass']['med']:.2f}x"]
                    if g
                    else ["n/a"] * 2
                )
            print_row(cells)


def print_compile_table(rows: list, db: str) -> None:
    if not rows:
        return
    print("\n### torch.compile (default mode), whole model (ms per forward, median [p10-p90])\n")
    print_table_header(["model", "batch", "dense compiled", f"2:4 {db} compiled", "speedup"])
    for row in rows:
        r = row["r"]
        print_row(
            [
                row["model"],
                str(row["bs"]),
                fmt(r["dense"]),
                fmt(r[db]),
                f"{r['dense']['med'] / r[db]['med']:.2f}x",
            ]
        )
