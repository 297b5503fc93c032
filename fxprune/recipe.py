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

from fxprune._util import jsonable, resolve_names
from fxprune.calibration import default_loss, take_batches
from fxprune.errors import ConfigError, FileAccessError
from fxprune.importance import Criterion, name_of, resolve
from fxprune.passes import (
    BY_CONFIG,
    NM,
    REGISTRY,
    Blocks,
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
