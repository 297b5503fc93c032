"""The ``--extra`` run of ``benchmarks/gpu_semi_structured.py`` (default backend, cuSPARSELt, only).

1. Whole model (BERT-base, ViT-B/16; dense vs 2:4), each forward captured in one CUDA graph and
   replayed, so there is no Python / launch overhead; interleaved CUDA-event timing as in the
   main run.
2. Host (CPU) time per eager call at M=128, W 768x768: dense ``F.linear``, ``F.linear`` with the
   2:4 subclass weight, and ``torch._cslt_sparse_mm`` called directly; then a profiler table of
   20 ``F.linear`` calls with the 2:4 weight.
3. GEMM kernel time under a CUDA graph (20 calls per replay) for larger shapes: dense vs 2:4
   with cuSPARSELt alg_id 0 vs the alg_id found by ``torch._cslt_sparse_mm_search``.

Errors in parts 1-2 raise; part 3 reports a failed shape in its row.
Not a package: the entry script puts this directory on ``sys.path``.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from _gpu_models import (
    DTYPE,
    MODELS,
    apply_mask_,
    clone_model,
    eligible_names,
    mask_2_4,
    to_semi_structured_,
)
from _gpu_timing import (
    GRAPH_REPS,
    bench_interleaved,
    capture_graph,
    fmt,
    header,
    host_us,
    print_row,
    print_table_header,
)

# (M, out, in) of the GEMMs in part 3
ALG_SEARCH_SHAPES = [
    (4096, 3072, 768),
    (4096, 768, 3072),
    (6304, 3072, 768),
    (6304, 768, 3072),
    (16384, 3072, 768),
    (8192, 8192, 8192),
]


def run_extra(args) -> int:
    """Default backend (cuSPARSELt) only. Fails loudly on errors in parts 1-2."""
    T0 = time.perf_counter()
    if not torch.backends.cusparselt.is_available():
        raise RuntimeError("--extra needs cuSPARSELt")
    hdr = header(["cusparselt"])
    print("## Extra (--extra)\n")
    print(hdr)
    print()

    rows = _graph_model_rows(args)
    _print_graph_model_table(rows)
    _host_overhead()
    _alg_search_table()
    print(f"\ntotal --extra time: {time.perf_counter() - T0:.0f}s")
    return 0


# --------------------------------------------------------------------------
# 1. whole model, each forward captured in a CUDA graph
# --------------------------------------------------------------------------
def _graph_model_rows(args) -> list:
    """(model, batch, M, summaries) per model and batch; prints a progress line for each."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

    rows = []
    for mname, (ctor, tokens, make_input) in MODELS.items():
        torch.manual_seed(0)
        base = ctor().to("cuda", DTYPE).eval()
        names = eligible_names(base, [SparseSemiStructuredTensorCUSPARSELT])
        sp = clone_model(ctor, base)
        apply_mask_(sp, names=set(names))
        to_semi_structured_(sp, names, force_cutlass=False)
        for bs in args.batches:
            torch.manual_seed(1)
            r = _graph_model_batch(base, sp, make_input(bs, "cuda"), args)
            rows.append((mname, bs, bs * tokens, r))
            print(
                f"  [graph model] {mname} bs={bs}: dense {fmt(r['dense'])} | 2:4 {fmt(r['cusparselt'])} "
                f"(x{r['dense']['med'] / r['cusparselt']['med']:.2f})"
            )
        del base, sp
        torch.cuda.empty_cache()
    return rows


def _graph_model_batch(base, sp, inp, args) -> dict:
    with torch.no_grad():
        gd = capture_graph(lambda m=base, x=inp: m(x))
        gs = capture_graph(lambda m=sp, x=inp: m(x))
        return bench_interleaved(
            {"dense": gd.replay, "cusparselt": gs.replay},
            rounds=args.rounds,
            iters=args.iters,
            warmup=args.warmup,
        )


def _print_graph_model_table(rows) -> None:
    print(
        "\n### Whole model, each forward replayed as one CUDA graph (ms per forward, median [p10-p90])\n"
    )
    print_table_header(
        [
            "model",
            "batch",
            "tokens M",
            "dense fp16 (graph)",
            "2:4 cusparselt (graph)",
            "speedup",
        ]
    )
    for mname, bs, M, r in rows:
        speedup = r["dense"]["med"] / r["cusparselt"]["med"]
        print_row(
            [mname, str(bs), str(M), fmt(r["dense"]), fmt(r["cusparselt"]), f"{speedup:.2f}x"]
        )


