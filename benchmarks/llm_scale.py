"""LLM-scale pruning on this machine: time and peak memory per model size, fxprune's
block-by-block stream beside the whole-model paths (fxprune.compile, torch-pruning).

    python benchmarks/llm_scale.py                          # 0.5B, 1B, 3B, 7B shapes
    python benchmarks/llm_scale.py --sizes 0.5B 1B --jobs stream-heads-ffn tp-heads-ffn

Each size is a random-weight bf16 checkpoint (safetensors shards, written once under --work)
with a Llama-2 layout and grouped-query attention (4 query heads per KV head). The config class
is Mistral's with ``sliding_window=None``, the same computation as Llama: transformers' LlamaConfig
refuses a head count that does not divide ``hidden_size`` (32 -> 24 heads of 128 at 7B), so a
Llama pruned by 25 % of its heads has no Llama config.

Every job runs in its own process (peak RSS is that process's ``ru_maxrss``), reads the
checkpoint folder, prunes, and writes a Hugging Face folder that ``from_pretrained`` opens:

* ``stream-heads-ffn`` / ``stream-ffn``: ``fxprune.stream``, heads (whole KV groups) 25 % +
  FFN 25 %, or FFN 25 % alone, by L1;
* ``stream-2:4-magnitude`` / ``stream-2:4-wanda`` / ``stream-2:4-sparsegpt``: 2:4 on every
  block Linear (Wanda / SparseGPT on --calib batches of 128 random tokens, calibrated block by
  block on the pruned blocks' outputs);
* ``compile-heads-ffn`` / ``compile-ffn``: ``from_pretrained`` + ``fxprune.compile(uniform=True)``
  + ``save_pretrained``, the whole model in memory;
* ``cli-heads50-ffn``: the plain command a user types, ``fxprune prune hf:SRC --heads 0.5
  --ffn 0.25 --save-pretrained OUT`` (no ``--stream``), run in the job's process: where the
  whole model would not fit, the command streams by itself and says so (the note quotes it);
* ``...+unproved``: a stream job without the per-block proof (``prove=False``), the pruning
  work alone, as the whole-model tools do it (they prove nothing);
* ``tp-ffn``: FFN 25 % through torch-pruning's ``MetaPruner`` (L1 magnitude, attention and
  residual-stream layers ignored) + ``save_pretrained``. Only FFN: torch-pruning 1.6.1's
  ``MetaPruner`` with ``num_heads`` does not finish building its groups on transformers 5.24's
  Llama / Mistral (a 2-layer, hidden-256 model, stopped after 60 s in
  ``_fix_dependency_graph_non_recursive``), so the heads request has no peer row.

A whole-model job whose peak, extrapolated from the smaller sizes' measured peaks (a fixed cost
plus a multiple of the weights, fit to the two largest), would not fit in 90 % of the memory
available is skipped and says so (it would be OOM-killed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# (hidden, FFN, layers, heads, KV heads, vocab): Llama-2 layouts, GQA with 4 query heads per KV
SHAPES = {
    "0.5B": (1024, 4096, 28, 16, 4, 32000),
    "1B": (2048, 5632, 22, 32, 8, 32000),  # TinyLlama-1.1B
    "3B": (3200, 8640, 26, 32, 8, 32000),  # OpenLLaMA-3B with 8 KV heads
    "7B": (4096, 11008, 32, 32, 8, 32000),  # Llama-2-7B with 8 KV heads
    "tiny": (128, 256, 2, 8, 4, 1000),  # a smoke test of this script (tests/, slow)
}
DEFAULT_SIZES = ["0.5B", "1B", "3B", "7B"]
JOBS = (
    "stream-heads-ffn",
    "stream-ffn",
    "stream-2:4-magnitude",
    "stream-2:4-wanda",
    "compile-heads-ffn",
    "compile-ffn",
    "tp-ffn",
)
# "+unproved": the stream without its per-block proof (prove=False), to compare the pruning
# work alone with tools that prove nothing
MORE = (
    "stream-2:4-sparsegpt",
    "stream-heads-ffn+unproved",
    "stream-ffn+unproved",
    "stream-2:4-magnitude+unproved",
    "cli-heads50-ffn",
)
REQUESTS = {
    "heads-ffn": {"heads": 0.25, "ffn": 0.25},
    "ffn": {"ffn": 0.25},
    "2:4-magnitude": {"sparsity": "2:4"},
    "2:4-wanda": {"sparsity": "2:4", "sparsity_method": "wanda"},
    "2:4-sparsegpt": {"sparsity": "2:4", "sparsity_method": "sparsegpt"},
    "heads50-ffn": {"heads": 0.5, "ffn": 0.25},
}


def config(size: str):
    from transformers import MistralConfig

    h, f, n, heads, kv, vocab = SHAPES[size]
    return MistralConfig(
        hidden_size=h,
        intermediate_size=f,
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=h // heads,
        vocab_size=vocab,
        sliding_window=None,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def make_checkpoint(size: str, folder: Path) -> int:
    """Random bf16 weights written shard by shard (never the whole model in memory)."""
    import torch
    import transformers

    from fxprune.streaming import ShardWriter

    if (folder / "config.json").is_file():
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = config(size)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(tmp)
    for name, p in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.add(name, t)
    writer.close()
    cfg.save_pretrained(tmp)
    tmp.rename(folder)
    return writer.total


def _calibration(vocab: int, batches: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, 128), generator=gen) for _ in range(batches)]


def _tp_prune(model, ratio: float) -> None:
    """torch-pruning's MetaPruner on the FFN (gate/up rows, down columns), everything else
    ignored; then the config, which torch-pruning leaves to the user."""
    import torch
    import torch_pruning as tp

    ignored = [model.lm_head, model.model.embed_tokens]
    for layer in model.model.layers:
        a = layer.self_attn
        ignored += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.down_proj]
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    pruner = tp.pruner.MetaPruner(
        model,
        ids,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        output_transform=lambda out: out.logits.sum(),
    )
    pruner.step()
    model.config.intermediate_size = model.model.layers[0].mlp.up_proj.out_features


def child(job: str, src: str, out: str, calib: int) -> dict:
    """One job, in this process; returns its numbers."""
    import resource

    import torch

    t0 = time.perf_counter()
    tool, _, what = job.partition("-")
    prove = not what.endswith("+unproved")
    kw = dict(REQUESTS[what.removesuffix("+unproved")])
    if kw.get("sparsity_method", "magnitude") != "magnitude":
        import transformers

        vocab = transformers.AutoConfig.from_pretrained(src).vocab_size
        kw["calibration"] = _calibration(vocab, calib)
        kw["calibration_batches"] = calib
    if tool == "cli":  # the plain command, as a user types it: no --stream
        import contextlib
        import io

        from fxprune.cli import main

        argv = ["prune", f"hf:{src}", "--save-pretrained", out]
        for k, v in kw.items():
            argv += [f"--{k}", str(v)]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            rc = main(argv)
        said = [ln for ln in err.getvalue().splitlines() if "streaming block by block" in ln]
        if rc != 0:
            raise RuntimeError(f"fxprune {' '.join(argv[:2])} exited {rc}: {err.getvalue()[-300:]}")
        note = "auto-streamed: " + said[0][:90] if said else "whole model (no auto-stream)"
    elif tool == "stream":
        import fxprune

        res = fxprune.stream(src, out, prove=prove, **kw)
        b, a = res.before, res.after
        note = (
            f"heads {b['num_attention_heads']}/{b['num_key_value_heads']} -> "
            f"{a['num_attention_heads']}/{a['num_key_value_heads']}, FFN "
            f"{b['intermediate_size']} -> {a['intermediate_size']}; "
            + (
                f"worst block max_rel_err {max(r.max_rel_err for r in res.layers):.1e}"
                if prove
                else "blocks not proved"
            )
        )
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        model.eval()
        t_load = time.perf_counter() - t0
        if tool == "compile":
            import fxprune

            ids = torch.randint(0, model.config.vocab_size, (1, 16))
            res = fxprune.compile(model, ids, uniform=True, **kw)
            del model
            res.save_pretrained(out)
        else:
            _tp_prune(model, kw["ffn"])
            model.save_pretrained(out)
        note = f"load {t_load:.0f} s"
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out_bytes = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    return {"seconds": seconds, "peak": peak, "out_bytes": out_bytes, "note": note}


def sparsegpt_flop(size: str) -> float:
    """The arithmetic SparseGPT cannot avoid on this shape (issue #24): per weight of r rows
    and c columns the blocked OBS sweep, ~r * c^2; per Hessian (q/k/v share one, gate/up
    share one, o_proj and down_proj have their own) its Cholesky, inverse and second
    Cholesky, ~1.7 * c^3."""
    h, f, n, heads, kv, _ = SHAPES[size]
    kvd = kv * (h // heads)
    sweep = (2 * h + 2 * kvd + 2 * f) * h**2 + h * f**2
    factor = 1.7 * (3 * h**3 + f**3)
    return float(n * (sweep + factor))


def gemm_rate(n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of a float32 ``torch.mm`` of two n x n matrices on this machine, best of a few."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def predict(points: list[tuple[int, int]], nbytes: int) -> float | None:
    """Peak RSS at ``nbytes`` of weights from the measured (weights, peak) points: the line
    through the two largest (fixed cost + a multiple of the weights), or the ratio of one."""
    if not points:  # nothing measured yet in this run: the fit issue #12 measured for compile
        return 0.93 * 1024**3 + 2.4 * nbytes
    if len(points) == 1:
        ((b0, p0),) = points
        return p0 / b0 * nbytes
    (b0, p0), (b1, p1) = sorted(points)[-2:]
    slope = (p1 - p0) / (b1 - b0)
    return p1 + slope * (nbytes - b1)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, choices=list(SHAPES))
    ap.add_argument("--jobs", nargs="+", default=list(JOBS), choices=[*JOBS, *MORE])
    ap.add_argument("--calib", type=int, default=8, help="calibration batches of 128 tokens")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/fxprune/llm_scale"))
    ap.add_argument("--keep", action="store_true", help="keep the random checkpoints")
    ap.add_argument(
        "--child", nargs=4, metavar=("JOB", "SRC", "OUT", "CALIB"), help=argparse.SUPPRESS
    )
    a = ap.parse_args()
    if a.child:
        job, src, out, calib = a.child
        print("RESULT " + json.dumps(child(job, src, out, int(calib))))
        return
    import torch
    import transformers

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; bf16 random weights; heads/KV heads 25 % + FFN 25 %"
    )
    seen: dict[str, list[tuple[int, int]]] = {}  # whole-model job -> [(weights, peak)]
    for size in a.sizes:
        t = time.perf_counter()
        src = work / f"mistral-{size}"
        nbytes = make_checkpoint(size, src)
        params = nbytes // 2
        print(
            f"\n## {size} shape {SHAPES[size][:5]}: {params / 1e9:.2f} B params, "
            f"{nbytes / 1024**3:.2f} GiB bf16 (checkpoint written in {time.perf_counter() - t:.0f} s)"
        )
        print(
            f"{'job':24s} {'time s':>8s} {'peak GiB':>9s} {'peak/weights':>12s} {'out GiB':>8s}  note"
        )
        for job in a.jobs:
            out = work / f"out-{size}-{job.replace(':', '')}"
            shutil.rmtree(out, ignore_errors=True)
            whole = job.startswith(("compile-", "tp-"))  # the plain command streams itself
            need = predict(seen.get(job, []), nbytes) if whole else None
            if need is not None and need > 0.9 * mem_available():
                print(
                    f"{job:24s} {'-':>8s} {'-':>9s} {'-':>12s} {'-':>8s}  skipped: needs "
                    f"~{need / 1024**3:.1f} GiB (fit to the smaller sizes' peaks), "
                    f"{mem_available() / 1024**3:.1f} GiB available"
                )
                continue
            cmd = [sys.executable, __file__, "--child", job, str(src), str(out), str(a.calib)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            if run.returncode or not line:
                err = (run.stderr.strip().splitlines() or ["killed"])[-1][:150]
                print(f"{job:24s} {'failed':>8s}  rc={run.returncode}: {err}")
                shutil.rmtree(out, ignore_errors=True)
                continue
            r = json.loads(line[0][len("RESULT ") :])
            ratio = r["peak"] / nbytes
            if "sparsegpt" in job:  # the floor, from this machine's GEMM rate measured now
                rate, flop = gemm_rate(), sparsegpt_flop(size)
                floor = flop / rate
                r["note"] += (
                    f"; FLOP floor {floor:.0f} s ({flop / 1e12:.1f} TFLOP at "
                    f"{rate / 1e9:.0f} GFLOP/s, torch.mm 4096^2 fp32 measured after the job): "
                    f"{r['seconds'] / floor:.1f}x the floor"
                )
            if whole:
                seen.setdefault(job, []).append((nbytes, r["peak"]))
            print(
                f"{job:24s} {r['seconds']:8.1f} {r['peak'] / 1024**3:9.2f} {ratio:12.2f} "
                f"{r['out_bytes'] / 1024**3:8.2f}  {r['note']}",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
