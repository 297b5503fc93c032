"""CNN compile time against torch-pruning, side by side in one run, with where fxprune's goes.

The bar of issue #24: ``fxprune.compile(m, x, channels=0.5, ignore=[classifier], inplace=True)``
(the module tree built and checked against the graph module: traced to the graph's own code
over its own layers, or else run against it) against torch-pruning's
``MetaPruner(m, x, MagnitudeImportance(p=1), pruning_ratio=0.5)`` graph + ``step()``, each on a
fresh copy of the same randomly initialised torchvision model, one untimed warm-up each, then
the median of ``--repeats`` timed runs; 1 x 3 x 224 x 224, ``--threads`` torch threads. The
phase table times fxprune's steps in the median run by wrapping the functions ``compile``
calls (the wrappers cost microseconds); nested phases are indented.

    python benchmarks/cnn_compile_time.py                     # ResNet-50, ViT-B/16, DenseNet-121
    python benchmarks/cnn_compile_time.py --models resnet50 --repeats 5
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import platform
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
import fxprune.api as api  # noqa: E402
import fxprune.materialize as mat  # noqa: E402
import fxprune.passes as passes  # noqa: E402
import fxprune.passes.units as units  # noqa: E402
from tests.conftest import randomize  # noqa: E402

# (module, function, label): what compile calls, in order; indented labels run inside another
# compile's own copy module: a stand-in, so copy.deepcopy's recursion is not wrapped too
api.copy = types.SimpleNamespace(deepcopy=copy.deepcopy)
PHASES = [
    (api.copy, "deepcopy", "copy of the model"),
    (api, "shared_copy", "copy over the model's storage"),
    (api, "graph_capture", "capture"),
    (api, "train_refused", "train-mode check"),
    (api, "run_passes", "passes"),
    (passes, "build_graph", "  dependency graph"),
    (units, "select_units", "  importance + selection"),
    (units, "apply_removal", "  slicing + shape check"),
    (api, "module_tree", "module tree (result.model)"),
    (mat, "materialize", "  rebuild"),
    (mat, "same_capture", "  traced like the graph?"),
    (mat, "agreement", "  run against the graph"),
]


def build(name: str):
    import torchvision

    torch.manual_seed(0)
    model = randomize(torchvision.models.get_model(name, weights=None).eval())
    heads = (torch.nn.Linear, torch.nn.Conv2d)
    head = [n for n, m in model.named_modules() if isinstance(m, heads)][-1]
    return model, torch.randn(1, 3, 224, 224), head


def instrument() -> dict[str, float]:
    spent: dict[str, float] = collections.defaultdict(float)
    for mod, attr, label in PHASES:
        fn = getattr(mod, attr)

        def timed(*a, _fn=fn, _label=label, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[_label] += time.perf_counter() - t

        setattr(mod, attr, timed)
    return spent


def run_fxprune(base, x, head, spent):
    m = copy.deepcopy(base)
    spent.clear()
    t = time.perf_counter()
    fxprune.compile(m, x, channels=0.5, ignore=[head], inplace=True)
    return time.perf_counter() - t, dict(spent)


def run_tp(base, x, head):
    import torch_pruning as tp

    m = copy.deepcopy(base)
    t = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        m,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[m.get_submodule(head)],
    )
    pruner.step()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["resnet50", "vit_b_16", "densenet121"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    spent = instrument()
    import torch_pruning as tp

    print(
        f"# python benchmarks/cnn_compile_time.py {' '.join(argv or sys.argv[1:])}\n"
        f"# {platform.machine()}, {os.cpu_count()} cpus, {a.threads} threads, torch "
        f"{torch.__version__}, torch-pruning {tp.__version__}, fxprune {fxprune.__version__}; "
        f"medians of {a.repeats} after a warm-up each"
    )
    rows, phases = [], {}
    for name in a.models:
        base, x, head = build(name)
        run_fxprune(base, x, head, spent)
        run_tp(base, x, head)
        fx_runs, tp_runs = [], []
        for _ in range(a.repeats):  # interleaved, so drift hits both
            fx_runs.append(run_fxprune(base, x, head, spent))
            tp_runs.append(run_tp(base, x, head))
        fx_runs.sort(key=lambda r: r[0])
        fx_s, phase = fx_runs[len(fx_runs) // 2]
        tp_s = statistics.median(tp_runs)
        rows.append((name, fx_s, tp_s))
        phases[name] = phase
    print("\n| model | fxprune s | torch-pruning s | ratio (goal <= 0.5) |\n|---|---|---|---|")
    for name, fx_s, tp_s in rows:
        print(f"| {name} | {fx_s:.3f} | {tp_s:.3f} | {fx_s / tp_s:.2f}x |")
    print("\nfxprune's phases (s, the median run):\n")
    print("| phase | " + " | ".join(n for n, _, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for _, _, label in PHASES:
        cells = " | ".join(f"{phases[n].get(label, 0.0):.3f}" for n, _, _ in rows)
        print(f"| {label.replace('  ', '&nbsp;&nbsp;')} | {cells} |")


if __name__ == "__main__":
    main()
