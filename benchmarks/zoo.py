"""Every torchvision classification model through fxprune and torch-pruning at the same setting.

50 % channels, L1 importance, classifier ignored; each (model, tool) runs in its own process with a
time and memory limit. Prints one markdown table; raw rows go to --out as JSON lines.

fxprune prunes in place (``inplace=True``) as torch-pruning does, so neither is timed copying the
model. Where the model's class cannot hold the pruned widths (ShuffleNetV2's ``x.chunk(2)``
needs equal halves; ``result.model`` is then the graph module and in-place is refused), it runs
on a copy and the time, marked "(copy)", includes that copy.

    python benchmarks/zoo.py --out zoo.jsonl            # all models (about an hour on 2 cores)
    python benchmarks/zoo.py --models resnet50 vit_b_16 # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

RATIO = 0.5


def build(name: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tests.conftest import randomize  # realistic BN statistics so the check means something

    randomize(model)
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(1, 3, size, size)
    heads = (torch.nn.Linear, torch.nn.Conv2d)  # SqueezeNet's classifier is a conv
    head = [n for n, m in model.named_modules() if isinstance(m, heads)][-1]
    return model, x, head


def timed(fresh, prune, repeats: int = 3):
    """Best of ``repeats`` warm ``prune(fresh())`` runs (one untimed run pays one-off costs)."""
    prune(fresh())
    best, out = float("inf"), None
    for _ in range(repeats):
        m = fresh()
        t0 = time.perf_counter()
        out = prune(m)
        best = min(best, time.perf_counter() - t0)
        del m
    return best, out


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_fxprune(name: str) -> dict:
    import copy

    import fxprune

    model, x, head = build(name)

    inplace = True

    def prune(m):  # in place: torch-pruning prunes in place too, so neither is timed copying
        kw = {"channels": RATIO, "importance": "l1", "ignore": [head], "inplace": inplace}
        return fxprune.compile(m, x, **kw)

    try:
        prune(copy.deepcopy(model))
    except fxprune.errors.ConfigError as e:  # the class cannot hold the pruned widths
        if "cannot be pruned in place" not in str(e):
            raise
        inplace = False  # result.module is the pruned graph; the time includes compile's copy
    secs, res = timed(lambda: copy.deepcopy(model), prune)
    rep = fxprune.verify.equivalence(model, res, x)
    s = res.summary
    return {
        "ok": bool(rep.ok),
        "rel_err": rep.max_rel_err,
        "effect": rep.pruning_effect,
        "seconds": secs,
        "params_ratio": s.params_ratio,
        "macs_ratio": s.macs_ratio,
        "mode": res.plan.mode,
        "inplace": inplace,
    }


def run_tp(name: str) -> dict:
    import copy

    import torch
    import torch_pruning as tp

    model, x, head = build(name)
    macs0, params0 = tp.utils.count_ops_and_params(model, x)

    def prune(m):
        pruner = tp.pruner.MetaPruner(
            m,
            x,
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=RATIO,
            ignored_layers=[m.get_submodule(head)],
        )
        pruner.step()
        return m

    secs, model = timed(lambda: copy.deepcopy(model), prune)
    row = {"ok": False, "seconds": secs}
    try:
        with torch.no_grad():
            model(x)  # does the pruned model still run?
    except Exception as e:  # noqa: BLE001
        row["error"] = f"pruned model fails: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
        return row
    macs1, params1 = tp.utils.count_ops_and_params(model, x)
    return {
        "ok": True,
        "seconds": secs,
        "params_ratio": params1 / params0,
        "macs_ratio": macs1 / macs0,
    }


def child(name: str, tool: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        row = (run_fxprune if tool == "fxprune" else run_tp)(name)
    except Exception as e:  # noqa: BLE001 - a failure is a result here
        row = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    row["peak_mb"] = peak_mb()
    print("ROW " + json.dumps(row), flush=True)


def rss_mb(pid: int) -> float:
    total = 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total = int(line.split()[1]) / 1024
    except OSError:
        pass
    return total


def measure(name: str, tool: str, timeout: float, mem_mb: float) -> dict:
    cmd = [sys.executable, __file__, "--child", name, tool]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    t0, peak = time.time(), 0.0
    while p.poll() is None:
        peak = max(peak, rss_mb(p.pid))
        if peak > mem_mb:
            p.kill()
            p.wait()
            return {
                "ok": False,
                "error": f"killed: memory > {mem_mb / 1024:.0f} GB",
                "peak_mb": peak,
            }
        if time.time() - t0 > timeout:
            p.kill()
            p.wait()
            return {"ok": False, "error": f"killed: time > {timeout:.0f} s", "peak_mb": peak}
        time.sleep(0.2)
    out = p.stdout.read()
    for line in out.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    return {"ok": False, "error": f"crashed (exit {p.returncode})", "peak_mb": peak}


def fmt(r: dict, fx: bool) -> str:
    if not r.get("ok") and "error" in r:
        secs = f"{r['seconds']:.2f}" if "seconds" in r else ""
        return (
            f"FAIL: {r['error']} | " + ("| | " if fx else "") + f"{secs} | | | {r['peak_mb']:.0f}"
        )
    err = f"{r['rel_err']:.1e} | {r['effect']:.1e} | " if fx else ""
    ok = "yes" if r["ok"] else "NO"
    copied = "" if r.get("inplace", True) else " (copy)"  # not in place: see the module docstring
    return (
        f"{ok} | {err}{r['seconds']:.2f}{copied} | {r['params_ratio']:.3f} | "
        f"{r['macs_ratio']:.3f} | "
        f"{r['peak_mb']:.0f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--mem_gb", type=float, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    from importlib.metadata import version

    import torch
    import torchvision

    import fxprune

    names = a.models or torchvision.models.list_models(module=torchvision.models)
    print(
        f"# zoo: {len(names)} models, {RATIO:.0%} channels, l1, classifier ignored; s = best of "
        f"3 warm in-place graph+prune runs; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}, fxprune "
        f"{fxprune.__version__}, torch-pruning {version('torch-pruning')}; limits "
        f"{a.timeout:.0f} s / {a.mem_gb:.0f} GB per run\n"
    )
    print(
        "| model | fxprune ok | equiv. rel err | pruning effect | s | params | MACs | peak MB "
        "| TP ok | s | params | MACs | peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    counts = {"fxprune": 0, "tp": 0}
    for name in names:
        rows = {t: measure(name, t, a.timeout, a.mem_gb * 1024) for t in ("fxprune", "tp")}
        for t, r in rows.items():
            counts[t] += bool(r.get("ok"))
        print(f"| {name} | {fmt(rows['fxprune'], True)} | {fmt(rows['tp'], False)} |", flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps({"model": name, **rows}) + "\n")
    print(
        f"\nfxprune: {counts['fxprune']}/{len(names)} pruned with the equivalence check passing;"
        f" torch-pruning: {counts['tp']}/{len(names)} produced a model that runs (not checked)."
    )


if __name__ == "__main__":
    main()
