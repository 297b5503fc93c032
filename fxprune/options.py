"""``compile``'s keyword options as a :class:`fxprune.Recipe`: the defaults a recipe holds
(:data:`RECIPE_OPTIONS`), ``from_options`` (keywords -> pass configs, names resolved, options
checked against each other) and the keyword view ``plan.config`` keeps. The keywords are sugar:
``compile(model, x, heads=0.25)`` and ``compile(model, x, Recipe([Heads(0.25)]))`` take one path.
Options that would do nothing are refused here, as an empty Recipe is: no option of
:data:`PASS_OPTIONS` (nothing would be pruned), or one of a type it would be misread as.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from fxprune._util import is_default, jsonable, resolve_names
from fxprune.errors import ConfigError
from fxprune.importance import AUTO, auto_importance, name_of, resolve
from fxprune.passes import FFN, NM, Blocks, Channels, Experts, Heads, Permute, Unstructured
from fxprune.recipe import Recipe

RECIPE_OPTIONS = {
    "channels": 0.0,
    "heads": 0.0,
    "ffn": 0.0,
    "blocks": 0,
    "experts": 0.0,
    "importance": "auto",
    "block_importance": "cosine",
    "expert_importance": "weight",
    "ignore": (),
    "layer_ratios": None,
    "head_ratios": None,
    "ffn_ratios": None,
    "round_to": None,
    "round_backend": "torch",
    "min_channels": 1,
    "min_heads": 1,
    "global_ranking": False,
    "allow_approximate": False,
    "mode": "auto",
    "leaf_modules": (),
    "seed": 0,
    "sparsity": None,
    "sparsity_include": (),
    "sparsity_exclude": (),
    "sparsity_permute": False,
    "sparsity_method": "magnitude",
    "unstructured": 0.0,
    "unstructured_scope": "layer",
    "unstructured_method": "magnitude",
    "unstructured_include": (),
    "unstructured_exclude": (),
    "uniform": False,
    "heads_round": None,
}
"""``compile``'s keyword options a recipe holds, with their defaults (runtime ones are not
here: calibration, calibration_batches, loss_fn, inplace, dynamic_shapes)."""

_PER_LAYER = ("global_ranking", "layer_ratios", "head_ratios", "ffn_ratios")
_RATIOS = ("layer_ratios", "head_ratios", "ffn_ratios")

PASS_OPTIONS = (
    "channels",
    "heads",
    "ffn",
    "blocks",
    "experts",
    "sparsity",
    "unstructured",
    *_RATIOS,
)
"""The options that select a pass; without one, ``compile`` would prune nothing."""


def from_options(model, data: bool = False, **options) -> tuple[Recipe, dict]:
    """The :class:`Recipe` that ``compile``'s keyword options (any subset of
    :data:`RECIPE_OPTIONS`, the rest at their defaults) describe, and the keyword view
    ``plan.config`` keeps. Globs, module types and module instances become module names.
    ``data``: calibration batches are given (``importance="auto"`` reads it).
    ``fxprune prune --print-recipe`` prints it.

    Raises:
        ConfigError: an unknown option; a flag that is not a bool, one string where a list of
            names goes, per-layer ratios that are not a mapping; no option that selects a pass
            (:data:`PASS_OPTIONS`); an option out of range or naming nothing in ``model``.
    """
    unknown = sorted(set(options) - set(RECIPE_OPTIONS))
    if unknown:
        raise ConfigError(f"recipe options {unknown}: not compile options a recipe holds")
    _check_types(options)
    o = {**RECIPE_OPTIONS, **options}
    o["data"] = bool(data)
    if o["importance"] != AUTO:
        resolve(o["importance"])  # an unknown criterion is named before anything else
    o["ignore"] = resolve_names(model, o["ignore"], "ignore")
    ratios = {k: tuple((o[k] or {}).items()) for k in _RATIOS}
    nm = _nm(model, o)
    if o["round_to"] is None:
        o["round_to"] = nm.m if nm is not None else 1
    elif o["round_to"] == "auto" and nm is not None:  # its candidates need not divide by M
        raise ConfigError(f"round_to='auto' with sparsity: give round_to={nm.m} (or a multiple)")
    per_layer = [k for k in _PER_LAYER if o[k]]
    if o["uniform"] and per_layer:
        raise ConfigError(
            f"uniform=True keeps one count for every layer, but {', '.join(per_layer)} sets "
            "counts per layer"
        )
    for k, pairs in ratios.items():
        resolve_names(model, [name for name, _ in pairs], k)
    rounded = _config_heads(model, o)
    passes = _unit_passes(o, ratios)
    if nm is not None:
        passes += [Permute(nm.n, nm.m, seed=o["seed"])] if o["sparsity_permute"] else []
        passes.append(nm)
    unstructured = _unstructured(model, o)
    if unstructured is not None:  # after N:M (a permutation would move its masks)
        passes.append(unstructured)
    if not passes:  # an empty Recipe is refused too: a result that pruned nothing misleads
        raise ConfigError(
            "no pass selected, so compile would prune nothing: give one of "
            f"{', '.join(k + '=' for k in PASS_OPTIONS)} (or a Recipe)"
        )
    recipe = Recipe(
        tuple(passes),
        mode=o["mode"],
        leaf_modules=tuple(o["leaf_modules"]),
        allow_approximate=o["allow_approximate"],
        uniform=o["uniform"],
    )
    view = _keyword_view(o, ratios, nm)
    if rounded:
        view["heads_round"] = rounded
    return recipe, view


def _config_heads(model, o: dict) -> str | None:
    """With ``uniform=True``, the head count a Hugging Face config class would refuse
    (``LlamaConfig``: ``hidden_size`` a multiple of ``num_attention_heads``, even with
    ``head_dim`` set) is known before pruning: refused naming the counts it accepts, or with
    ``heads_round="config"`` rounded to the nearest of them (``o["heads"]`` becomes the number
    of key/value units removed). Returns what the rounding did, for the report."""
    from fxprune.hf import accepted_head_units

    how = o["heads_round"]
    if how not in (None, "config"):
        raise ConfigError(f"heads_round={how!r}: give 'config' (or leave it out)")
    cfg = getattr(model, "config", None)
    known = accepted_head_units(cfg) if o["uniform"] and o["heads"] else None
    if known is None:
        if how is not None:
            raise ConfigError(
                "heads_round='config' rounds the head count a Hugging Face config holds: it "
                "needs heads=, uniform=True and a model whose config has num_attention_heads"
            )
        return None
    kv, per, ok = known
    h = o["heads"]
    keep = kv - h if isinstance(h, int) and h >= 1 else max(1, kv - int(kv * h + 1e-9))
    keep = max(keep, o["min_heads"])
    if keep in ok or not ok:
        return None
    # the nearest; a tie keeps more heads, unless that would remove none
    near = min(ok, key=lambda k: (abs(k - keep), k == kv, -k))
    name = type(cfg).__name__
    heads_of = lambda k: f"{k * per} heads ({k} of {kv} key/value units)"  # noqa: E731
    if how is None:
        raise ConfigError(
            f"heads={h!r} keeps {heads_of(keep)}, which {name} refuses (it needs hidden_size "
            f"{getattr(cfg, 'hidden_size', '?')} to be a multiple of num_attention_heads); "
            f"counts it accepts: {', '.join(str(k * per) for k in ok)} heads; give heads={kv - near} "
            "(units removed), or heads_round='config' to round to the nearest"
        )
    o["heads"] = kv - near
    if o["heads"] == 0:
        raise ConfigError(
            f"heads={h!r} with heads_round='config': the nearest count {name} accepts is all "
            f"{kv * per} heads, which removes nothing"
        )
    return f"heads={h!r} would keep {heads_of(keep)}, which {name} refuses: rounded to {heads_of(near)}"


def _check_types(options: dict) -> None:
    """Each option of the type its default has, where a wrong one would be misread: a flag is a
    bool (``bool("false")`` is True), a list of names is not one string (``tuple("fc1")`` is
    ``("f", "c", "1")``), per-layer ratios are a mapping."""
    for k, v in options.items():
        default = RECIPE_OPTIONS[k]
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ConfigError(f"{k}={v!r:.60}: give True or False")
        if isinstance(default, tuple) and isinstance(v, str):
            raise ConfigError(f"{k}={v!r}: give a list of names ([{v!r}])")
        if k in _RATIOS and v is not None and not isinstance(v, Mapping):
            raise ConfigError(f"{k}={v!r:.60}: give a dict {{module name or glob: ratio}}")


def _unstructured(model, o: dict):
    """The unstructured config ``unstructured=`` asks for (None without it)."""
    keys = [k for k in RECIPE_OPTIONS if k.startswith("unstructured_")]
    if not o["unstructured"]:
        if changed := [k for k in keys if not is_default(o[k], RECIPE_OPTIONS[k])]:
            raise ConfigError(f"{', '.join(changed)} needs unstructured=<fraction>")
        return None
    inc, exc = tuple(o["unstructured_include"]), tuple(o["unstructured_exclude"])
    resolve_names(model, list(inc) + list(exc), "unstructured filters")
    scope, method = o["unstructured_scope"], o["unstructured_method"]
    return Unstructured(o["unstructured"], scope, method, include=inc, exclude=exc)


def _nm(model, o: dict):
    """The N:M config ``sparsity=`` asks for (None without it); its options checked."""
    if o["sparsity"] is None:
        if o["sparsity_method"] != "magnitude":
            raise ConfigError(
                f"sparsity_method={o['sparsity_method']!r} needs sparsity='N:M' (e.g. '2:4')"
            )
        if o["sparsity_permute"]:
            raise ConfigError("sparsity_permute=True needs sparsity='N:M'")
        return None
    filters = list(o["sparsity_include"]) + list(o["sparsity_exclude"])
    resolve_names(model, filters, "sparsity filters")
    return NM.parse(
        o["sparsity"],
        include=tuple(o["sparsity_include"]),
        exclude=tuple(o["sparsity_exclude"]),
        method=o["sparsity_method"],
    )


def _unit_passes(o: dict, ratios: dict) -> list:
    """Blocks, experts, heads, FFN and channels, in the order they run."""
    shared = {k: o[k] for k in ("ignore", "global_ranking", "seed")}
    imp = {k: auto_importance(o["importance"], k, o["data"]) for k in ("heads", "ffn", "channels")}
    h_ratios, f_ratios = ratios["head_ratios"], ratios["ffn_ratios"]
    passes = []
    if o["blocks"]:
        which = o["blocks"] if isinstance(o["blocks"], int) else tuple(o["blocks"])
        passes.append(Blocks(which, o["block_importance"]))
    if o["experts"]:
        passes.append(Experts(o["experts"], o["expert_importance"]))
    if o["heads"] or h_ratios:
        passes.append(
            Heads(
                o["heads"],
                min_heads=o["min_heads"],
                layer_ratios=h_ratios,
                importance=imp["heads"],
                **shared,
            )
        )
    aligned = {k: o[k] for k in ("round_to", "min_channels", "round_backend")}
    if o["ffn"] or f_ratios:
        passes.append(
            FFN(o["ffn"], layer_ratios=f_ratios, importance=imp["ffn"], **aligned, **shared)
        )
    if o["channels"] or ratios["layer_ratios"]:
        kinds = ("channels",) if o["ffn"] or f_ratios else ("channels", "ffn")
        passes.append(
            Channels(
                o["channels"],
                layer_ratios=ratios["layer_ratios"],
                kinds=kinds,
                importance=imp["channels"],
                **aligned,
                **shared,
            )
        )
    return passes


def _keyword_view(o: dict, ratios: dict, nm) -> dict:
    """``plan.config`` as the keywords spelled it (what reports and older plans read)."""
    config = {
        "channels": o["channels"],
        "heads": o["heads"],
        "ffn": o["ffn"],
        "blocks": o["blocks"] if isinstance(o["blocks"], int) else list(o["blocks"]),
        "block_importance": o["block_importance"],
        **(
            {"experts": o["experts"], "expert_importance": o["expert_importance"]}
            if o["experts"]
            else {}
        ),
        "min_heads": o["min_heads"],
        "importance": AUTO if o["importance"] == AUTO else name_of(o["importance"]),
        "ignore": list(o["ignore"]),
        **{k: dict(v) for k, v in ratios.items()},
        "round_to": o["round_to"],
        **({"round_backend": o["round_backend"]} if o["round_to"] == "auto" else {}),
        "min_channels": o["min_channels"],
        "global_ranking": o["global_ranking"],
        "allow_approximate": o["allow_approximate"],
        "seed": o["seed"],
    }
    if o["uniform"]:
        config["uniform"] = True
    if nm is not None:
        config.update({k: o[k] for k in ("sparsity", "sparsity_permute", "sparsity_method")})
        config.update({k: list(o[k]) for k in ("sparsity_include", "sparsity_exclude")})
    if o["unstructured"]:
        config.update({k: jsonable(o[k]) for k in RECIPE_OPTIONS if k.startswith("unstructured")})
    return config


def sequential_nm(model, data: bool, **options) -> tuple:
    """``from_options``'s recipe and config with a data-driven N:M pass calibrating layer by
    layer in one forward (``NM.sequential``: each layer chosen on what the pruned layers before
    it give, and the pruned graph's outputs on the batches come back); the recipe unchanged
    where N:M reads no data."""
    from fxprune.passes.nm_methods import resolve as resolve_method

    recipe, config = from_options(model, data=data, **options)
    passes = tuple(
        dataclasses.replace(p, sequential=True)
        if isinstance(p, NM) and resolve_method(p.method).data
        else p
        for p in recipe.passes
    )
    return dataclasses.replace(recipe, passes=passes), config
