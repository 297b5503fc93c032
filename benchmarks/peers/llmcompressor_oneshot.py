"""The peer row of benchmarks/llm_quality.py: llm-compressor's ``oneshot`` on a local Hugging
Face causal LM, run in the venv of ``benchmarks/peers/llmcompressor_venv.sh`` (never in
fxprune's).

It loads ``--model-dir`` in float32, runs ``oneshot`` with ``SparseGPTModifier`` or
``WandaPruningModifier`` (``sparsity=0.5``, ``mask_structure`` from ``--mask``,
``ignore=["re:.*lm_head"]``) on the calibration windows of ``--calib`` (a ``[n, seq]`` int64
tensor saved by ``torch.save``: the benchmark's own windows, in its order, unshuffled), and
writes to ``--out``:

- ``layers.safetensors``: every tensor of the decoder layers (``model.layers.*``) after pruning;
  the benchmark loads them into its own copy of the dense model and scores that with the same
  code as every other row (embedding, final norm and ``lm_head`` are not targets and stay dense);
- ``row.json``: seconds of ``oneshot``, the process's RSS before it and its peak RSS during it
  (VmHWM, reset just before), the versions.

    python benchmarks/peers/llmcompressor_oneshot.py --model-dir D --calib c.pt \\
        --method sparsegpt --mask 2:4 --out OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--calib", required=True, help="torch.save'd [n, seq] int64 token windows")
    ap.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    ap.add_argument("--mask", default="2:4", help='"N:M", or "0:0" for unstructured')
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import compressed_tensors
    import llmcompressor
    import safetensors.torch
    import torch
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    windows = torch.load(a.calib, weights_only=True)
    rows = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
    loader = DataLoader(rows, batch_size=1, shuffle=False)  # yields dicts of [1, seq]
    cls = SparseGPTModifier if a.method == "sparsegpt" else WandaPruningModifier
    # with ignore=["lm_head"], 0.14 still sparsified lm_head here (its log: "Sparsifying
    # lm_head."); the spelling its own source recommends, "re:.*lm_head", keeps it dense
    recipe = cls(
        sparsity=a.sparsity, mask_structure=a.mask, targets=["Linear"], ignore=["re:.*lm_head"]
    )

    rss_start = rss_kib("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=len(rows))
    seconds = time.perf_counter() - t0
    peak = rss_kib("VmHWM")

    layers = {
        k: v.detach().to(torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if k.startswith("model.layers.")
    }
    safetensors.torch.save_file(layers, str(out / "layers.safetensors"))
    row = {
        "method": a.method,
        "mask": a.mask,
        "sparsity": a.sparsity,
        "seconds": round(seconds, 1),
        "rss_start_kib": rss_start,
        "peak_rss_kib": peak,
        "calibration_windows": list(windows.shape),
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    (out / "row.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
