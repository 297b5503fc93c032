"""Unstructured sparsity, priced honestly: what it saves (bytes) and what it does not (time).

Three tables, each measured side by side in one run:

1. latency, dense vs 50 / 70 / 90 % unstructured (layer-wise magnitude) beside 2:4 and a
   structured row, on the verifier's ``torch`` (eager CPU) and ``onnxruntime`` (CPU EP)
   backends, with the estimator's CPU speedup for the same scenario;
2. checkpoint bytes: the dense checkpoint against ``save(compress="bitmask" | "csr")``, and the
   estimator's prediction for those weights;
3. fidelity on real weights: all-MiniLM-L6-v2's sentence embeddings (cosine to the dense ones,
   200 sentences), magnitude against Wanda, layer scope against global.

    python benchmarks/unstructured.py            # ResNet-50 and MiniLM
    python benchmarks/unstructured.py --quick    # ResNet-18 at 112 px, fewer repeats
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
from benchmarks import _minilm as mini  # noqa: E402

LEVELS = (0.5, 0.7, 0.9)


def _cases(structured: tuple[str, dict]) -> list[tuple[str, dict, str | None]]:
    """(row name, compile options, the estimator scenario that prices it; None: structured)."""
    rows = [(f"unstructured {s:.0%}", {"unstructured": s}, f"unstructured {s:.0%}") for s in LEVELS]
    rows.append(("2:4 (magnitude)", {"sparsity": "2:4"}, "2:4"))
    rows.append((structured[0], structured[1], None))
    return rows


def _est_speedup(est, name: str | None) -> str:
    if name is None:
        scenario = next(s for s in est.scenarios if s.name.startswith("structured"))
    else:
        scenario = next(s for s in est.scenarios if s.name.startswith(name.split(" (")[0]))
    return f"{scenario.speedup['cpu'][1]:.2f}x"


def latency_table(model, x, structured: tuple[str, dict], repeats: int) -> None:
    print(
        "| model | pruning | backend | dense ms | pruned ms | speedup [rounds p10-p90] "
        "| MAC ratio | estimate (cpu) | noise |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, opts, scenario in _cases(structured):
        res = fxprune.compile(model, x, **opts)
        assert fxprune.verify.equivalence(model, res, x).ok
        s = next(iter(opts.values())) if "unstructured" in opts else 0.9
        est = fxprune.estimate(
            model,
            x,
            sparsity=s,
            nm="2:4",
            structured=res if scenario is None else None,
            hardware=("cpu",),
            batch_sizes=(1,),
        )
        for backend in ("torch", "onnxruntime"):
            rep = fxprune.verify.latency(
                model, res, x, backend=backend, batch_sizes=(1,), repeats=repeats
            )
            r = rep.rows[0]
            print(
                f"| {type(model).__name__} | {name} | {backend} | {r.dense_ms:.2f} | "
                f"{r.pruned_ms:.2f} | {r.speedup:.2f}x [{r.speedup_p10:.2f}-{r.speedup_p90:.2f}] "
                f"| {r.mac_ratio:.3f} | {_est_speedup(est, scenario)} | "
                f"{'NOISY: ' + '; '.join(r.noise) if r.noisy else 'ok'} |",
                flush=True,
            )


def bytes_table(model, x) -> None:
    print(
        "\n| model | sparsity | dense .pt MB | bitmask .pt MB | CSR .pt MB "
        "| masked weights: bitmask / CSR / estimate (bitmask, CSR) MB |"
    )
    print("|---|---|---|---|---|---|")
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        for s in LEVELS:
            res = fxprune.compile(model, x, unstructured=s)
            files = {}
            stored = {}
            for how in (None, "bitmask", "csr"):
                path = Path(d) / f"{how}.pt"
                sizes = res.save(path, compress=how)
                files[how] = path.stat().st_size / 1e6
                if sizes:
                    stored[how] = sizes["stored"] / 1e6
                    again = fxprune.load(path, model)
                    want, got = res.module.state_dict(), again.module.state_dict()
                    assert all(torch.equal(want[k], got[k]) for k in want)  # exact
            est = fxprune.estimate(
                model, x, sparsity=s, nm=None, structured=None, hardware=("cpu",), batch_sizes=(1,)
            )
            sc = next(c for c in est.scenarios if c.name.startswith("unstructured"))
            masked = sum(res.module.get_parameter(k).numel() for k in res.masks)
            rest = 4 * (params - masked)
            pred = {k: (sc.bytes[k]["fp32"] - rest) / 1e6 for k in ("bitmask", "CSR")}
            print(
                f"| {type(model).__name__} | {s:.0%} | {files[None]:.1f} | {files['bitmask']:.1f} | "
                f"{files['csr']:.1f} | {stored['bitmask']:.2f} / {stored['csr']:.2f} / "
                f"{pred['bitmask']:.2f}, {pred['CSR']:.2f} |",
                flush=True,
            )


def fidelity_table() -> None:
    model, tok = mini.load()
    evals = mini.batches(tok, mini.eval_sentences(), 50)
    calib = mini.batches(tok, mini.calibration_sentences(), 20)
    dense = mini.embed(model, evals)
    print("\n| all-MiniLM-L6-v2, every Linear | sparsity | mean cosine | min cosine |")
    print("|---|---|---|---|")
    rows = [("magnitude, layer", {}), ("magnitude, global", {"unstructured_scope": "global"})]
    rows.append(("wanda, layer", {"unstructured_method": "wanda", "calibration": calib}))
    for s in LEVELS:
        for name, kw in rows:
            res = fxprune.compile(model, evals[0], unstructured=s, **kw)
            assert fxprune.verify.equivalence(model, res, evals[0]).ok
            cos = (mini.embed(res.module, evals) * dense).sum(1)
            print(f"| {name} | {s:.0%} | {cos.mean():.4f} | {cos.min():.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 at 112 px, 10 repeats")
    a = ap.parse_args()
    import torchvision

    torch.manual_seed(0)
    print(
        f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"fxprune {fxprune.__version__}\n"
    )
    if a.quick:
        model, x, repeats = torchvision.models.resnet18().eval(), torch.randn(1, 3, 112, 112), 10
    else:
        model, x, repeats = torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224), 30
    latency_table(model, x, ("channels 50 %", {"channels": 0.5, "ignore": ["fc"]}), repeats)
    bytes_table(model, x)
    if not a.quick:
        fidelity_table()


if __name__ == "__main__":
    main()
