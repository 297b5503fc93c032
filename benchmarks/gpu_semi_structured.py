#!/usr/bin/env python3
"""GPU benchmark: dense fp16 vs 2:4 semi-structured sparse fp16 Linear layers.

Self-contained (only ``torch``): builds a BERT-base-sized encoder and a
ViT-B/16-sized model from plain torch modules with random weights, applies a
magnitude 2:4 mask along the input-feature axis of every eligible
``nn.Linear`` weight and replaces it with
``torch.sparse.to_sparse_semi_structured(w)``.

Measured per model and batch size (1, 8, 32):

* whole-model forward latency, dense (original unpruned weights) vs 2:4 sparse
  with the default backend (cuSPARSELt when available) and, optionally, the
  CUTLASS backend (``SparseSemiStructuredTensor._FORCE_CUTLASS``);
  variants are interleaved in rounds so clock/thermal drift hits all of them;
  median and p10/p90 over all timed iterations (CUDA events);
* a Linear-only microbenchmark (every distinct Linear shape of the model at
  M = batch * tokens, weighted by how often it occurs), eager and, where
  capture works, under a CUDA graph (kernel time without launch overhead),
  plus the Amdahl prediction of whole-model speedup from it;
* numerics: max abs diff between the masked-dense fp16 model and the sparse
  model outputs;
* optionally ``torch.compile`` of dense and sparse models (time-boxed).

Without CUDA the script prints a message and exits 0 (``--cpu-smoke`` runs a
small CPU check of the model/mask code). On a GPU any error in the default
path raises (non-zero exit).

Usage::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_semi_structured.py
"""

# Layout (plain files, not a package): _gpu_models.py holds the models and the 2:4 mask /
# conversion helpers; _gpu_timing.py the timing, statistics and formatting helpers, the
# Linear-only microbenchmark and the markdown tables; _gpu_extra.py the --extra run. This file
# parses the flags, runs the probes and the main benchmark and prints its tables.

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the helpers next to this file must import however it is started
    sys.path.insert(0, _HERE)

from _gpu_extra import run_extra  # noqa: E402
from _gpu_models import (  # noqa: E402
    DTYPE,
    MODELS,
    apply_mask_,
    check_2_4,
    clone_model,
    cpu_smoke,
    eligible_names,
    linear_shapes,
    mask_2_4,
    to_semi_structured_,
)
from _gpu_timing import (  # noqa: E402
    bench_interleaved,
    capture_graph,
    fmt,
    header,
    micro_linear,
    print_amdahl_table,
    print_compile_table,
    print_per_shape_table,
    print_whole_model_table,
)


@dataclass
class Variants:
    """One model: the dense original, the masked-dense copy and the 2:4 copy per backend."""

    name: str
    tokens: int
    make_input: Callable[[int, str], torch.Tensor]
    base: nn.Module
    masked: nn.Module
    sparse: dict
    shapes: dict  # (out, in) -> count over the converted Linear layers


# --------------------------------------------------------------------------
# Main benchmark
# --------------------------------------------------------------------------
def run_gpu(args) -> int:
    T0 = time.perf_counter()
    default_backend, backend_cls = _setup_backends()
    backends, graph_ok = _probe_optional(args, default_backend)

    hdr = header(backends)
    print("## Environment\n")
    print(hdr)
    print(
        f"- timing: CUDA events, {args.warmup} warm-up iters per variant, {args.rounds} rounds x {args.iters} iters "
        f"per variant (variants interleaved, order rotated each round); ms per forward: median [p10-p90]"
    )
    print()
    sys.stdout.flush()

    results = []
    kept = {}
    for mname, (ctor, tokens, make_input) in MODELS.items():
        classes = {b: backend_cls[b] for b in backends}
        v = _build_variants(mname, ctor, tokens, make_input, classes)
        for bs in args.batches:
            row = _measure_batch(v, bs, backends, args, graph_ok)
            graph_ok = row["micro"]["graph"] is not None  # a failed capture disables it from here
            results.append(row)
            _print_batch(row, backends)
        kept[mname] = (v.base, v.sparse[default_backend], v.make_input)
        del v
        torch.cuda.empty_cache()

    print("\n## Results (markdown)\n")
    print(hdr)
    print()
    print_whole_model_table(results, backends)
    print_amdahl_table(results, default_backend)
    print_per_shape_table(results, backends, default_backend)

    # optional torch.compile (time-boxed; after the eager tables so they survive)
    compile_rows = _run_compile(kept, default_backend, args)
    print_compile_table(compile_rows, default_backend)
    print()
    print(f"total script time: {time.perf_counter() - T0:.0f}s")
    return 0


