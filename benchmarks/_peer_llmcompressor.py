"""benchmarks/llm_quality.py's side of the llm-compressor peer: build its venv when missing
(``benchmarks/peers/llmcompressor_venv.sh``), run ``benchmarks/peers/llmcompressor_oneshot.py``
there on the benchmark's own calibration windows, and load the pruned decoder layers into a copy
of the dense model, which the benchmark then scores like any other row. A peer that cannot be
installed or run raises :class:`PeerError` with the reason; the row records it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
VENV_SCRIPT = HERE / "peers" / "llmcompressor_venv.sh"
ONESHOT = HERE / "peers" / "llmcompressor_oneshot.py"


class PeerError(RuntimeError):
    """The peer could not be installed or run (the message says why)."""


def default_venv() -> Path:
    root = Path(os.environ.get("FXPRUNE_BENCH_CACHE", Path.home() / ".cache" / "fxprune-bench"))
    return root / "venv-llmcompressor"


def tail(text: str, lines: int = 3) -> str:
    kept = [s.strip() for s in text.strip().splitlines() if s.strip()][-lines:]
    return " | ".join(kept)[-400:]


def ensure_venv(venv: Path, log=print) -> Path:
    """The venv's python, the venv built first when incomplete (a few minutes)."""
    py = venv / "bin" / "python"
    if (venv / ".complete").exists() and py.exists():
        return py
    log(f"building the llm-compressor venv: bash {VENV_SCRIPT.relative_to(HERE.parent)} ...")
    r = subprocess.run(["bash", str(VENV_SCRIPT), str(venv)], capture_output=True, text=True)
    if r.returncode != 0 or not py.exists():
        raise PeerError(f"llmcompressor_venv.sh failed (exit {r.returncode}): {tail(r.stderr)}")
    return py


def run(
    model,
    model_dir: Path,
    calib: list[torch.Tensor],
    method: str,
    mask: str,
    threads: int,
    venv: Path,
    log=print,
):
    """(pruned copy of ``model``, the peer's row.json): ``oneshot`` with ``method``
    (``"sparsegpt"`` / ``"wanda"``), ``mask`` ("2:4") and sparsity 0.5 on ``calib``."""
    import safetensors.torch

    py = ensure_venv(venv, log)
    with tempfile.TemporaryDirectory(prefix="llmcompressor-") as tmp:
        t = Path(tmp)
        torch.save(torch.cat(calib), t / "calib.pt")
        cmd = [str(py), str(ONESHOT), "--model-dir", str(model_dir), "--calib", str(t / "calib.pt")]
        cmd += ["--method", method, "--mask", mask, "--threads", str(threads), "--out", str(t)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)  # the peer's venv only
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise PeerError(f"oneshot failed (exit {r.returncode}): {tail(r.stderr or r.stdout)}")
        row = json.loads((t / "row.json").read_text())
        layers = safetensors.torch.load_file(str(t / "layers.safetensors"))
    pruned = copy.deepcopy(model)
    missing = [k for k in layers if k not in pruned.state_dict()]
    if missing:
        raise PeerError(f"the peer wrote tensors the dense model lacks: {missing[:3]}")
    pruned.load_state_dict(layers, strict=False)
    return pruned.eval(), row
