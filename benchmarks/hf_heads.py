"""Head + FFN pruning of Hugging Face models: fxprune vs torch-pruning (its ``num_heads`` option).

Same models (random weights from configs, scaled by --hidden/--layers), same request: remove 50 %
of the attention heads (key/value heads under GQA) and 50 % of the MLP neurons. Each (model,
tool) runs in its own process with a time limit. Reported: whether the tool finished, its wall
time, whether the returned model runs *as it comes out* (no manual patching of ``num_heads`` /
``head_dim`` / reshape constants), and whether it is exact: equal to the dense model with every
input column a layer lost set to zero (fxprune's proof; for torch-pruning the same reference is
rebuilt by matching the surviving weight columns to the dense ones).

    python benchmarks/hf_heads.py
    python benchmarks/hf_heads.py --hidden 512 --layers 8 --timeout 600
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODELS = ["bert", "roberta", "gpt2", "llama", "mistral", "qwen2", "hf_vit"]


def build(name: str, hidden: int, layers: int):
    sys.path.insert(0, ROOT)
    import tests.transformer_models as tm

    tm.HIDDEN, tm.LAYERS, tm.FFN = hidden, layers, 4 * hidden
    return tm.build(name)


def first(out):
    import torch

    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out if isinstance(out, torch.Tensor) else out[0]


def run_fxprune(model, x):
    import fxprune

    t0 = time.perf_counter()
    res = fxprune.compile(model, x, heads=0.5, ffn=0.5)
    secs = time.perf_counter() - t0
    rep = fxprune.verify.equivalence(model, res, x)
    return res.module, secs, {"equivalent": rep.ok, "rel_err": rep.max_rel_err}


def run_tp(model, x, recipe: bool):
    """torch-pruning with its ``num_heads`` option. ``recipe``: as its Hugging Face BERT example
    does it (global ranking, every coupled channel group pruned, the hidden size included);
    otherwise the request fxprune gets (the residual stream, i.e. every layer writing the hidden
    size and the embeddings, ignored)."""
    import torch
    import torch_pruning as tp

    cfg = model.config
    heads = {}
    for m in model.modules():
        if hasattr(m, "q_proj") and hasattr(m, "k_proj"):  # LLaMA / Mistral / Qwen2 (GQA)
            heads[m.q_proj] = cfg.num_attention_heads
            kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            heads[m.k_proj] = heads[m.v_proj] = kv
        elif hasattr(m, "query") and hasattr(m, "key") and hasattr(m, "value"):  # BERT, ViT
            for lin in (m.query, m.key, m.value):
                heads[lin] = cfg.num_attention_heads
    ignored = []
    if not recipe:
        ignored = [
            m
            for m in model.modules()
            if isinstance(m, torch.nn.Embedding)
            or (
                getattr(m, "weight", None) is not None
                and m.weight.ndim == 2
                and m.weight.shape[0 if not type(m).__name__ == "Conv1D" else 1] == cfg.hidden_size
            )
        ]
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=recipe,
        pruning_ratio=0.5,
        num_heads=heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=0.5,
        output_transform=lambda out: first(out).sum(),
        ignored_layers=ignored,
    )
    pruner.step()
    secs = time.perf_counter() - t0
    return model, secs, {}


def layer0(model, head_dim: int) -> str:
    """Layer 0's attention heads (query heads) and MLP width, read off the weights."""
    q = ffn = None
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if w is None or w.ndim != 2:
            continue
        parts = n.split(".")
        if "0" not in parts:
            continue
        last = parts[-1]
        if q is None and last in ("query", "q_proj", "c_attn"):
            size = w.shape[1] // 3 if last == "c_attn" else w.shape[0]
            q = size // head_dim
        if ffn is None and last in ("intermediate", "dense", "up_proj", "c_fc", "fc1"):
            if "intermediate" in parts or last in ("up_proj", "c_fc", "fc1"):
                ffn = w.shape[1] if last == "c_fc" else w.shape[0]
    return f"{q} / {ffn}"


