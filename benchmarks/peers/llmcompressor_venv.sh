#!/usr/bin/env bash
# Build the virtual environment in which benchmarks/llm_quality.py runs its peer, llm-compressor's
# oneshot (SparseGPT / Wanda 2:4). fxprune never imports it; it lives in its own venv because
# llmcompressor 0.14 pins torch <= 2.14.0, transformers 5.15-5.17 and compressed-tensors 0.19,
# which fxprune's own venv (constraints.txt: torch 2.14.1, transformers 5.24) does not hold.
#
#   bash benchmarks/peers/llmcompressor_venv.sh            # -> $FXPRUNE_BENCH_CACHE/venv-llmcompressor
#   bash benchmarks/peers/llmcompressor_venv.sh DIR        # -> DIR
#
# What it installs, and why:
# - torch 2.14.1 (fxprune's pinned release, one patch above the peer's cap of 2.14.0, installed
#   against constraints.txt so both sides run the same kernels) and transformers 5.17.0 (the
#   newest release the peer accepts; it needs huggingface_hub < 2), with the other dependencies
#   pinned by constraints.txt;
# - llmcompressor and compressed-tensors with --no-deps (their pins would pull torch back), then
#   what they import on the oneshot path: accelerate, datasets, loguru, psutil, pydantic, pyyaml,
#   requests, pillow. The peer's optional auto-round (a quantization modifier) and nvidia-ml-py
#   (GPU monitoring) are not on the CPU pruning path and are left out.
# Takes a few minutes (torch is the bulk); rerunning on a complete venv does nothing.
set -euo pipefail

LLMCOMPRESSOR=0.14.0.1
COMPRESSED_TENSORS=0.19.0
TRANSFORMERS=5.17.0
TORCH=2.14.1

root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${FXPRUNE_BENCH_CACHE:-$HOME/.cache/fxprune-bench}
venv=${1:-$cache/venv-llmcompressor}
python=${PYTHON:-python3}
stamp="llmcompressor==$LLMCOMPRESSOR compressed-tensors==$COMPRESSED_TENSORS transformers==$TRANSFORMERS torch==$TORCH"

if [[ -f "$venv/.complete" && "$(cat "$venv/.complete")" == "$stamp" ]]; then
    echo "$venv: complete ($stamp)"
    exit 0
fi
rm -rf "$venv"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# fxprune's pins, minus transformers (the peer caps it at 5.17) and the hub client that
# transformers 5.17 caps below 2.0
grep -vE '^(transformers|huggingface_hub|hf-xet)==' "$root/constraints.txt" >"$venv/constraints-peer.txt"
"${pip[@]}" -c "$venv/constraints-peer.txt" "torch==$TORCH" "transformers==$TRANSFORMERS" \
    accelerate datasets loguru psutil pydantic pyyaml requests pillow safetensors numpy tqdm
"${pip[@]}" --no-deps "llmcompressor==$LLMCOMPRESSOR" "compressed-tensors==$COMPRESSED_TENSORS"
"$venv/bin/python" - <<'PY'
import compressed_tensors, llmcompressor, torch, transformers
from llmcompressor import oneshot  # noqa: F401  (the entry point the benchmark calls)
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier  # noqa: F401
print(f"llmcompressor {llmcompressor.__version__}, compressed-tensors "
      f"{compressed_tensors.__version__}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}")
PY
echo "$stamp" >"$venv/.complete"
echo "$venv: complete"
