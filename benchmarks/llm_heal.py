"""Healing a structurally pruned real LLM by distillation (fxprune.heal), against its controls.

SmolLM2-135M-Instruct (benchmarks/_smollm2.py) on real text (benchmarks/_realtext.py: Python's
documentation as prose, its standard library as code, split by file). Rows, each trained for the
same steps on the same batches (windows of the calibration files) and evaluated on held-out
windows every ``--eval-every`` steps:

- ``dense + lm``: the control. The dense model fine-tuned with the next-token loss for the same
  steps: a heal that only beats an untrained dense model on this text proves nothing.
- for each structured budget (heads counted in key/value groups: 1 of SmolLM2's 3 per layer;
  FFN neurons per layer; ``importance="auto"``, i.e. activation on the calibration windows):
  ``+ lm`` (next-token loss) and ``+ kd`` (distillation from the dense model's logits).
- ``2:4 sparsegpt + kd``: the N:M masks held during healing.

Prints a markdown table (perplexity at step 0 and at the end on both texts, seconds) and writes
the curves as a PNG (``--plot``) and JSON (``--json-out``).

    python benchmarks/llm_heal.py                                   # the recorded run
    python benchmarks/llm_heal.py --steps 80 --plot docs/img/heal_smollm2.png
    python benchmarks/llm_heal.py --quick                           # smoke run (tiny budgets)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
from benchmarks import _realtext as rt  # noqa: E402
from benchmarks import _smollm2 as sm  # noqa: E402

BUDGETS = {  # name -> compile keywords (uniform=True: every layer keeps the same counts)
    "heads 1/3 + FFN 25 %": {"heads": 1, "ffn": 0.25},
    "FFN 25 %": {"ffn": 0.25},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per row")
    ap.add_argument("--batch", type=int, default=2, help="windows per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per training window")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--calib", type=int, default=16, help="pruning calibration windows (512)")
    ap.add_argument("--eval-windows", type=int, default=4, help="held-out windows per text")
    ap.add_argument("--eval-seq", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--rows", nargs="*", default=None, help="only these row labels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", default=None, help="PNG of perplexity against steps")
    ap.add_argument("--json-out", default=None)
    ap.add_argument(
        "--replot", default=None, metavar="JSON", help="only draw --plot from a saved --json-out"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 window")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.batch, a.seq, a.calib, a.eval_windows, a.eval_seq, a.eval_every = (
            2,
            1,
            64,
            2,
            1,
            64,
            1,
        )
    return a


@torch.no_grad()
def perplexity(model, wins: torch.Tensor) -> float:
    """exp of the mean next-token NLL over every predicted token of ``wins`` ``[n, seq]``."""
    tot, cnt = 0.0, 0
    for x in wins.split(1):
        logits = model(x).logits.float()
        tot += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        cnt += x.shape[1] - 1
    return math.exp(tot / cnt)


def train_batches(texts, a) -> list[torch.Tensor]:
    """``steps x batch`` windows of the calibration files (both texts, interleaved)."""
    wins = rt.calibration(texts, a.steps * a.batch, a.seq)
    flat = torch.cat(wins)
    return [flat[i : i + a.batch] for i in range(0, len(flat), a.batch)]


def rows(a):
    out = [("dense + lm", None, "lm")]
    for name, kw in BUDGETS.items():
        out += [(f"{name} + lm", kw, "lm"), (f"{name} + kd", kw, "kd")]
    out.append(("2:4 sparsegpt + kd", {"sparsity": "2:4", "sparsity_method": "sparsegpt"}, "kd"))
    if a.rows:
        out = [r for r in out if r[0] in a.rows]
    return out


def run_row(label, kw, loss, dense, calib, batches, evals, a, log):
    t0 = time.perf_counter()
    if kw is None:
        student, prune_s, masks = copy.deepcopy(dense), 0.0, {}
    else:
        ex = calib[0]
        kw = dict(kw)
        if "sparsity" in kw:
            kw["sparsity_exclude"] = ["lm_head"]
        else:
            kw["uniform"] = True
        res = fxprune.compile(dense, ex, calibration=calib, **kw)
        student, masks = res.model, dict(res.masks)
        prune_s = time.perf_counter() - t0
    log(
        f"{label}: pruned in {prune_s:.0f} s, {sum(p.numel() for p in student.parameters()):,} params"
    )

    def ev(m):
        return {k: perplexity(m, w) for k, w in evals.items()}

    curve = []

    def eval_fn(m):
        ppl = ev(m)
        curve.append(ppl)
        log(f"  {label} eval {len(curve)}: {ppl}")
        return sum(math.log(v) for v in ppl.values()) / len(ppl)

    rep = fxprune.heal(
        student,
        dense if loss != "lm" else None,
        batches,
        steps=a.steps,
        lr=a.lr,
        loss=loss,
        temperature=a.temperature if loss != "lm" else 1.0,
        masks=masks,
        eval_fn=eval_fn,
        eval_every=a.eval_every,
    )
    steps_at = [s for s, _ in rep.evals]
    return {
        "label": label,
        "loss": loss,
        "params": sum(p.numel() for p in student.parameters()),
        "nonzero": sum(int((p != 0).sum()) for p in student.parameters()),
        "prune_s": round(prune_s, 1),
        "heal_s": round(rep.seconds, 1),
        "steps": steps_at,
        "ppl": curve,
        "history": rep.history,
        "masks_held": rep.masks_held,
        "revived": rep.revived,
    }


def plot(results, path, a):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, text in zip(axes, ("docs", "code"), strict=True):
        for r in results:
            ax.plot(r["steps"], [p[text] for p in r["ppl"]], marker="o", ms=3, label=r["label"])
        ax.set_yscale("log")
        ax.set_title(f"held-out {text} perplexity")
        ax.set_xlabel(f"heal steps ({a.batch} x {a.seq} tokens each)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct: pruned, then healed (fxprune.heal); dense + lm = control")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    a = parse_args(argv)
    if a.plot:  # before an hour of training, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("--plot needs matplotlib: pip install -r benchmarks/requirements-llm.txt")
    if a.replot:
        if not a.plot:
            sys.exit("--replot needs --plot PNG")
        with open(a.replot) as f:
            saved = json.load(f)
        plot(saved["rows"], a.plot, argparse.Namespace(**saved["args"]))
        print(f"plot: {a.plot}")
        return
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    dense, tok = sm.load()
    texts = rt.load(tok, log=log)
    calib = rt.calibration(texts, a.calib, a.eval_seq)
    evals = rt.evaluation(texts, a.eval_windows, a.eval_seq)
    batches = train_batches(texts, a)
    results = []
    for label, kw, loss in rows(a):
        results.append(run_row(label, kw, loss, dense, calib, batches, evals, a, log))
        if a.json_out:  # after every row: a long run that is stopped keeps what it measured
            with open(a.json_out, "w") as f:
                json.dump({"args": vars(a), "rows": results}, f, indent=1)
    cmd = "python benchmarks/llm_heal.py " + " ".join(
        shlex.quote(x) for x in (argv or sys.argv[1:])
    )
    print(f"# {cmd}")
    print(
        f"# SmolLM2-135M-Instruct, {a.steps} steps x {a.batch} x {a.seq} tokens, lr {a.lr}, "
        f"{a.eval_windows} held-out windows x {a.eval_seq} tokens per text; {platform.machine()}, "
        f"torch {torch.__version__}, {a.threads} threads, fxprune {fxprune.__version__}"
    )
    dense_ppl = results[0]["ppl"][0] if results and results[0]["loss"] == "lm" else None
    if dense_ppl:
        print(f"\ndense (untrained): docs {dense_ppl['docs']:.2f}, code {dense_ppl['code']:.2f}\n")
    print(
        "| row | params | nonzero | prune s | docs ppl step 0 | docs ppl end | code ppl step 0 "
        "| code ppl end | heal s | masks held | revived |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p0, p1 = r["ppl"][0], r["ppl"][-1]
        print(
            f"| {r['label']} | {r['params'] / 1e6:.1f} M | {r['nonzero'] / 1e6:.1f} M | "
            f"{r['prune_s']} | {p0['docs']:.2f} | {p1['docs']:.2f} | {p0['code']:.2f} | "
            f"{p1['code']:.2f} | {r['heal_s']} | {r['masks_held']} | {r['revived']} |"
        )
    if a.plot:
        plot(results, a.plot, a)
        print(f"\nplot: {a.plot}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"command": cmd, "args": vars(a), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
