"""Held-out perplexity of a real (small) causal LM under each pruning method fxprune has.

The model is the tiny Llama of ``benchmarks/_tinylm.py`` (about 10 M parameters, 8 layers, GQA
with 8 query / 4 key-value heads), trained here on the Python standard library's source
(cached after the first run, which trains it: about 15 minutes on one CPU thread). Every row
is scored on the same held-out token windows (files never seen in training, nor by the
tokenizer) and calibrated, where a method measures, on windows of the training split.

Rows: dense; N:M 2:4 and 4:8 by magnitude / Wanda / SparseGPT (every Linear of the blocks;
``lm_head`` excluded, embeddings and norms are not Linear and stay dense); 50 % unstructured
(no such pass in fxprune yet: printed as n/a); 25 % of the KV heads (with their query heads)
plus 25 % of the MLP neurons, one shot and after a short healing fine-tune of the pruned
GraphModule; 2 of the 8 blocks removed by cosine importance.

    python benchmarks/llm_quality.py
    python benchmarks/llm_quality.py --heal-dense      # + control: dense fine-tuned as long
    python benchmarks/llm_quality.py --quick           # smoke run: a 30-step model, few windows
    python benchmarks/llm_quality.py --heal-steps 300 --calib-batches 32
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
from benchmarks import _tinylm as tl  # noqa: E402

NM_ROWS = (
    ("2:4", "magnitude"),
    ("2:4", "wanda"),
    ("2:4", "sparsegpt"),
    ("4:8", "magnitude"),
    ("4:8", "wanda"),
    ("4:8", "sparsegpt"),
)


@dataclass
class Row:
    method: str
    params: str = ""
    ppl: float | None = None
    seconds: str = ""
    note: str = ""  # "n/a (...)" or "failed: ..." replaces the numbers


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="tiny LM training steps (400)")
    ap.add_argument("--calib-batches", type=int, default=None, help="calibration windows (16)")
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows (128)")
    ap.add_argument("--heal-steps", type=int, default=None, help="healing fine-tune steps (200)")
    ap.add_argument("--heal-lr", type=float, default=5e-4)
    ap.add_argument(
        "--heal-dense",
        action="store_true",
        help="control row: the dense model fine-tuned with the same heal steps and batches",
    )
    ap.add_argument("--seq", type=int, default=128, help="tokens per window")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retrain", action="store_true", help="retrain the tiny LM even if cached")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny budgets everywhere")
    a = ap.parse_args(argv)
    quick = {"steps": 30, "calib_batches": 4, "eval_windows": 16, "heal_steps": 10}
    full = {"steps": tl.Spec.steps, "calib_batches": 16, "eval_windows": 128, "heal_steps": 200}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def n_nonzero(module) -> int:
    return sum(int((p != 0).sum()) for p in module.parameters())


def fmt_m(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def measure(model, data: tl.Data, args, log=print) -> list[Row]:
    """Every row of the table for ``model`` (eval mode, ``use_cache=False``) on ``data``."""
    seq = args.seq
    gen = torch.Generator().manual_seed(2)  # calibration windows: training split only
    calib = [tl.sample(data.train, gen, 1, seq) for _ in range(args.calib_batches)]
    example = data.train[:seq].unsqueeze(0).clone()
    evals = tl.windows(data.heldout, args.eval_windows, seq)
    dense_params = n_params(model)
    rows = []

    def prune(label, params_of, **kw):
        log(f"{label} ...")
        t0 = time.perf_counter()
        try:
            res = fxprune.compile(
                model, example, calibration=calib, calibration_batches=len(calib), **kw
            )
        except Exception as e:  # a refusal or crash of fxprune is a result too
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            log(f"  failed: {reason}")
            rows.append(Row(label, note=f"failed: {reason}"))
            return None, 0.0
        secs = time.perf_counter() - t0
        ppl = tl.perplexity(res.module, evals)
        rows.append(Row(label, params_of(res.module), ppl, f"{secs:.1f}"))
        log(f"  ppl {ppl:.3f} ({secs:.1f} s)")
        return res, secs

    t0 = time.perf_counter()
    rows.append(Row("dense", fmt_m(dense_params), tl.perplexity(model, evals), "-"))
    log(f"dense: ppl {rows[0].ppl:.3f} ({time.perf_counter() - t0:.1f} s to evaluate)")

    def nonzero(m):
        nz = n_nonzero(m)
        return f"{fmt_m(nz)} nonzero ({100 * nz / dense_params:.0f} %)"

    def total(m):
        n = n_params(m)
        return f"{fmt_m(n)} ({100 * n / dense_params:.0f} %)"

    for nm, meth in NM_ROWS:
        prune(
            f"{nm} {meth}",
            nonzero,
            sparsity=nm,
            sparsity_method=meth,
            sparsity_exclude=["lm_head"],
        )
    rows.append(Row("50 % unstructured", note="n/a (no unstructured pass yet)"))

    def heal(module):
        # a pruned result.module is an eval-mode GraphModule (torch.export refuses .train());
        # Llama has no dropout, so fine-tuning it in eval mode with gradients on is the same
        return tl.train(
            module,
            data.train,
            args.heal_steps,
            batch=tl.Spec.batch,
            seq=seq,
            lr=args.heal_lr,
            warmup=max(1, args.heal_steps // 10),
            seed=1,  # the same batches for every healed row
            log_every=max(1, args.heal_steps // 4),
            label="heal",
        )

    res, secs = prune("heads 25 % + FFN 25 %, one shot", total, heads=0.25, ffn=0.25)
    heal_label = f"heads 25 % + FFN 25 %, + {args.heal_steps} heal steps"
    if res is None:
        rows.append(Row(heal_label, note="failed: the one-shot prune failed"))
    else:
        log(f"{heal_label} ...")
        t0 = time.perf_counter()
        try:
            heal(res.module)
        except Exception as e:
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            rows.append(Row(heal_label, note=f"failed: {reason}"))
        else:
            secs_heal = time.perf_counter() - t0
            ppl = tl.perplexity(res.module, evals)
            rows.append(
                Row(heal_label, total(res.module), ppl, f"{secs:.1f} + {secs_heal:.0f} heal")
            )
            log(f"  ppl {ppl:.3f} ({secs_heal:.0f} s of healing)")
    if args.heal_dense:
        label = f"control: dense + the same {args.heal_steps} fine-tune steps"
        log(f"{label} ...")
        dense_ft = copy.deepcopy(model)
        t0 = time.perf_counter()
        heal(dense_ft)
        dense_ft.eval()
        ppl = tl.perplexity(dense_ft, evals)
        rows.append(
            Row(label, fmt_m(n_params(dense_ft)), ppl, f"{time.perf_counter() - t0:.0f} train")
        )
        log(f"  ppl {ppl:.3f}")
        del dense_ft
    layers = model.config.num_hidden_layers
    k = max(1, layers // 4)
    prune(f"{k} of {layers} blocks removed (cosine)", total, blocks=k, block_importance="cosine")
    return rows


def table(rows: list[Row]) -> str:
    dense = rows[0].ppl
    out = [
        "| method | params | held-out ppl | ratio to dense | seconds to prune |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r.note:
            out.append(f"| {r.method} | {r.note} | | | |")
        else:
            ratio = "1.00" if r is rows[0] else f"{r.ppl / dense:.2f}"
            out.append(f"| {r.method} | {r.params} | {r.ppl:.2f} | {ratio} | {r.seconds} |")
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    import transformers

    print(
        "command: python benchmarks/llm_quality.py "
        + shlex.join(sys.argv[1:] if argv is None else argv)
    )
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {platform.machine()}, {args.threads} thread(s)",
        flush=True,
    )
    t_all = time.perf_counter()
    spec = tl.Spec(steps=args.steps, seq=args.seq)
    model, _, data = tl.load(spec, retrain=args.retrain, eval_windows=args.eval_windows)
    model.config.use_cache = False  # as the table was measured (compile would turn it off itself)
    print(tl.describe(data.info))
    print(f"cache: {data.info['cache']}\n", flush=True)
    rows = measure(model, data, args)
    print(
        f"\n{args.eval_windows} held-out windows of {args.seq} tokens (the same for every row); "
        f"{args.calib_batches} calibration windows of {args.seq} tokens from the training split; "
        "N:M rows: every Linear in the blocks (lm_head excluded; embeddings and norms are dense); "
        f"heal: {args.heal_steps} AdamW steps of {tl.Spec.batch}x{args.seq} tokens, lr "
        f"{args.heal_lr}, in eval mode; use_cache=False\n"
    )
    print(table(rows))
    bad = [r for r in rows if r.ppl is not None and not math.isfinite(r.ppl)]
    if bad:
        print("non-finite perplexity:", ", ".join(r.method for r in bad))
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
