"""``fxprune.compile`` and ``fxprune.apply_plan``: copy -> trace -> dependency graph -> passes."""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from fxprune.calibration import default_loss
from fxprune.errors import ConfigError, PlanError
from fxprune.graph import trace
from fxprune.graph.trace import as_args
from fxprune.hf import pruned_config
from fxprune.passes import run_passes
from fxprune.passes.blocks import Blocks, prune_blocks
from fxprune.passes.channels import Channels, prune_channels
from fxprune.passes.ffn import FFN, prune_ffn
from fxprune.passes.heads import Heads, prune_heads
from fxprune.passes.nm import NM, prune_nm
from fxprune.passes.permute import Permute, permute_channels
from fxprune.plan import CompileResult, LayerRow, Plan, Summary
from fxprune.stats import layer_stats

# How a plan entry replays: pass name -> (pass function, entry -> config)
PASSES = {
    "blocks": (prune_blocks, lambda e: Blocks(tuple(e["removed"]))),
    "heads": (prune_heads, lambda e: Heads(kept=e["kept"])),
    "ffn": (prune_ffn, lambda e: FFN(kept=e["kept"])),
    "channels": (prune_channels, lambda e: Channels(kept=e["kept"])),
    "permute": (permute_channels, lambda e: Permute(e["n"], e["m"], orders=e["orders"])),
    "nm": (
        prune_nm,
        lambda e: NM(
            e["n"], e["m"], layers=tuple(e["layers"]), method=e.get("method", "magnitude")
        ),
    ),
}


def resolve_names(model: nn.Module, patterns, what: str) -> tuple[str, ...]:
    """Expand names / globs / module types to module names; unknown entries are an error."""
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for p in patterns:
        if isinstance(p, type):
            hit = [n for n, m in model.named_modules() if n and isinstance(m, p)]
            if not hit:
                raise ConfigError(f"{what}: no module of type {p.__name__} in the model")
            out += hit
        elif isinstance(p, nn.Module):
            hit = [n for n, m in model.named_modules() if m is p]
            if not hit:
                raise ConfigError(f"{what}: the given {type(p).__name__} is not part of the model")
            out += hit
        elif isinstance(p, str):
            hit = [n for n in names if n == p or fnmatch.fnmatchcase(n, p)]
            if not hit:
                close = [n for n in names if p.split(".")[-1] in n][:3]
                raise ConfigError(
                    f"{what}: {p!r} matches no module name"
                    + (f" (did you mean {close}?)" if close else "")
                )
            out.append(p)
        else:
            raise ConfigError(f"{what}: entries must be names, module types or modules, got {p!r}")
    return tuple(out)


def _summary(before: dict, after: dict) -> Summary:
    rows = []
    for layer in sorted(set(before) | set(after)):
        b, a = (
            before.get(layer, {"params": 0, "macs": 0}),
            after.get(layer, {"params": 0, "macs": 0}),
        )
        rows.append(LayerRow(layer, b["params"], a["params"], b["macs"], a["macs"]))
    return Summary(rows)


def _inputs_spec(args: tuple) -> list[dict]:
    spec = []
    for a in args:
        if not isinstance(a, torch.Tensor):
            raise ConfigError(f"example_inputs must be tensors, got {type(a).__name__}")
        spec.append({"shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch.")})
    return spec


def hidden_attention(gm) -> list[str]:
    """Nodes where torch.fx stopped at an attention it cannot see into (``nn.MultiheadAttention``
    is a leaf module; torchvision's ``shifted_window_attention`` is an ``fx.wrap`` function)."""
    from fxprune.graph.rules import find_rule

    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.MultiheadAttention) and find_rule(gm, node) is None:
                out.append(node.target)
        elif node.op == "call_function" and find_rule(gm, node) is None:
            if "attention" in getattr(node.target, "__name__", "").lower():
                out.append(node.name)
    return out