def _setup_backends() -> tuple[str, dict]:
    """Default 2:4 backend name and backend name -> tensor subclass; raises below sm80."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    torch.backends.cuda.matmul.allow_tf32 = False
    cap = torch.cuda.get_device_capability(0)
    if cap < (8, 0):
        raise RuntimeError(
            f"2:4 semi-structured sparsity needs compute capability >= 8.0, got {cap}"
        )
    default_backend = "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    backend_cls = {
        "cusparselt": SparseSemiStructuredTensorCUSPARSELT,
        "cutlass": SparseSemiStructuredTensorCUTLASS,
    }
    return default_backend, backend_cls


def _probe_optional(args, default_backend: str) -> tuple[list, bool]:
    """Probe the optional parts (CUTLASS backend when it is not the default; CUDA-graph
    capture of a 2:4 F.linear) in a subprocess, so a sticky CUDA error there cannot poison
    this process's context. Returns (backends to measure, whether graph capture works)."""
    backends = [default_backend]
    graph_ok = True
    for what in (["cutlass"] if args.cutlass and default_backend != "cutlass" else []) + ["graph"]:
        ok = _run_probe(what, default_backend)
        if what == "cutlass" and ok:
            backends.append("cutlass")
        if what == "graph":
            graph_ok = ok
    return backends, graph_ok


def _run_probe(what: str, default_backend: str) -> bool:
    pr = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--probe",
            what,
            "--probe-backend",
            default_backend,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    ok = pr.returncode == 0 and "PROBE OK" in pr.stdout
    print(
        f"[probe {what}] {'OK' if ok else 'FAILED'}: {pr.stdout.strip().splitlines()[-1] if pr.stdout.strip() else ''}"
    )
    if not ok:
        print("!" * 70)
        print(f"[probe {what}] optional part disabled; subprocess stderr tail:")
        print("\n".join(pr.stderr.strip().splitlines()[-15:]))
        print("!" * 70)
    return ok


def _build_variants(mname, ctor, tokens, make_input, backend_classes: dict) -> Variants:
    """Dense, masked-dense and 2:4 copies (one per backend name -> subclass in `backend_classes`)
    of one model; prints its summary line."""
    torch.manual_seed(0)
    base = ctor().to("cuda", DTYPE).eval()
    # Names of Linear layers eligible for 2:4 under every measured backend.
    all_lin = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    mods = dict(base.named_modules())
    names = eligible_names(base, list(backend_classes.values()))
    skipped = sorted(set(all_lin) - set(names))
    lin_params = sum(mods[n].weight.numel() for n in names)
    tot_params = sum(p.numel() for p in base.parameters())

    masked = clone_model(ctor, base)
    apply_mask_(masked, names=set(names))
    mm = dict(masked.named_modules())
    assert all(check_2_4(mm[n].weight) for n in names), "mask is not 2:4"

    sparse = {}
    for b in backend_classes:
        sm = clone_model(ctor, masked)
        to_semi_structured_(sm, names, force_cutlass=(b == "cutlass"))
        sparse[b] = sm
    print(
        f"### {mname}: {len(names)}/{len(all_lin)} Linear layers converted to 2:4 "
        f"({lin_params / 1e6:.1f}M of {tot_params / 1e6:.1f}M params); left dense: {skipped or 'none'}"
    )
    sys.stdout.flush()
    return Variants(mname, tokens, make_input, base, masked, sparse, linear_shapes(base, names))


def _measure_batch(v: Variants, bs: int, backends: list, args, graph_ok: bool) -> dict:
    """Numerics, interleaved whole-model timing and the Linear-only microbenchmark at one batch."""
    torch.manual_seed(1)
    inp = v.make_input(bs, "cuda")
    M = bs * v.tokens
    with torch.no_grad():
        ref = v.masked(inp).float()
        diffs = {}
        for b in backends:
            out = v.sparse[b](inp).float()
            if not torch.isfinite(out).all():
                raise RuntimeError(f"{v.name} bs={bs} {b}: non-finite output")
            diffs[b] = (out - ref).abs().max().item()
        ref_scale = ref.abs().max().item()
        fns = {"dense": (lambda m=v.base, x=inp: m(x))}
        for b in backends:
            fns[b] = lambda m=v.sparse[b], x=inp: m(x)
        r = bench_interleaved(fns, rounds=args.rounds, iters=args.iters, warmup=args.warmup)
    micro = micro_linear(v.shapes, M, backends, args.micro_rounds, graph_ok)
    return {
        "model": v.name,
        "bs": bs,
        "M": M,
        "r": r,
        "diff": diffs,
        "ref_scale": ref_scale,
        "micro": micro,
    }


def _print_batch(row: dict, backends: list) -> None:
    r, diffs, micro = row["r"], row["diff"], row["micro"]
    line = f"  bs={row['bs']:>2} M={row['M']:>5}: dense {fmt(r['dense'])} ms"
    for b in backends:
        line += f" | {b} {fmt(r[b])} ms (x{r['dense']['med'] / r[b]['med']:.2f}, maxdiff {diffs[b]:.3g})"
    print(line)
    le = micro["eager"]
    line = f"           linear-only eager: dense {le['dense']:.3f} ms"
    for b in backends:
        line += f" | {b} {le[b]:.3f} ms (x{le['dense'] / le[b]:.2f})"
    if micro["graph"]:
        lg = micro["graph"]
        line += f" || graph: dense {lg['dense']:.3f}"
        for b in backends:
            line += f" | {b} {lg[b]:.3f} (x{lg['dense'] / lg[b]:.2f})"
    print(line)
    sys.stdout.flush()


