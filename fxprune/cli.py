"""The ``fxprune`` command line: tables to stdout, logs to stderr, ``--json`` for machines.

Exit codes: 0 success, 1 a failed check (equivalence, or a verify gate), 2 a usage or fxprune
error.
"""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """examples:
  fxprune prune torchvision:resnet50 --channels 0.5 --ignore fc
  fxprune prune torchvision:mobilenet_v2 --channels 0.3 --round_to 8 --save mnv2.pt
  fxprune prune my_model.py:build --channels 0.5 --importance l2 --json
  fxprune prune torchvision:resnet50 --channels 0.3 --round_to 4 --sparsity 2:4 --export r50.onnx
  fxprune prune torchvision:vit_b_16 --heads 0.25 --ffn 0.3 --blocks 2
  fxprune prune timm:deit_tiny_patch16_224 --heads 1 --blocks blocks.5
  fxprune verify torchvision:resnet50 --channels 0.5 --round_to 8 --ignore fc --batch 1 8
  fxprune verify torchvision:resnet18 --load r18.pt --backend torch --min-speedup 1.5
"""


def _number(s: str):
    """``"2"`` -> 2 (a count), ``"0.25"`` -> 0.25 (a fraction)."""
    return int(s) if s.isdigit() else float(s)


def _blocks(values: list[str]):
    if len(values) == 1 and values[0].isdigit():
        return int(values[0])  # a count
    return [int(v) if v.lstrip("-").isdigit() else v for v in values]


def _compile(a):
    """(dense model, example input, CompileResult) from the pruning flags or ``--load``."""
    import torch

    import fxprune
    from fxprune.models import load_model

    torch.manual_seed(a.seed)
    model, x = load_model(a.model)
    if getattr(a, "load", None):
        return model, x, fxprune.load(a.load, model, trust=a.trust)
    structural = a.heads or a.ffn or a.blocks
    channels = a.channels if a.channels is not None else (0.0 if structural else 0.5)
    res = fxprune.compile(
        model,
        x,
        channels=channels,
        heads=a.heads,
        ffn=a.ffn,
        blocks=_blocks(a.blocks) if a.blocks else 0,
        block_importance=a.block_importance,
        importance=a.importance,
        ignore=a.ignore,
        round_to=a.round_to,
        global_ranking=a.global_ranking,
        allow_approximate=a.allow_approximate,
        mode=a.mode,
        seed=a.seed,
        sparsity=a.sparsity,
        sparsity_exclude=a.sparsity_exclude,
        sparsity_permute=a.sparsity_permute,
    )
    return model, x, res


def _prune(a) -> int:
    import fxprune

    model, x, res = _compile(a)
    rep = fxprune.verify.equivalence(model, res, x)
    if a.save:
        res.save(a.save)
    exported = res.export(a.export) if a.export else None
    if a.json:
        print(
            json.dumps(
                {
                    "summary": res.summary.to_dict(),
                    "plan": res.plan.to_dict(),
                    "equivalence": vars(rep),
                    "barriers": res.barriers,
                    "seconds": res.seconds,
                    "export": str(exported.path) if exported else None,
                }
            )
        )
    else:
        print(f"{a.model}: traced with {res.plan.mode}, pruned in {res.seconds:.2f} s")
        print(res.report())
        print(f"\nequivalence check: {rep}")
        if a.save:
            print(f"saved plan + state_dict to {a.save}")
        if exported:
            print(exported.summary())
    return 0 if rep.ok else 1


