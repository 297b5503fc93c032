"""``fxprune.Recipe``: what to prune, as data.

A recipe is an ordered tuple of registered pass configs (``fxprune.passes.Blocks``, ``Heads``,
``FFN``, ``Channels``, ``Permute``, ``NM``, ``Unstructured``) plus the capture options (``mode``,
``leaf_modules``, ``allow_approximate``, ``uniform``). It is validated on construction, written
as JSON (``to_dict`` / ``save``) and read back (``from_dict`` / ``load``), versioned like the
plan. Each field read back is checked against its config's type annotation (``json_field``):
``"false"`` is not a boolean, ``"fc1"`` not a list of names, ``{"layer4": 0.25}`` not a list of
pairs; the error names the pass and the field. ``fxprune.compile(model, x, recipe)`` runs it;
the keyword arguments of ``compile`` are sugar that builds the same recipe, so both take one code
path.

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
import functools
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Union

from fxprune._util import jsonable, resolve_names
from fxprune.calibration import default_loss, take_batches
from fxprune.errors import ConfigError, FileAccessError
from fxprune.importance import Criterion, name_of, resolve
from fxprune.passes import (
    BY_CONFIG,
    NM,
    REGISTRY,
    Blocks,
    Experts,
    Unstructured,
)

RUNTIME = frozenset({"calibration", "loss_fn", "train_fn", "kept", "layers", "orders", "removed"})
"""Config fields that are runtime data or replay-only: never part of a recipe."""

MODES = ("auto", "fx", "export")


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_SCALARS |= {type(None): "null", dict: "an object"}
_PLURAL = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _spell(hint, plural: bool = False) -> str:
    """A field's type as JSON spells it: ``a list of [a string, a number] pairs``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(s for s in (_spell(a, plural) for a in args) if s)
    if hint is tuple or typing.get_origin(hint) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{'lists' if plural else 'a list'} of {_spell(args[0], True)}"
        if args:
            items = f"[{', '.join(_spell(a) for a in args)}]"
            return f"{items} {'pairs' if len(args) == 2 else 'lists'}" if plural else items
        return "lists" if plural else "a list"
    if hint is object:
        return "any values" if plural else "any value"
    return (_PLURAL if plural else _SCALARS).get(hint, "")  # a Python-only type: none


def _kind(v) -> str:
    """What a parsed JSON value is, in JSON's words."""
    if isinstance(v, (list, bool)):
        return "a list" if isinstance(v, list) else "a boolean"
    return next((name for t, name in _SCALARS.items() if type(v) is t), type(v).__name__)


class _Misfit(Exception):
    """A JSON value (at ``path`` inside a field) that is not of type ``hint``."""

    def __init__(self, path: str, value, hint):
        super().__init__(path)
        self.path, self.value, self.hint = path, value, hint


def _is_list_type(hint) -> bool:
    return hint is tuple or typing.get_origin(hint) is tuple


def _coerce(v, hint, path: str = ""):
    """Parsed JSON ``v`` as the field type ``hint`` holds it (lists become the tuples the frozen
    configs hold), else :class:`_Misfit` at the innermost item that does not fit. It descends
    only as deep as ``hint`` does, so a deeply nested value is refused, never recursed into."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        misfits = []
        for a in args:
            try:
                return _coerce(v, a, path)
            except _Misfit as e:
                misfits.append((a, e))
        lists = [e for a, e in misfits if _is_list_type(a)]  # name a list's misfit item
        raise lists[0] if isinstance(v, list) and len(lists) == 1 else _Misfit(path, v, hint)
    if _is_list_type(hint):
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            want = [args[0] if args else object] * len(v) if isinstance(v, list) else []
        else:
            want = list(args)
        if not isinstance(v, list) or len(want) != len(v):
            raise _Misfit(path, v, hint)
        pairs = enumerate(zip(v, want, strict=True))
        return tuple(_coerce(x, h, f"{path}[{i}]") for i, (x, h) in pairs)
    if hint is object or (hint is float and type(v) is int):
        return v
    if hint not in _SCALARS or type(v) is not hint:
        raise _Misfit(path, v, hint)
    return v


def json_field(value, hint, where: str):
    """``value`` read from a recipe file as a field of type ``hint`` (a config dataclass's
    annotation); a :class:`ConfigError` naming ``where`` (and the item inside it) when its
    JSON type is not that one (``"false"`` is not a boolean, ``"fc1"`` is not a list of names).
    """
    try:
        return _coerce(value, hint)
    except _Misfit as e:
        v = e.value
        shown = json.dumps(v) if isinstance(v, (str, int, float, bool)) else ""
        takes = _spell(e.hint)
        if isinstance(v, dict) and _is_list_type(e.hint):
            takes += " (write an object's entries as [key, value] pairs)"
        raise ConfigError(
            f"{where}{e.path} is {_kind(v)}{f' ({shown:.40})' if shown else ''}; it takes {takes}"
        ) from None


@functools.cache
def _field_types(cls: type) -> dict:
    """Each dataclass field's type annotation, evaluated."""
    return typing.get_type_hints(cls)


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
    if not isinstance(entry, dict) or not isinstance(entry.get("pass"), str):
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
    hints = _field_types(cls)
    return cls(
        **{
            k: json_field(v, hints[k], f"recipe {where} ({name}): {k}")
            for k, v in entry.items()
            if k != "pass"
        }
    )