# --------------------------------------------------------------------------
# 2. host-side cost of one eager F.linear call (M=128, W 768x768)
# --------------------------------------------------------------------------
def _host_overhead() -> None:
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(2)
    x = torch.randn(128, 768, device="cuda", dtype=DTYPE)
    w = torch.randn(768, 768, device="cuda", dtype=DTYPE) * 0.02
    b = torch.randn(768, device="cuda", dtype=DTYPE) * 0.02
    wm = w * mask_2_4(w)
    ws = to_sparse_semi_structured(wm)
    print(
        "\n### Host (CPU) time per eager call, M=128, W 768x768 (microseconds, mean of 200 calls, no sync)\n"
    )
    print_table_header(["call", "host us/call"])
    with torch.no_grad():
        cands = {
            "F.linear(x, W_dense, b)": lambda: F.linear(x, w, b),
            "F.linear(x, W_2:4 subclass, b)": lambda: F.linear(x, ws, b),
            "torch._cslt_sparse_mm(packed, x.t(), bias=b)": lambda: torch._cslt_sparse_mm(
                ws.packed, x.t(), bias=b
            ),
            "torch._cslt_sparse_mm(packed, x.t(), bias=b, transpose_result=True)": lambda: (
                torch._cslt_sparse_mm(ws.packed, x.t(), bias=b, transpose_result=True)
            ),
        }
        for k, f in cands.items():
            try:
                print(f"| `{k}` | {host_us(f):.1f} |")
            except Exception as e:  # noqa: BLE001
                print(f"| `{k}` | error: {type(e).__name__}: {str(e).splitlines()[0][:120]} |")
        sys.stdout.flush()
        _profile_linear(x, ws, b)
    sys.stdout.flush()


def _profile_linear(x, ws, b) -> None:
    """Profiler table of 20 F.linear(x, W_2:4, b) calls; a failure is printed, not raised."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                F.linear(x, ws, b)
            torch.cuda.synchronize()
        print("\nprofiler, 20 x F.linear(x, W_2:4, b), sorted by self CPU time:\n```")
        print(
            prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=45
            )
        )
        print("```")
    except Exception as e:  # noqa: BLE001
        print(f"profiler failed: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------
# 3. kernel time (CUDA graph) for larger GEMMs, cuSPARSELt alg 0 vs searched alg
# --------------------------------------------------------------------------
def _alg_search_table() -> None:
    print(
        "\n### GEMM kernel time under CUDA graph: dense vs 2:4 alg_id 0 vs alg_id from torch._cslt_sparse_mm_search\n"
    )
    print_table_header(
        [
            "M",
            "W [out,in]",
            "dense ms",
            "dense TFLOP/s",
            "2:4 alg0 ms",
            "speedup alg0",
            "searched alg_id",
            "2:4 searched ms",
            "speedup searched",
        ]
    )
    for M, o, i in ALG_SEARCH_SHAPES:
        try:
            print(_alg_search_row(M, o, i))
        except Exception as e:  # noqa: BLE001
            print(
                f"| {M} | {o}x{i} | error: {type(e).__name__}: {str(e).splitlines()[0][:150]} | | | | | | |"
            )
        sys.stdout.flush()


def _alg_search_row(M: int, o: int, i: int) -> str:
    from torch.sparse import to_sparse_semi_structured

    x = torch.randn(M, i, device="cuda", dtype=DTYPE)
    w = torch.randn(o, i, device="cuda", dtype=DTYPE) * 0.02
    b = torch.randn(o, device="cuda", dtype=DTYPE) * 0.02
    wm = w * mask_2_4(w)
    ws0 = to_sparse_semi_structured(wm)
    with torch.no_grad():
        aid = int(torch._cslt_sparse_mm_search(ws0.packed, x.t(), bias=b))
        try:
            ws1 = to_sparse_semi_structured(wm, alg_id=aid)
        except TypeError:
            ws1 = to_sparse_semi_structured(wm)
            ws1.alg_id_cusparselt = aid
        fns = {
            "dense": lambda x=x, w=w, b=b: F.linear(x, w, b),
            "a0": lambda x=x, w=ws0, b=b: F.linear(x, w, b),
            "as": lambda x=x, w=ws1, b=b: F.linear(x, w, b),
        }
        gs = {k: capture_graph(f, reps=GRAPH_REPS) for k, f in fns.items()}
        r = bench_interleaved({k: g.replay for k, g in gs.items()}, rounds=10, iters=5, warmup=3)
    md, m0, m1 = (r[k]["med"] / GRAPH_REPS for k in ("dense", "a0", "as"))
    tf = 2 * M * o * i / (md * 1e-3) / 1e12
    return f"| {M} | {o}x{i} | {md:.4f} | {tf:.0f} | {m0:.4f} | {md / m0:.2f}x | {aid} | {m1:.4f} | {md / m1:.2f}x |"
