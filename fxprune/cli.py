"""The ``fxprune`` command line: tables to stdout, logs to stderr, ``--json`` for machines.

Exit codes: 0 success, 1 a failed check (equivalence), 2 a usage or fxprune error.
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
"""


def _number(s: str):
    """``"2"`` -> 2 (a count), ``"0.25"`` -> 0.25 (a fraction)."""
    return int(s) if s.isdigit() else float(s)


def _blocks(values: list[str]):
    if len(values) == 1 and values[0].isdigit():
        return int(values[0])  # a count
    return [int(v) if v.lstrip("-").isdigit() else v for v in values]


def _prune(a) -> int:
    import torch

    import fxprune
    from fxprune.models import load_model

    torch.manual_seed(a.seed)
    model, x = load_model(a.model)
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
    pr.add_argument("--save", help="write plan + state_dict here")
    pr.add_argument("--export", help="export the pruned model (model.onnx), checked and audited")
    pr.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from fxprune.errors import FxPruneError

    try:
        return _prune(a)
    except FxPruneError as e:
        if a.debug:
            raise
        print(f"fxprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