@dataclass(frozen=True)
class Recipe:
    """An ordered tuple of pass configs plus capture options; see the module docstring."""

    passes: tuple = ()
    mode: str = "auto"
    leaf_modules: tuple[str | type, ...] = ()
    allow_approximate: bool = False
    uniform: bool = False

    VERSION: ClassVar[int] = 1
    OPTIONS: ClassVar[tuple[str, ...]] = ("mode", "leaf_modules", "allow_approximate", "uniform")

    def __post_init__(self):
        for flag in ("allow_approximate", "uniform"):  # bool("false") is True
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"recipe {flag}={getattr(self, flag)!r}: give True or False")
        if isinstance(self.leaf_modules, str):  # tuple("fc1") is ("f", "c", "1")
            raise ConfigError(
                f"recipe leaf_modules={self.leaf_modules!r}: give a list of module names "
                f"([{self.leaf_modules!r}])"
            )
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
        if type(version) is not int or version != cls.VERSION:  # true == 1 in Python
            raise ConfigError(
                f"recipe version {version!r}: this fxprune reads version {cls.VERSION}"
            )
        unknown = sorted(set(d) - {"version", "passes", *cls.OPTIONS})
        if unknown:
            raise ConfigError(f"recipe: unknown keys {unknown}")
        passes = d.get("passes", [])
        if not isinstance(passes, list):
            raise ConfigError(f"recipe passes is {_kind(passes)}; it takes a list of pass entries")
        hints = _field_types(cls)
        options = {k: json_field(d[k], hints[k], f"recipe {k}") for k in cls.OPTIONS if k in d}
        return cls(tuple(config_from(e, f"pass {i}") for i, e in enumerate(passes)), **options)

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
        except RecursionError as e:  # the decoder recurses once per level
            raise ConfigError(
                f"recipe {p}: nested too deeply to read (a recipe is a few levels deep: "
                "passes -> a pass -> layer_ratios -> a pair)"
            ) from e
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
    if isinstance(cfg, (Blocks, Experts)):
        return cfg.removed is None if isinstance(cfg, Experts) else True
    if isinstance(cfg, (NM, Unstructured)):
        return cfg.method != "magnitude"
    return bool(
        getattr(cfg, "importance", None) is not None
        and resolve(cfg.importance).needs
        and (getattr(cfg, "ratio", 0) or getattr(cfg, "layer_ratios", ()))
    )


def _check_train_fn(recipe: Recipe) -> None:
    """Some pass ranks by a criterion that trains with ``train_fn`` (``importance="learned"``)."""
    ranked = {
        BY_CONFIG[type(c)].name: name_of(c.importance)
        for c in recipe.passes
        if getattr(c, "importance", None) is not None
    }
    uses = [
        c
        for c in recipe.passes
        if "train_fn" in {f.name for f in dataclasses.fields(c)}
        and resolve(c.importance).needs == "learned"
    ]
    if not uses:
        by = ", ".join(f"{k}: {v}" for k, v in ranked.items()) or "no pass ranks by importance"
        raise ConfigError(
            f"train_fn is given but no pass reads it ({by}): only importance='learned' trains "
            "with it; set importance='learned' or drop train_fn"
        )


def with_runtime(
    model, recipe: Recipe, calibration, calibration_batches, loss_fn, train_fn=None
) -> tuple:
    """The recipe's configs with the runtime data given to the passes that read it; a
    ``train_fn`` no pass reads is refused (it would be ignored without a word)."""
    if train_fn is not None:
        _check_train_fn(recipe)
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
