"""``fxprune.compile``: copy -> trace -> dependency graph -> passes (``fxprune.replay`` replays a
saved plan through the same :func:`run`)."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Mapping, Sequence

import torch.nn as nn

from fxprune._util import is_default
from fxprune.errors import ConfigError
from fxprune.graph.capture import capture as graph_capture
from fxprune.graph.capture import without_cache
from fxprune.graph.trace import as_args, retarget
from fxprune.hf import pruned_config
from fxprune.importance import AUTO, Criterion, resolve
from fxprune.materialize import module_tree
from fxprune.models import default_example
from fxprune.modelstate import (
    check_hooks,
    commit_inplace,
    guard_training,
    restore_training,
    shared_copy,
    train_refused,
    training_flags,
)
from fxprune.options import RECIPE_OPTIONS, from_options
from fxprune.passes import check_masks_disjoint, run_passes
from fxprune.passes.heads import Heads
from fxprune.passes.units import UnitSelection
from fxprune.plan import CompileResult, Plan, Summary, inputs_spec
from fxprune.recipe import Recipe, check_recipe, with_runtime
from fxprune.stats import layer_stats
from fxprune.uniform import check_uniform, uniform_scope


def writes_nothing(cfg) -> bool:
    """A data-free unit pass with a built-in criterion (channels / heads / FFN by weight
    magnitude): it replaces tensors with sliced ones and writes into none of the model's."""
    if not isinstance(cfg, UnitSelection) or cfg.calibration is not None:
        return False
    if cfg.train_fn is not None or cfg.loss_fn is not None:
        return False
    crit = resolve("l1" if cfg.importance == AUTO else cfg.importance)
    return crit.needs is None and type(crit).__module__ == Criterion.__module__


def run(
    model,
    args,
    passes,
    mode,
    leaf_modules,
    allow_approximate,
    inplace,
    config,
    dynamic=None,
    capture=None,
):
    """Prune a copy of ``model``: capture it on ``args``, run ``passes``, rebuild the user's
    module tree and commit it (``inplace``); what :func:`compile` and
    :func:`fxprune.replay.apply_plan` both call."""
    t0 = time.perf_counter()
    check_hooks(model)
    flags = training_flags(model)
    # always a copy: inplace=True commits it into the model at the end, so a failure anywhere
    # leaves the model exactly as it was. Passes that write into no tensor share its storage
    # when the model becomes the result (inplace) or is the caller's own block (capture=: the
    # stream, which proves against it and then drops it)
    shares = (inplace or capture is not None) and all(map(writes_nothing, passes))
    work = shared_copy(model) if shares else copy.deepcopy(model)
    work.eval()
    if capture is not None:  # a repeated block: its twin's graph over this copy's tensors
        with without_cache(work):
            traced = retarget(capture, work, args)
    else:
        heads = any(isinstance(cfg, Heads) for cfg in passes)
        traced = graph_capture(
            work, args, mode=mode, leaf_modules=leaf_modules, dynamic_shapes=dynamic, heads=heads
        )
    refused = train_refused(work, args, traced, leaf_modules, dynamic)
    gm = traced.gm
    before = layer_stats(gm)
    if config.get("uniform"):  # a config counts the repeated layers: the rest stays whole
        passes, whole = uniform_scope(work, passes)
        if whole:
            config = {**config, "uniform_kept_whole": list(whole)}
    graph, results = run_passes(gm, passes, args, allow_approximate=allow_approximate)
    check_masks_disjoint(results)
    barriers = graph.barrier_report()
    if config.get("uniform"):
        check_uniform(results)
    after = layer_stats(gm)
    restore_training(gm, flags)  # fx: gm's layers are the copy's; each keeps the user's flag
    if refused:
        guard_training(gm, refused)
        if not inplace:
            nn.Module.train(gm, False)  # it cannot train: say so rather than look like it does
    hf_config, notes = pruned_config(model, results)
    fx_leaves = leaf_modules if traced.mode == "fx" else None  # a tree that traces like gm
    tree, why = module_tree(work, gm, results, hf_config, args, fx_leaves)
    if inplace and why:
        raise ConfigError(
            f"inplace=True: {type(model).__name__} cannot be pruned in place ({why}); it is "
            "unchanged. Drop inplace=True: result.module is the pruned graph module"
        )
    if tree is work:
        restore_training(work, flags)
    if inplace:
        commit_inplace(model, work)
        tree = model
    plan = Plan(
        traced.mode,
        inputs_spec(args),
        config,
        [r.plan for r in results if r.plan],
    )
    plan.config["dynamic_shapes"] = traced.dynamic  # replay captures with the same free dims
    if notes:
        plan.config["hf_config_notes"] = notes
    return CompileResult(
        gm,
        plan,
        Summary.between(before, after),
        barriers,
        results,
        approximate=any(r.approximate_groups for r in results),
        seconds=time.perf_counter() - t0,
        config=hf_config,
        model=tree,
        model_note=why,
    )