def _run(model, args, passes, mode, leaf_modules, allow_approximate, inplace, config):
    t0 = time.perf_counter()
    work = model if inplace else copy.deepcopy(model)
    was_training = model.training
    work.eval()
    traced = trace(work, args, mode=mode, leaf_modules=leaf_modules)
    if (
        mode == "auto"
        and traced.mode == "fx"
        and any(fn is prune_heads for fn, _ in passes)
        and hidden_attention(traced.gm)
    ):
        # torch.export decomposes attention into ops whose heads the graph can follow
        traced = trace(work, args, mode="export", leaf_modules=leaf_modules)
    gm = traced.gm
    before = layer_stats(gm)
    graph, results = run_passes(gm, passes, args, allow_approximate=allow_approximate)
    barriers = graph.barrier_report()
    after = layer_stats(gm)
    gm.train(was_training)
    model.train(was_training)
    plan = Plan(
        traced.mode,
        _inputs_spec(args),
        config,
        [r.plan for r in results if r.plan],
    )
    hf_config, notes = pruned_config(model, results)
    if notes:
        plan.config["hf_config_notes"] = notes
    return CompileResult(
        gm,
        plan,
        _summary(before, after),
        barriers,
        results,
        approximate=any(r.approximate_groups for r in results),
        seconds=time.perf_counter() - t0,
        config=hf_config,
    )


