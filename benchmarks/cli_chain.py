"""The command-line chain a user runs on a CNN, timed step by step, before and after (issue #24).

    fxprune prune torchvision:resnet50 --channels 0.5 --ignore fc --save ck.pt
    fxprune export ck.pt -o m.onnx
    fxprune verify ck.pt

Each step is its own process, as a user types it (random torchvision weights, the commands'
default example, backend and repeats), timed wall-clock from start to exit. ``--before REV``
runs the same commands with the fxprune of git revision REV too (a temporary detached worktree
of this repository on PYTHONPATH, the same interpreter and packages), alternating the two, so
the table shows what changed in fxprune and nothing else:

    python benchmarks/cli_chain.py --before b494c06^     # before export / verify reused the proof
    python benchmarks/cli_chain.py --model torchvision:resnet18 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps(model: str, channels: str, ignore: str) -> list[tuple[str, list[str]]]:
    return [
        (
            "prune --save",
            ["prune", model, "--channels", channels, "--ignore", ignore, "--save", "ck.pt"],
        ),
        ("export", ["export", "ck.pt", "-o", "m.onnx"]),
        ("verify", ["verify", "ck.pt"]),
    ]


def run_chain(src: Path, chain, threads: int) -> list[float]:
    """Seconds of each step, run with the fxprune found in ``src``, in a fresh folder."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(threads))
    code = "import sys; from fxprune.cli import main; sys.exit(main(sys.argv[1:]))"
    out = []
    with tempfile.TemporaryDirectory(prefix="fxprune-chain-") as work:
        for label, argv in chain:
            t = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", code, *argv, "--quiet"],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            out.append(time.perf_counter() - t)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
                raise SystemExit(f"{src.name}: fxprune {label} exited {done.returncode}: {tail}")
    return out


def worktree(rev: str) -> Path:
    """A detached worktree of ``rev`` in a temporary folder (removed at exit by ``main``)."""
    path = Path(tempfile.mkdtemp(prefix="fxprune-before-"))
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
        check=True,
        capture_output=True,
    )
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="torchvision:resnet50")
    ap.add_argument("--channels", default="0.5")
    ap.add_argument("--ignore", default="fc")
    ap.add_argument("--before", metavar="REV", help="also run the fxprune of this git revision")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    chain = steps(a.model, a.channels, a.ignore)
    trees = {"now": ROOT}
    old = worktree(a.before) if a.before else None
    if old:
        trees = {f"before ({a.before})": old, "now": ROOT}
    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"# python benchmarks/cli_chain.py {' '.join(argv or sys.argv[1:])}\n"
        f"# {platform.machine()}, {os.cpu_count()} cpus, {a.threads} threads; fxprune {rev}; "
        f"load {os.getloadavg()[0]:.2f} at start; medians of {a.repeats}"
    )
    try:
        times = {k: [] for k in trees}
        for _ in range(a.repeats):  # alternating, so drift hits both
            for k, src in trees.items():
                times[k].append(run_chain(src, chain, a.threads))
    finally:
        if old:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)])
            shutil.rmtree(old, ignore_errors=True)
    cols = list(trees)
    print(f"\n| step | {' | '.join(c + ' s' for c in cols)} |")
    print("|---|" + "---|" * len(cols))
    med = {
        k: [statistics.median(r[i] for r in v) for i in range(len(chain))] for k, v in times.items()
    }
    for i, (_, argv) in enumerate(chain):
        print(
            f"| `fxprune {' '.join(argv)}` | " + " | ".join(f"{med[k][i]:.1f}" for k in cols) + " |"
        )
    print("| chain | " + " | ".join(f"{sum(med[k]):.1f}" for k in cols) + " |")


if __name__ == "__main__":
    main()
