"""``fxprune.Recipe``: what to prune, as data.

A recipe is an ordered tuple of registered pass configs (``fxprune.passes.Blocks``, ``Heads``,
``FFN``, ``Channels``, ``Permute``, ``NM``, ``Unstructured``) plus the capture options (``mode``,
``leaf_modules``, ``allow_approximate``, ``uniform``). It is validated on construction, written
as JSON (``to_dict`` / ``save``) and read back (``from_dict`` / ``load``), versioned like the
plan. ``fxprune.compile(model, x, recipe)`` runs it; the keyword arguments of ``compile`` are
sugar that builds the same recipe, so both take one code path.

What a recipe never holds is runtime data: calibration batches and ``loss_fn`` are arguments
of ``compile``, and replay-only fields (a plan's ``kept`` indices, N:M ``layers``, permutation
``orders``) belong to plans. A plan records the recipe that made it
(``plan.config["recipe"]``).

Example::

    recipe = fxprune.Recipe([Heads(0.25), FFN(0.25, round_to=8), NM(2, 4)])
    recipe.save("r.json")                      # fxprune prune SRC --recipe r.json
    res = fxprune.compile(model, x, fxprune.Recipe.load("r.json"), calibration=batches)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fxprune._util import is_default, jsonable, resolve_names
from fxprune.calibration import default_loss, take_batches
from fxprune.errors import ConfigError, FileAccessError
from fxprune.importance import Criterion, name_of, resolve
from fxprune.passes import (
    BY_CONFIG,
    FFN,
    NM,
    REGISTRY,
    Blocks,
    Channels,
    Heads,
    Permute,
    Unstructured,
)

RUNTIME = frozenset({"calibration", "loss_fn", "train_fn", "kept", "layers", "orders"})
"""Config fields that are runtime data or replay-only: never part of a recipe."""

MODES = ("auto", "fx", "export")


def _tupled(v):
    """JSON lists back to the tuples the frozen configs hold."""
    if isinstance(v, list):
        return tuple(_tupled(x) for x in v)
    return v


def config_dict(cfg) -> dict:
    """One pass config as a recipe entry: ``{"pass": name, field: value, ...}``."""
    spec = BY_CONFIG.get(type(cfg))
    if spec is None:
        raise ConfigError(f"recipe: {type(cfg).__name__} is not a registered pass config")
    out = {"pass": spec.name}
    for f in dataclasses.fields(cfg):
        if f.name in RUNTIME:
            continue
        v = getattr(cfg, f.name)
        out[f.name] = name_of(v) if isinstance(v, Criterion) else jsonable(v)
    return out


def config_from(entry: dict, where: str):
    """A recipe entry back to its pass config (the config validates itself)."""
    if not isinstance(entry, dict) or "pass" not in entry:
        raise ConfigError(f"recipe {where}: a pass entry is an object with a 'pass' name")
    name = entry["pass"]
    if name not in REGISTRY:
        raise ConfigError(f"recipe {where}: pass {name!r} is not one of {sorted(REGISTRY)}")
    cls = REGISTRY[name].config
    known = {f.name for f in dataclasses.fields(cls)} - RUNTIME
    unknown = sorted(set(entry) - known - {"pass"})
    if unknown:
        raise ConfigError(
            f"recipe {where} ({name}): unknown fields {unknown}; {cls.__name__} "
            f"takes {sorted(known)}"
        )
    return cls(**{k: _tupled(v) for k, v in entry.items() if k != "pass"})


@dataclass(frozen=True)
class Recipe:
    """An ordered tuple of pass configs plus capture options; see the module docstring."""

    passes: tuple = ()
    mode: str = "auto"
    leaf_modules: tuple = ()
    allow_approximate: bool = False
    uniform: bool = False

    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        object.__setattr__(self, "passes", tuple(self.passes))
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        for i, cfg in enumerate(self.passes):
            if type(cfg) not in BY_CONFIG:
                names = sorted(s.config.__name__ for s in REGISTRY.values())
                raise ConfigError(
                    f"recipe pass {i} is a {type(cfg).__name__}, not a pass config ({names})"
                )
        if self.mode not in MODES:
            raise ConfigError(f"recipe mode={self.mode!r}: choose one of {MODES}")

    def to_dict(self) -> dict:
        bad = [m for m in self.leaf_modules if not isinstance(m, str)]
        if bad:
            raise ConfigError(
                f"recipe leaf_modules {bad!r}: a recipe file names modules; give their names "
                "instead of types"
            )
        return {
            "version": self.VERSION,
            "mode": self.mode,
            "leaf_modules": list(self.leaf_modules),
            "allow_approximate": self.allow_approximate,
            "uniform": self.uniform,
            "passes": [config_dict(c) for c in self.passes],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        if not isinstance(d, dict):
            raise ConfigError(f"a recipe is a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version != cls.VERSION:
            raise ConfigError(
                f"recipe version {version!r}: this fxprune reads version {cls.VERSION}"
            )
        unknown = sorted(
            set(d) - {"version", "mode", "leaf_modules", "allow_approximate", "uniform", "passes"}
        )
        if unknown:
            raise ConfigError(f"recipe: unknown keys {unknown}")
        passes = d.get("passes", [])
        if not isinstance(passes, list):
            raise ConfigError("recipe 'passes' is a list of pass entries")
        return cls(
            tuple(config_from(e, f"pass {i}") for i, e in enumerate(passes)),
            mode=d.get("mode", "auto"),
            leaf_modules=tuple(d.get("leaf_modules", ())),
            allow_approximate=bool(d.get("allow_approximate", False)),
            uniform=bool(d.get("uniform", False)),
        )

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """A recipe from a JSON file (the error names the file)."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise FileAccessError(f"recipe {p}: cannot read it ({e.strerror or e})") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"recipe {p}: not JSON ({e.msg} at line {e.lineno})") from e
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from e

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        try:
            p.write_text(self.to_json() + "\n")
        except OSError as e:
            raise FileAccessError(f"recipe {p}: cannot write it ({e.strerror or e})") from e
        return p