def zeroed_like(dense, pruned):
    """The tool-agnostic reference: the dense model with every input column that a Linear lost
    in ``pruned`` set to zero (columns are matched by value: slicing copies them exactly)."""
    import torch

    z = copy.deepcopy(dense)
    mods = dict(pruned.named_modules())
    with torch.no_grad():
        for name, m in z.named_modules():
            p = mods.get(name)
            w, pw = getattr(m, "weight", None), getattr(p, "weight", None)
            if w is None or pw is None or w.ndim != 2 or type(m).__name__ == "Embedding":
                continue
            cols = 0 if type(m).__name__ == "Conv1D" else 1  # HF Conv1D stores [in, out]
            if w.shape[cols] == pw.shape[cols]:
                continue
            index = {tuple(c.tolist()): i for i, c in enumerate(w.unbind(cols))}
            keep = torch.zeros(w.shape[cols], dtype=torch.bool)
            for c in pw.unbind(cols):
                hit = index.get(tuple(c.tolist()))
                if hit is None:  # its rows were pruned too: no column-only reference
                    return None
                keep[hit] = True
            shape = [1, 1]
            shape[cols] = -1
            w.mul_(keep.to(w.dtype).view(shape))
    return z


def child(name: str, tool: str, hidden: int, layers: int) -> dict:
    import torch

    torch.manual_seed(0)
    model, x, _ = build(name, hidden, layers)
    dense = copy.deepcopy(model)
    params = sum(p.numel() for p in model.parameters())
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    row = {"before": layer0(model, head_dim)}
    if tool == "fxprune":
        pruned, secs, extra = run_fxprune(model, x)
    else:
        pruned, secs, extra = run_tp(model, x, recipe=tool.endswith("recipe"))
    row.update(seconds=secs, after=layer0(pruned, head_dim), **extra)
    try:
        with torch.no_grad():
            y = first(pruned(*x))
        row["runs"] = "yes"
        if tool != "fxprune":
            ref = zeroed_like(dense, pruned)
            if ref is not None:
                with torch.no_grad():
                    r = first(ref(*x))
                err = ((y - r).abs().max() / r.abs().max()).item()
                row["equivalent"], row["rel_err"] = err <= 1e-4, err
    except Exception as e:  # noqa: BLE001 - the point is to report it
        row["runs"] = f"no: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    row["params_ratio"] = sum(p.numel() for p in pruned.parameters()) / params
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.hidden, a.layers)))
        return
    import torch
    import torch_pruning
    import transformers

    print(
        f"# hidden {a.hidden}, {a.layers} layers, FFN {4 * a.hidden}; 50 % heads + 50 % FFN; "
        f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, torch-pruning {torch_pruning.__version__}; limit "
        f"{a.timeout} s per run\n"
    )
    print(
        "| model | tool | finished | s | layer-0 heads / MLP width | runs as it comes out "
        "| params ratio | exact |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in a.models:
        for tool in ("fxprune", "torch-pruning, same request", "torch-pruning, recipe"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                tool,
                "--hidden",
                str(a.hidden),
                "--layers",
                str(a.layers),
            ]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                if p.returncode:
                    err = (p.stderr.strip().splitlines() or ["?"])[-1][:140]
                    print(f"| {name} | {tool} | FAIL: {err} | | | | | |", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                print(f"| {name} | {tool} | timed out > {a.timeout} s | | | | | |", flush=True)
                continue
            proof = (
                f"equivalent ({r['rel_err']:.1e})"
                if r.get("equivalent")
                else ("NOT equivalent" if "equivalent" in r else "none")
            )
            print(
                f"| {name} | {tool} | yes | {r['seconds']:.2f} | {r['before']} -> {r['after']} "
                f"| {r['runs']} "
                f"| {r['params_ratio']:.3f} | {proof} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
