"""Smoke test of benchmarks/llm_scale.py on its tiny shape: every job runs in its own process
and prints a row with a time, a peak and an output size (the numbers are not asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_scale.py"


@pytest.mark.slow
def test_llm_scale_rows_on_the_tiny_shape(tmp_path):
    jobs = ["stream-heads-ffn", "stream-2:4-wanda", "stream-ffn+unproved", "compile-ffn", "tp-ffn"]
    jobs += ["cli-heads50-ffn"]  # the plain command: whole model at this size
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "tiny", "--jobs", *jobs, "--calib", "2",
         "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for job in jobs:
        row = next((r for r in run.stdout.splitlines() if r.startswith(job + " ")), None)
        assert row is not None, run.stdout
        assert re.match(rf"{re.escape(job)}\s+\d+\.\d\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d", row), (
            row
        )
    assert "heads 8/4 -> 6/3" in run.stdout  # a whole KV group with its query heads
    assert "whole model (no auto-stream)" in run.stdout  # 0.8 GiB of 24: no reason to stream
    assert not list(tmp_path.glob("out-*"))  # every output folder was removed