def compile(  # noqa: A001 - the public name the project promises
    model: nn.Module,
    example_inputs,
    *,
    channels: float = 0.0,
    heads: float | int = 0.0,
    ffn: float = 0.0,
    blocks: int | Sequence[int | str] = 0,
    importance: str = "l1",
    block_importance: str = "cosine",
    calibration=None,
    loss_fn=None,
    ignore: Sequence[str | type | nn.Module] = (),
    layer_ratios: Mapping[str, float] | None = None,
    head_ratios: Mapping[str, float] | None = None,
    ffn_ratios: Mapping[str, float] | None = None,
    round_to: int | None = None,
    min_channels: int = 1,
    min_heads: int = 1,
    global_ranking: bool = False,
    allow_approximate: bool = False,
    mode: str = "auto",
    leaf_modules: Sequence[str | type] = (),
    inplace: bool = False,
    seed: int = 0,
    sparsity: str | None = None,
    sparsity_include: Sequence[str] = (),
    sparsity_exclude: Sequence[str] = (),
    sparsity_permute: bool = False,
    sparsity_method: str = "magnitude",
) -> CompileResult:
    """Prune ``model`` structurally and return the smaller model with its plan and summary.

    Args:
        model: the dense model. It is copied and left untouched unless ``inplace=True``.
        example_inputs: a tensor or tuple of tensors with the shapes used at inference.
        channels: fraction of each coupled group's channels to remove, in [0, 1). Attention
            heads are never removed by it; MLP neurons are, unless ``ffn`` is given.
        heads: fraction of each attention layer's heads to remove, in [0, 1), or an ``int``
            number of heads per layer. Under grouped-query attention a unit is one key/value
            head with its query heads.
        ffn: fraction of each transformer MLP's hidden neurons to remove, in [0, 1) (gated
            MLPs: ``gate_proj`` and ``up_proj`` together).
        blocks: a number of whole blocks (transformer layers) to remove, chosen by
            ``block_importance`` on ``calibration``; or the blocks: indices into the model's
            main stack of repeated blocks or module names. Approximate by nature: the pass
            reports the measured output deviation.
        importance: ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"random"`` (weights only), or
            ``"taylor"``, ``"activation"``, ``"entropy"``, ``"confidence"`` (measured on
            ``calibration``; the last two score attention heads, other groups fall back to
            ``"l1"``), scored over every weight of the coupled group.
        block_importance: ``"cosine"`` (1 - cosine of a block's input and output) or ``"l2"``.
        calibration: an iterable of batches (each like ``example_inputs``) for data-driven
            choices; default: ``example_inputs``.
        loss_fn: ``loss_fn(output, batch) -> scalar`` for ``importance="taylor"`` (default: the
            LM loss for Hugging Face causal / masked LMs, else the mean squared output, a proxy;
            ``details["taylor_loss"]`` of the pass says which).
        ignore: modules (names, globs, parent modules, types or module objects) whose output
            channels stay (a classifier keeps its outputs; its inputs may still shrink).
        layer_ratios: per-layer overrides ``{name or glob: ratio}`` of ``channels`` (first match
            wins; a group follows the first override naming one of its layers).
        head_ratios: the same for ``heads`` (name a q/k/v projection of the attention layer);
            given alone it prunes only the named layers.
        ffn_ratios: the same for ``ffn`` (name the MLP's first Linear).
        round_to: kept channels per group are a multiple of this (8/16/64 for tensor cores).
            Default: 1, or M when ``sparsity="N:M"`` is set, so pruned layers stay N:M-eligible.
        min_channels: never keep fewer channels than this in a group.
        min_heads: never keep fewer heads than this in an attention layer.
        global_ranking: rank channels across groups instead of a ratio per group.
        allow_approximate: also prune groups whose removal cannot be exact (a LayerNorm over
            the channel dim); they are reported as approximate.
        mode: ``"auto"`` (torch.fx, then torch.export), ``"fx"`` or ``"export"``.
        leaf_modules: submodules torch.fx must not trace into (their channels are kept).
        inplace: prune ``model``'s own layers (the runnable result is still ``.module``).
        seed: for ``importance="random"``.
        sparsity: ``"2:4"`` (any ``"N:M"``): after the structural passes, keep the N largest of
            every M weights along the reduction axis of each eligible Linear / Conv.
        sparsity_include: module names / globs the N:M pass considers (default: all).
        sparsity_exclude: module names / globs it never touches.
        sparsity_permute: before masking, reorder channels (consistently across every coupled
            layer, so the model is unchanged) to raise the weight magnitude the N:M mask keeps;
            ``passes`` report it before and after.
        sparsity_method: how the N:M pass picks the N of every M: ``"magnitude"``,
            ``"wanda"`` (|w| x input norm on ``calibration``) or ``"sparsegpt"`` (layer-wise
            second-order reconstruction on ``calibration``; kept weights are updated).

    Returns:
        A :class:`fxprune.plan.CompileResult` with ``.module``, ``.plan``, ``.summary``.

    Raises:
        ConfigError: an option is out of range or names nothing in the model.
        TraceError: the model could not be captured (the message names the part).
        UnsupportedModelError: tied weights or non-tensor outputs.

    Example:
        >>> import torch, torchvision, fxprune
        >>> m = torchvision.models.resnet18()
        >>> r = fxprune.compile(m, torch.randn(1, 3, 224, 224), channels=0.5, ignore=["fc"])
        >>> r.summary.params_ratio < 0.35
        True
    """
    args = as_args(example_inputs)
    _inputs_spec(args)
    ignore_t = resolve_names(model, ignore, "ignore")
    ratios = tuple((layer_ratios or {}).items())
    nm = None
    if sparsity is not None:
        resolve_names(model, list(sparsity_include) + list(sparsity_exclude), "sparsity filters")
        nm = NM.parse(
            sparsity,
            include=tuple(sparsity_include),
            exclude=tuple(sparsity_exclude),
            method=sparsity_method,
            calibration=None if calibration is None else tuple(calibration),
        )
    if round_to is None:
        round_to = nm.m if nm is not None else 1
    resolve_names(model, [k for k, _ in ratios], "layer_ratios")
    h_ratios = tuple((head_ratios or {}).items())
    f_ratios = tuple((ffn_ratios or {}).items())
    resolve_names(model, [k for k, _ in h_ratios], "head_ratios")
    resolve_names(model, [k for k, _ in f_ratios], "ffn_ratios")
    batches = None if calibration is None else tuple(calibration)
    shared = dict(
        importance=importance,
        ignore=ignore_t,
        global_ranking=global_ranking,
        seed=seed,
        calibration=batches,
        loss_fn=loss_fn if loss_fn is not None else default_loss(model),
    )
    cfg = Channels(
        channels,
        layer_ratios=ratios,
        round_to=round_to,
        min_channels=min_channels,
        kinds=("channels",) if ffn or f_ratios else ("channels", "ffn"),
        **shared,
    )
    passes = []
    if blocks:
        which = blocks if isinstance(blocks, int) else tuple(blocks)
        passes.append((prune_blocks, Blocks(which, block_importance, batches)))
    if heads or h_ratios:
        passes.append(
            (prune_heads, Heads(heads, min_heads=min_heads, layer_ratios=h_ratios, **shared))
        )
    if ffn or f_ratios:
        ffn_cfg = FFN(
            ffn, round_to=round_to, min_channels=min_channels, layer_ratios=f_ratios, **shared
        )
        passes.append((prune_ffn, ffn_cfg))
    if channels or ratios:
        passes.append((prune_channels, cfg))
    config = {
        "channels": channels,
        "heads": heads,
        "ffn": ffn,
        "blocks": blocks if isinstance(blocks, int) else list(blocks),
        "block_importance": block_importance,
        "min_heads": min_heads,
        "importance": importance,
        "ignore": list(ignore_t),
        "layer_ratios": dict(ratios),
        "head_ratios": dict(h_ratios),
        "ffn_ratios": dict(f_ratios),
        "round_to": round_to,
        "min_channels": min_channels,
        "global_ranking": global_ranking,
        "allow_approximate": allow_approximate,
        "seed": seed,
    }
    if sparsity_method != "magnitude" and nm is None:
        raise ConfigError(f"sparsity_method={sparsity_method!r} needs sparsity='N:M' (e.g. '2:4')")
    if sparsity_permute and nm is None:
        raise ConfigError("sparsity_permute=True needs sparsity='N:M'")
    if nm is not None:
        if sparsity_permute:
            passes.append((permute_channels, Permute(nm.n, nm.m, seed=seed)))
        passes.append((prune_nm, nm))
        config.update(
            sparsity=sparsity,
            sparsity_include=list(sparsity_include),
            sparsity_exclude=list(sparsity_exclude),
            sparsity_permute=sparsity_permute,
            sparsity_method=sparsity_method,
        )
    return _run(model, args, passes, mode, leaf_modules, allow_approximate, inplace, config)


