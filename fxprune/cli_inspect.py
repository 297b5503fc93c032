"""``fxprune inspect``: the coupled channel groups of a model and the barriers that keep
channels (what pruning can take), or what fxprune recorded in an export: the hand-off metadata
of an ``.onnx`` file, the hand-off record of an ONNX Runtime GenAI folder (``--format genai``).
"""

from __future__ import annotations

import json
from pathlib import Path

from fxprune.cli_inputs import blame_inputs, is_checkpoint, open_checkpoint, shaped


def _inspect_handoff(a) -> int:
    """``inspect FILE.onnx`` (its metadata) or ``inspect DIR`` (a genai folder's hand-off
    record): what fxprune did. Exit 1, with ``--json`` too, when the record cannot be trusted
    or says a check failed (its ``failures``: a field changed, deleted or not covered by its
    sha256, a failed proof, N:M audit or token parity); a record that cannot be read (not
    JSON, a field of the wrong JSON type) is an fxprune error, exit 2."""
    from fxprune.exporters.metadata import describe, read_metadata

    if Path(a.model).is_dir():
        from fxprune.exporters.genai import read_handoff

        meta = read_handoff(a.model)
    else:
        meta = read_metadata(a.model)
    print(json.dumps(meta) if a.json else describe(meta, a.model))
    return 1 if meta.get("failures") else 0


def inspect_command(a, log) -> int:
    """``fxprune inspect``: a model's coupled channel groups and the barriers that keep
    channels, or the hand-off record of an exported file / genai folder."""
    import torch

    from fxprune.exporters.genai import HANDOFF
    from fxprune.graph import build_graph, trace
    from fxprune.models import load_model
    from fxprune.passes.units import group_name

    if Path(a.model).suffix == ".onnx" or (Path(a.model) / HANDOFF).is_file():
        return _inspect_handoff(a)
    if is_checkpoint(a.model):
        _, x, res, _ = open_checkpoint(a.model, a.trust)
        model = res.module
    else:
        log(f"building {a.model}")
        torch.manual_seed(a.seed)
        model, x = load_model(a.model, trust=a.trust)
    x = shaped(a, model, x)
    log("tracing")
    with blame_inputs(model, x):
        traced = trace(model, x, mode=a.mode)
    log("building the dependency graph")
    g = build_graph(traced.gm, allow_approximate=a.allow_approximate)
    log(None)
    groups = []
    for grp in g.groups:
        free = int((~g.blocked[grp.units]).sum())
        groups.append(
            {
                "id": grp.id,
                "name": group_name(g, grp),
                "kind": grp.kind,
                "units": len(grp.units),
                "prunable": free,
                "width": grp.width,
                "approximate": grp.approximate,
                "layers": grp.layers(g),
            }
        )
    barriers = g.barrier_report()
    if a.json:
        print(json.dumps({"mode": traced.mode, "groups": groups, "barriers": barriers}))
        return 0
    prunable = sum(1 for r in groups if r["prunable"])
    print(
        f"{a.model}: traced with {traced.mode}; {len(g.sources)} layers create channels; "
        f"{len(groups)} groups ({prunable} with prunable units); {len(barriers)} barriers"
    )
    shown = groups if a.all else groups[: a.top]
    print("\n| group | kind | prunable / units | width | layers |")
    print("|---|---|---|---|---|")
    for r in shown:
        layers = ", ".join(r["layers"][:4]) + (
            f" (+{len(r['layers']) - 4})" if len(r["layers"]) > 4 else ""
        )
        flag = " (approximate)" if r["approximate"] else ""
        print(
            f"| {r['name']} | {r['kind']}{flag} | {r['prunable']} / {r['units']} "
            f"| {r['width']} | {layers} |"
        )
    if len(shown) < len(groups):
        print(f"... {len(groups) - len(shown)} more groups (--all shows them)")
    if barriers:
        print("\nbarriers (what keeps channels, and why):")
        for b in barriers[: (None if a.all else a.top)]:
            layers = ", ".join(b["layers"][:3]) + (" ..." if len(b["layers"]) > 3 else "")
            print(f"  {b['node']} ({b['op']}): {b['reason']} -> {layers}")
    return 0