# --------------------------------------------------------------------------
# Optional torch.compile part
# --------------------------------------------------------------------------
def _run_compile(kept: dict, db: str, args) -> list:
    """Dense vs 2:4 under torch.compile per model and batch, until args.compile_budget s are spent."""
    rows = []
    if not args.compile_budget > 0:
        return rows
    t_compile_start = time.perf_counter()
    for mname, (base, sp, make_input) in kept.items():
        variants = {"dense": base, db: sp}
        for bs in args.compile_batches:
            if time.perf_counter() - t_compile_start > args.compile_budget:
                print(
                    f"  [compile] budget of {args.compile_budget}s spent; skipping {mname} bs={bs}"
                )
                continue
            torch.manual_seed(1)
            inp = make_input(bs, "cuda")
            rc = _compile_one(mname, bs, variants, inp, db, args)
            if rc is not None:
                rows.append({"model": mname, "bs": bs, "r": rc})
            sys.stdout.flush()
    return rows


def _compile_one(mname: str, bs: int, variants: dict, inp, db: str, args) -> dict | None:
    """Compile every variant, time them interleaved; None (after printing why) on any error."""
    cf = {}
    try:
        torch._dynamo.reset()
        with torch.no_grad():
            for k, m in variants.items():
                t0 = time.perf_counter()
                c = torch.compile(m)
                c(inp)
                torch.cuda.synchronize()
                print(
                    f"  [compile] {mname} bs={bs} {k}: compiled in {time.perf_counter() - t0:.1f}s"
                )
                cf[k] = lambda c=c, x=inp: c(x)
            rc = bench_interleaved(
                cf, rounds=max(4, args.rounds // 2), iters=args.iters, warmup=args.warmup
            )
        print(
            f"  [compile] bs={bs}: dense {fmt(rc['dense'])} | {db} {fmt(rc[db])} "
            f"(x{rc['dense']['med'] / rc[db]['med']:.2f})"
        )
        return rc
    except Exception as e:  # noqa: BLE001  (optional part: report, don't fail)
        print(
            f"  [compile] {mname} bs={bs} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        )
        return None


# --------------------------------------------------------------------------
# Probe subprocess, CLI
# --------------------------------------------------------------------------
def probe(what: str, backend: str) -> int:
    """Run in a subprocess by run_gpu(); raises on failure."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = (what == "cutlass") or backend == "cutlass"
    w = torch.randn(768, 768, device="cuda", dtype=DTYPE)
    w = w * mask_2_4(w)
    b = torch.randn(768, device="cuda", dtype=DTYPE)
    ws = to_sparse_semi_structured(w)
    x = torch.randn(200, 768, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        d = (F.linear(x, ws, b) - F.linear(x, w, b)).abs().max().item()
        if what == "graph":
            ys = []  # 3 warm-up outputs, then the captured one (kept: no frees during capture)
            g = capture_graph(lambda: ys.append(F.linear(x, ws, b)))
            x.normal_()
            g.replay()
            torch.cuda.synchronize()
            d = max(d, (ys[-1] - F.linear(x, w, b)).abs().max().item())
    torch.cuda.synchronize()
    scale = F.linear(x, w, b).abs().max().item()
    if not d <= 1e-2 * scale:
        raise RuntimeError(f"probe {what}: max abs diff {d} vs output scale {scale}")
    print(
        f"PROBE OK {what} ({type(ws).__name__}, max abs diff vs dense on 200x768x768: {d:.3g}, max abs out {scale:.3g})"
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--micro-rounds", type=int, default=20)
    ap.add_argument(
        "--no-cutlass",
        dest="cutlass",
        action="store_false",
        help="skip the optional CUTLASS backend",
    )
    ap.add_argument(
        "--compile-budget",
        type=float,
        default=150.0,
        help="seconds for torch.compile part (0 = skip)",
    )
    ap.add_argument("--compile-batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="without CUDA: run a small CPU check of model/mask code",
    )
    ap.add_argument(
        "--extra",
        action="store_true",
        help="instead of the main benchmark: whole model under CUDA graphs, host overhead per call, "
        "cuSPARSELt alg search on larger GEMMs (cuSPARSELt only)",
    )
    ap.add_argument("--probe", choices=["cutlass", "graph"], help=argparse.SUPPRESS)
    ap.add_argument("--probe-backend", default="cusparselt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return probe(args.probe, args.probe_backend)

    if not torch.cuda.is_available():
        print(
            "No CUDA device available: 2:4 semi-structured sparse kernels need an NVIDIA GPU (sm80+). Skipping benchmark."
        )
        if args.cpu_smoke:
            return cpu_smoke()
        return 0
    return run_extra(args) if args.extra else run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
