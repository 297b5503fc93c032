#!/usr/bin/env bash
# The GPU measurements owed, as one prepared run for a lent device: at most 560 s of steps (each
# time-boxed), so it fits one `run` call of timeout_s=600 with the device budget's margin.
#
#   bash benchmarks/gpu_owed.sh            # writes its logs under $OUT (or ./gpu-out)
#
# Meant for the device machine, whose image has torch, torchvision, transformers, onnx,
# onnxruntime, timm and pytest but no internet: fxprune runs from the checkout (PYTHONPATH),
# nothing is installed. Each step is time-boxed so one stuck step cannot eat the lease; a step's
# failure is logged and the next one runs. Record the tables in docs/benchmarks.md with this
# command, the GPU and the versions printed in smi.txt.
set -u -o pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS CMD...: run CMD with a time limit, its output in $out/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  echo "== $name: rc=${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
}

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  python3 -c "import torch, transformers, onnxruntime as o; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'onnxruntime', o.__version__)"
} 2>&1 | tee "$out/smi.txt"

# 1. the suite's GPU tests (real semi-structured timings, the swap decision, fp16 parity)
step pytest_gpu 120 python3 -m pytest -m gpu -q -p no:cacheprovider -s tests

# 2. fxprune verify --backend torch-cuda: dense vs channels 50 % vs 2:4, ResNet-50 and BERT-base
#    (2:4 with the measured swap, and with every eligible weight swapped: --semi-structured all)
for job in "r50-channels torchvision:resnet50 --channels 0.5 --ignore fc" \
  "r50-2of4 torchvision:resnet50 --sparsity 2:4" \
  "bert-heads-ffn hf:bert --heads 0.5 --ffn 0.5" \
  "bert-2of4 hf:bert --sparsity 2:4" \
  "bert-2of4-all hf:bert --sparsity 2:4 --semi-structured all"; do
  set -- $job
  name=$1
  shift
  step "verify-$name" 70 python3 -m fxprune.cli verify "$@" --backend torch-cuda --batch 1 8 32 --repeats 30
done

# 3. dense vs pruned under torch.compile on the GPU (the torch-compile-cuda rows)
step compile_speed 90 python3 benchmarks/compile_speed.py --quick