def apply_plan(
    model: nn.Module,
    plan: Plan | dict | str,
    example_inputs=None,
    leaf_modules: Sequence[str | type] = (),
    _weights_follow: bool = False,
) -> CompileResult:
    """Rebuild a plan's pruned architecture from a fresh dense ``model`` (weights sliced from it).

    Load a saved pruned state_dict into ``result.module`` afterwards, or use :func:`load`.
    ``example_inputs`` default to zeros of the shapes recorded in the plan.
    """
    if isinstance(plan, str):
        plan = Plan.from_json(plan)
    elif isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    args = as_args(example_inputs) if example_inputs is not None else plan.example_inputs()
    data_nm = [e.get("method") for e in plan.passes if e["name"] == "nm"]
    data_nm = [m for m in data_nm if m not in (None, "magnitude")]
    if data_nm and not _weights_follow:
        raise PlanError(
            f"this plan's N:M masks were chosen by {data_nm[0]!r} on calibration data and cannot "
            "be recomputed from the dense weights; open the checkpoint with "
            "fxprune.load(path, model), which reads the masks off the saved weights"
        )
    passes = []
    for entry in plan.passes:
        if entry["name"] not in PASSES:
            raise ConfigError(f"plan has unknown pass {entry['name']!r}")
        fn, make_cfg = PASSES[entry["name"]]
        passes.append((fn, make_cfg(entry)))
    allow = bool(plan.config.get("allow_approximate", False))
    return _run(model, args, passes, plan.mode, leaf_modules, allow, False, plan.config)


def load(path: str | Path, model: nn.Module, trust: bool = False) -> CompileResult:
    """Load a checkpoint written by ``CompileResult.save`` onto a fresh dense ``model``.

    Uses ``torch.load(weights_only=True)`` unless ``trust=True``.
    """
    ckpt = torch.load(path, weights_only=not trust, map_location="cpu")
    res = apply_plan(model, ckpt["plan"], _weights_follow=True)
    res.module.load_state_dict(ckpt["state_dict"])
    from fxprune.passes.nm import masks_from_weights

    for p in res.passes:  # the saved weights carry the pattern the plan's method chose
        if p.name == "nm" and p.masks:
            p.masks.update(
                masks_from_weights(res.module, list(p.masks), p.details["n"], p.details["m"])
            )
            if p.details.get("method") == "sparsegpt":
                p.updated = {k: res.module.get_parameter(k).detach().clone() for k in p.masks}
    return res