def compile(  # noqa: A001 - the public name the project promises
    model: nn.Module,
    example_inputs=None,
    recipe: Recipe | None = None,
    *,
    channels: float = 0.0,
    heads: float | int = 0.0,
    ffn: float = 0.0,
    blocks: int | Sequence[int | str] = 0,
    experts: float | int = 0.0,
    importance: str | Criterion = "auto",
    block_importance: str = "cosine",
    expert_importance: str = "weight",
    calibration=None,
    calibration_batches: int | None = None,
    loss_fn=None,
    train_fn=None,
    ignore: Sequence[str | type | nn.Module] = (),
    layer_ratios: Mapping[str, float] | None = None,
    head_ratios: Mapping[str, float] | None = None,
    ffn_ratios: Mapping[str, float] | None = None,
    round_to: int | str | None = None,
    round_backend: str = "torch",
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
    unstructured: float = 0.0,
    unstructured_scope: str = "layer",
    unstructured_method: str = "magnitude",
    unstructured_include: Sequence[str] = (),
    unstructured_exclude: Sequence[str] = (),
    dynamic_shapes=None,
    uniform: bool = False,
    heads_round: str | None = None,
    capture=None,
) -> CompileResult:
    """Prune ``model`` structurally and return the smaller model with its plan and summary.

    Args:
        model: the dense model. It is copied and left untouched unless ``inplace=True``.
        example_inputs: a tensor or tuple of tensors with the shapes used at inference. May be
            left out for a model that says what it takes (Hugging Face: token ids of its
            vocabulary with an attention mask, 1 x 16, or pixels; timm: its
            ``pretrained_cfg["input_size"]``; torchvision classifiers: 1 x 3 x 224 x 224);
            ``result.example_note`` says what was used. Random inputs shape the trace only:
            data-driven criteria still need ``calibration=``.
        recipe: a :class:`fxprune.Recipe` (the passes and capture options as data, e.g.
            ``fxprune.Recipe.load("r.json")``). With a recipe, only the runtime arguments
            (``calibration``, ``calibration_batches``, ``loss_fn``, ``inplace``,
            ``dynamic_shapes``) may be given besides; the other keywords build the same
            recipe (``result.plan.config["recipe"]``).
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
        experts: fraction of each mixture-of-experts layer's routed experts to remove, in
            [0, 1), or an ``int`` per layer, chosen by ``expert_importance`` on
            ``calibration``; their router rows go, so tokens pick their top-k among the rest.
            Approximate by nature: the pass reports the measured output deviation.
        importance: ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"random"`` (weights only), or
            ``"taylor"``, ``"activation"``, ``"entropy"``, ``"confidence"`` (measured on
            ``calibration``; the last two score attention heads, other groups fall back to
            ``"l1"``), scored over every weight of the coupled group; also ``"fpgm"``,
            ``"lamp"``, any name registered with ``@fxprune.importance.criterion``, or a
            :class:`fxprune.importance.Criterion` instance (the plan records its ``name``).
        block_importance: ``"cosine"`` (1 - cosine of a block's input and output) or ``"l2"``.
        expert_importance: ``"weight"`` (the router scores an expert got in tokens' top-k) or
            ``"frequency"`` (how many tokens chose it).
        calibration: an iterable of batches (each like ``example_inputs``) for data-driven
            choices; default: ``example_inputs``. Read lazily, and only when an option measures
            on it (data-driven ``importance``, ``blocks``, ``sparsity_method``): a weight-only
            criterion never iterates it. A batch with NaN or Inf values is refused.
        calibration_batches: how many batches to take from ``calibration`` at most (an endless
            generator is fine); default: 128.
        loss_fn: ``loss_fn(output, batch) -> scalar`` for ``importance="taylor"`` (default: the
            LM loss for Hugging Face causal / masked LMs, else the mean squared output, a proxy;
            the pass result's ``taylor_loss`` says which).
        train_fn: ``train_fn(gated_module)`` for ``importance="learned"``: your training loop
            (a few steps), run on a copy with a trainable gate per unit; units go by gate value.
        ignore: modules (names, globs, parent modules, types or module objects) whose output
            channels stay (a classifier keeps its outputs; its inputs may still shrink).
        layer_ratios: per-layer overrides ``{name or glob: ratio}`` of ``channels`` (first match
            wins; a group follows the first override naming one of its layers).
        head_ratios: the same for ``heads`` (name a q/k/v projection of the attention layer);
            given alone it prunes only the named layers.
        ffn_ratios: the same for ``ffn`` (name the MLP's first Linear).
        round_to: kept channels per group are a multiple of this (8/16/64 for tensor cores), or
            ``"auto"``: the plain count or the next multiple of 8 / 16 / 32, whichever the
            group's layers run fastest at on ``round_backend`` (``"torch"``, ``"onnxruntime"``).
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
        unstructured: fraction of the Linear / Conv weights to zero, no shape changed (after
            the structural passes; a weight gets this or N:M, never both). It saves storage
            (``result.save(path, compress="bitmask")``), not time on stock kernels.
        unstructured_scope: ``"layer"`` (that fraction of every weight) or ``"global"`` (of
            all of them, ranked together). ``unstructured_method``: ``"magnitude"`` or
            ``"wanda"`` (|w| x input norm on ``calibration``, per output row, layer scope).
            ``unstructured_include`` / ``_exclude``: module names or globs.
        dynamic_shapes: the input dims the pruned module keeps free, as ``torch.export`` spells
            them (e.g. ``({0: Dim.AUTO, 1: Dim.AUTO},)``). Default: batch and sequence length of
            integer 2-D inputs (token ids, masks), the batch of the others; the plan records
            which stayed free (``plan.config["dynamic_shapes"]``) and replay uses the same.
        uniform: every attention layer keeps the same number of heads (and KV heads), every
            MLP the same width, as a Hugging Face config can hold (``save_pretrained``); the
            units each layer loses are still chosen by importance in that layer. Linears outside
            the repeated stacks (BERT's pooler, a classifier's ``dense``, an attention pool) have
            no config field and stay whole (``plan.config["uniform_kept_whole"]``). Refuses
            options that set counts per layer and fails, before touching anything, when the
            counts come out unequal, or when the Hugging Face config class would refuse the
            head count (LlamaConfig: hidden_size a multiple of the heads), naming the counts it
            accepts.
        heads_round: ``"config"``: with ``uniform=True``, round a head count the config class
            refuses to the nearest one it accepts (``plan.config["heads_round"]`` and the
            report say so).
        capture: a :class:`fxprune.graph.Traced` of a module with the same structure as
            ``model`` (another block of a repeated stack, from :func:`fxprune.graph.trace`):
            its graph is reused over ``model``'s tensors instead of capturing again
            (:func:`fxprune.graph.trace.retarget`), which is how :func:`fxprune.stream`
            captures a decoder stack once. The block is the caller's own: where the passes
            write into no tensor, the result shares its unchanged tensors (no copy first).

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
    made = None
    if example_inputs is None:
        example_inputs, made = default_example(model)
    args = as_args(example_inputs, model)
    inputs_spec(args)
    options = {k: v for k, v in locals().items() if k in RECIPE_OPTIONS}
    if recipe is not None:
        given = sorted(k for k, v in options.items() if not is_default(v, RECIPE_OPTIONS[k]))
        if given:
            raise ConfigError(
                f"compile(model, x, recipe): {', '.join(given)} belong in the recipe; with a "
                "recipe give only calibration, calibration_batches, loss_fn, train_fn, "
                "inplace, dynamic_shapes"
            )
        if not isinstance(recipe, Recipe):
            raise ConfigError(f"recipe={type(recipe).__name__}: give a fxprune.Recipe")
        if not recipe.passes:
            raise ConfigError("the recipe has no passes: it would prune nothing")
        config = {"uniform": recipe.uniform, "allow_approximate": recipe.allow_approximate}
        check_recipe(model, recipe)  # the keyword form resolved and checked its names already
    else:
        recipe, config = from_options(model, data=calibration is not None, **options)
    passes = with_runtime(model, recipe, calibration, calibration_batches, loss_fn, train_fn)
    with contextlib.suppress(ConfigError):  # leaf_modules given as types have no JSON form
        config["recipe"] = recipe.to_dict()
    result = run(
        model,
        args,
        list(passes),
        recipe.mode,
        recipe.leaf_modules,
        recipe.allow_approximate,
        inplace,
        config,
        dynamic_shapes,
        capture,
    )
    if made is not None:
        result.example_note = (
            f"example_inputs were not given: traced with {made}; data-driven criteria and "
            "methods still need real data (calibration=)"
        )
    return result