# ---------------------------------------------------------------- from compile's keywords

RECIPE_OPTIONS = {
    "channels": 0.0,
    "heads": 0.0,
    "ffn": 0.0,
    "blocks": 0,
    "importance": "l1",
    "block_importance": "cosine",
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
}
"""``compile``'s keyword options a recipe holds, with their defaults (runtime ones are not
here: calibration, calibration_batches, loss_fn, inplace, dynamic_shapes)."""

_PER_LAYER = ("global_ranking", "layer_ratios", "head_ratios", "ffn_ratios")


def from_options(model, **options) -> tuple[Recipe, dict]:
    """The :class:`Recipe` that ``compile``'s keyword options (any subset of
    :data:`RECIPE_OPTIONS`, the rest at their defaults) describe, and the keyword view
    ``plan.config`` keeps. Globs, module types and module instances become module names.
    ``fxprune prune --print-recipe`` prints it."""
    unknown = sorted(set(options) - set(RECIPE_OPTIONS))
    if unknown:
        raise ConfigError(f"recipe options {unknown}: not compile options a recipe holds")
    o = {**RECIPE_OPTIONS, **options}
    resolve(o["importance"])  # an unknown criterion is named before anything else
    o["ignore"] = resolve_names(model, o["ignore"], "ignore")
    ratios = {k: tuple((o[k] or {}).items()) for k in ("layer_ratios", "head_ratios", "ffn_ratios")}
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
    passes = _unit_passes(o, ratios)
    if nm is not None:
        passes += [Permute(nm.n, nm.m, seed=o["seed"])] if o["sparsity_permute"] else []
        passes.append(nm)
    unstructured = _unstructured(model, o)
    if unstructured is not None:  # after N:M (a permutation would move its masks)
        passes.append(unstructured)
    recipe = Recipe(
        tuple(passes),
        mode=o["mode"],
        leaf_modules=tuple(o["leaf_modules"]),
        allow_approximate=o["allow_approximate"],
        uniform=o["uniform"],
    )
    return recipe, _keyword_view(o, ratios, nm)


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
    """Blocks, heads, FFN and channels, in the order they run."""
    shared = {k: o[k] for k in ("importance", "ignore", "global_ranking", "seed")}
    h_ratios, f_ratios = ratios["head_ratios"], ratios["ffn_ratios"]
    passes = []
    if o["blocks"]:
        which = o["blocks"] if isinstance(o["blocks"], int) else tuple(o["blocks"])
        passes.append(Blocks(which, o["block_importance"]))
    if o["heads"] or h_ratios:
        passes.append(Heads(o["heads"], min_heads=o["min_heads"], layer_ratios=h_ratios, **shared))
    aligned = {k: o[k] for k in ("round_to", "min_channels", "round_backend")}
    if o["ffn"] or f_ratios:
        passes.append(FFN(o["ffn"], layer_ratios=f_ratios, **aligned, **shared))
    if o["channels"] or ratios["layer_ratios"]:
        kinds = ("channels",) if o["ffn"] or f_ratios else ("channels", "ffn")
        passes.append(
            Channels(
                o["channels"], layer_ratios=ratios["layer_ratios"], kinds=kinds, **aligned, **shared
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
        "min_heads": o["min_heads"],
        "importance": name_of(o["importance"]),
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


def check_recipe(model, recipe: Recipe) -> None:
    """The names a recipe's passes hold exist in ``model``; uniform counts are not mixed with
    per-layer ones."""
    for cfg in recipe.passes:
        resolve_names(model, getattr(cfg, "ignore", ()), "ignore")
        resolve_names(model, [k for k, _ in getattr(cfg, "layer_ratios", ())], "layer_ratios")
        if isinstance(cfg, (NM, Unstructured)):
            resolve_names(model, list(cfg.include) + list(cfg.exclude), "sparsity filters")
        if recipe.uniform and (
            getattr(cfg, "global_ranking", False) or getattr(cfg, "layer_ratios", ())
        ):
            raise ConfigError(
                "uniform=True keeps one count for every layer, but a pass sets counts per layer "
                "(global_ranking or layer_ratios)"
            )


def _measures(cfg) -> bool:
    """Whether a pass reads calibration data."""
    if isinstance(cfg, Blocks):
        return True
    if isinstance(cfg, (NM, Unstructured)):
        return cfg.method != "magnitude"
    return bool(
        getattr(cfg, "importance", None) is not None
        and resolve(cfg.importance).needs
        and (getattr(cfg, "ratio", 0) or getattr(cfg, "layer_ratios", ()))
    )


def with_runtime(
    model, recipe: Recipe, calibration, calibration_batches, loss_fn, train_fn=None
) -> tuple:
    """The recipe's configs with the runtime data given to the passes that read it."""
    measured = any(_measures(c) for c in recipe.passes)
    batches = take_batches(calibration if measured else None, calibration_batches, model)
    loss = loss_fn if loss_fn is not None else default_loss(model)
    out = []
    for cfg in recipe.passes:
        names = {f.name for f in dataclasses.fields(cfg)}
        extra = {"calibration": batches} if "calibration" in names else {}
        if "loss_fn" in names:
            extra["loss_fn"] = loss
        if "train_fn" in names and train_fn is not None:
            extra["train_fn"] = train_fn
        out.append(dataclasses.replace(cfg, **extra) if extra else cfg)
    return tuple(out)
