"""What the checkpoint digests cost: ``CompileResult.save`` seals every tensor, compressed weight,
the plan and the source with sha256, and ``fxprune.load`` recomputes them (issue #25). This times
the checkpoint layer both call, with and without the digests, on a 1B-shaped state dict
(benchmarks/llm_scale.py's "1B": hidden 2048, FFN 5632, 22 layers, 32 heads over 8 KV heads,
vocabulary 32000), random weights, medians of --repeats runs side by side in one process.

    python benchmarks/checkpoint_digest.py                 # bf16, 3 repeats
    python benchmarks/checkpoint_digest.py --dtype float32

A whole ``fxprune.load`` also replays the plan (a capture of the dense model), which is not timed
here, so the digests' share of a real load is smaller than the ratio printed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fxprune.checkpoint import DIGESTS, atomic_save, read_checkpoint, seal, verify_digests  # noqa: E402

SHAPE = {"hidden": 2048, "ffn": 5632, "layers": 22, "heads": 32, "kv": 8, "vocab": 32000}


def state_dict(dtype: torch.dtype, s: dict = SHAPE) -> dict:
    g = torch.Generator().manual_seed(0)
    h, f, hd = s["hidden"], s["ffn"], s["hidden"] // s["heads"]

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    sd = {"model.embed_tokens.weight": r(s["vocab"], h)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": r(s["heads"] * hd, h),
            p + "self_attn.k_proj.weight": r(s["kv"] * hd, h),
            p + "self_attn.v_proj.weight": r(s["kv"] * hd, h),
            p + "self_attn.o_proj.weight": r(h, s["heads"] * hd),
            p + "mlp.gate_proj.weight": r(f, h),
            p + "mlp.up_proj.weight": r(f, h),
            p + "mlp.down_proj.weight": r(h, f),
            p + "input_layernorm.weight": r(h),
            p + "post_attention_layernorm.weight": r(h),
        }
    return sd | {"model.norm.weight": r(h), "lm_head.weight": r(s["vocab"], h)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    sd = state_dict(getattr(torch, a.dtype))
    n = sum(t.numel() for t in sd.values())
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    plan = {"version": 1, "mode": "fx", "inputs": [{"shape": [1, 16], "dtype": "int64"}]}
    plan |= {"config": {}, "passes": []}
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {n / 1e9:.2f}B parameters {a.dtype}, {nbytes / 2**30:.2f} GiB, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    runs = {k: [] for k in ("save", "seal", "load", "verify")}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "1b.pt")
        for _ in range(a.repeats):
            ckpt = {"plan": plan, "state_dict": sd}
            t0 = time.perf_counter()
            atomic_save(ckpt, path)
            runs["save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ckpt[DIGESTS] = seal(ckpt)
            runs["seal"].append(time.perf_counter() - t0)
            atomic_save(ckpt, path)
            t0 = time.perf_counter()
            back = read_checkpoint(path, verify=False)
            runs["load"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            verify_digests(back, path)
            runs["verify"].append(time.perf_counter() - t0)
            del back
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"{k:7s} median {med[k]:6.2f} s   runs {' '.join(f'{x:.2f}' for x in v)}")
    for what, base, extra in (("save", "save", "seal"), ("load", "load", "verify")):
        print(
            f"{what}: {med[base]:.2f} s -> {med[base] + med[extra]:.2f} s with digests "
            f"(x{(med[base] + med[extra]) / med[base]:.2f}; hashing {nbytes / med[extra] / 2**30:.2f} GiB/s)"
        )
    buf = os.urandom(256 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(buf).digest()
    print(
        f"one-thread hashlib.sha256 here: {len(buf) / (time.perf_counter() - t0) / 2**30:.2f} GiB/s"
    )


if __name__ == "__main__":
    main()