def _verify(a) -> int:
    import fxprune

    model, x, res = _compile(a)
    eq = fxprune.verify.equivalence(model, res, x)
    lat = fxprune.verify.latency(
        model,
        res,
        x,
        backend=a.backend,
        batch_sizes=a.batch,
        warmup=a.warmup,
        repeats=a.repeats,
        threads=a.threads,
    )
    gates = []
    if not eq.ok:
        gates.append("the equivalence proof failed")
    if a.fail_if_slower and lat.slower():
        gates.append("the pruned model is slower at some batch size")
    if a.min_speedup is not None and lat.min_speedup() < a.min_speedup:
        gates.append(f"speedup {lat.min_speedup():.2f}x is below --min-speedup {a.min_speedup}")
    if a.json:
        out = json.loads(lat.to_json())
        out.update(equivalence=vars(eq), failed=gates, summary=res.summary.to_dict())
        print(json.dumps(out))
    else:
        print(
            f"{a.model}: MACs x{res.summary.macs_ratio:.3f}, params x{res.summary.params_ratio:.3f}"
        )
        print(lat.table())
        print(f"\nequivalence check: {eq}")
        for g in gates:
            print(f"FAILED: {g}")
    return 1 if gates else 0


def _add_pruning(pr) -> None:
    pr.add_argument("model", help="torchvision:NAME, timm:NAME or path/file.py:factory")
    pr.add_argument(
        "--channels",
        type=float,
        default=None,
        help="fraction removed per group (default 0.5, or 0 when --heads/--ffn/--blocks is given)",
    )
    pr.add_argument(
        "--heads", type=_number, default=0, help="fraction (or number) of heads per layer"
    )
    pr.add_argument("--ffn", type=float, default=0.0, help="fraction of MLP neurons per layer")
    pr.add_argument(
        "--blocks", nargs="*", default=[], help="a number of blocks to remove, or their names"
    )
    pr.add_argument("--block_importance", default="cosine", choices=["cosine", "l2"])
    pr.add_argument(
        "--importance",
        default="l1",
        help="l1, l2, bn_scale, random, taylor, activation, entropy or confidence",
    )
    pr.add_argument("--ignore", nargs="*", default=[], help="module names whose outputs stay")
    pr.add_argument("--round_to", type=int, default=None, help="default 1, or M with --sparsity")
    pr.add_argument("--global_ranking", action="store_true")
    pr.add_argument("--allow_approximate", action="store_true")
    pr.add_argument("--mode", default="auto", choices=["auto", "fx", "export"])
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--sparsity", help="N:M pattern after channel pruning, e.g. 2:4")
    pr.add_argument("--sparsity_exclude", nargs="*", default=[], help="modules kept dense")
    pr.add_argument(
        "--sparsity_permute",
        action="store_true",
        help="reorder channels first so the N:M mask keeps more weight magnitude",
    )
    pr.add_argument("--json", action="store_true")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="fxprune",
        description="Structural pruning with proof.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser(
        "prune",
        help="prune channels, heads, FFN neurons, blocks; prove equivalence",
        epilog=EXAMPLES,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    _add_pruning(pr)
    pr.add_argument("--save", help="write plan + state_dict here")
    pr.add_argument("--export", help="export the pruned model (model.onnx), checked and audited")
    ve = sub.add_parser(
        "verify",
        help="measure pruned vs dense latency on a backend, side by side",
        epilog=EXAMPLES,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    _add_pruning(ve)
    ve.add_argument("--load", help="a checkpoint written by `fxprune prune --save` instead")
    ve.add_argument("--trust", action="store_true", help="allow pickled code in --load")
    ve.add_argument("--backend", default="onnxruntime", help="onnxruntime, torch, torch-compile")
    ve.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    ve.add_argument("--warmup", type=int, default=5)
    ve.add_argument("--repeats", type=int, default=30, help="timed calls per model and batch")
    ve.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all)")
    ve.add_argument(
        "--fail-if-slower", dest="fail_if_slower", action="store_true", help="exit 1 if slower"
    )
    ve.add_argument(
        "--min-speedup", dest="min_speedup", type=float, default=None, help="exit 1 below this"
    )
    a = p.parse_args(argv)
    from fxprune.errors import FxPruneError

    try:
        return _prune(a) if a.cmd == "prune" else _verify(a)
    except FxPruneError as e:
        if a.debug:
            raise
        print(f"fxprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
