"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import gc

import torch
import torch.nn as nn

from fxprune.errors import ConfigError


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Every submodule in eval mode for the duration; each one's own flag is restored after."""
    modes = [(m, m.training) for m in module.modules()]
    for m, was in modes:
        if was:  # Module.__setattr__ is slow: an eval model (the usual case) sets nothing
            m.training = False
    try:
        yield module
    finally:
        for m, was in modes:
            if m.training is not was:
                m.training = was


def module_attr(m: nn.Module, name: str):
    """``getattr(m, name, None)`` where that can be a module: an instance or class attribute
    (a property) is read as getattr reads it; anything else can only be a child in
    ``_modules`` (``Module.__getattr__`` finds parameters and buffers, never modules, in the
    other dicts). Raising and catching ``Module.__getattr__``'s AttributeError for each of the
    ~30 names ``layer_fixes`` probes on every module of the tree was most of its time."""
    if name in m.__dict__ or hasattr(type(m), name):
        return getattr(m, name, None)
    return m._modules.get(name)


def module_matches(name: str, pattern: str) -> bool:
    """A module name matches itself, a glob, or a parent module's name (``layer1`` -> all in it)."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


_SILENT = contextvars.ContextVar("fxprune_silent", default=False)


@contextlib.contextmanager
def silent():
    """No progress bars inside (the CLI's --quiet / --json)."""
    token = _SILENT.set(True)
    try:
        yield
    finally:
        _SILENT.reset(token)


def progress_wanted() -> bool:
    """Whether long work shows progress on stderr: never inside :func:`silent`;
    ``FXPRUNE_PROGRESS=1`` / ``0`` says so, else when stderr is a terminal (a compile of a real
    LLM calibrates for minutes)."""
    import os
    import sys

    if _SILENT.get():
        return False
    env = os.environ.get("FXPRUNE_PROGRESS")
    if env is not None:
        return env not in ("", "0")
    return sys.stderr.isatty()


def ticking(items, desc: str):
    """Iterate ``items`` (a sized collection) with a progress bar on stderr when
    :func:`progress_wanted` and there is more than one."""
    bar = progress_bar(progress_wanted() and len(items) > 1, len(items), desc)
    try:
        for x in items:
            yield x
            bar.update(1)
    finally:
        bar.close()


def progress_bar(enabled: bool | None, total: int, desc: str):
    """A tqdm bar on stderr when asked for (None: :func:`progress_wanted`) and installed, else
    an object that does nothing."""
    if enabled is None:
        enabled = progress_wanted()
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    import sys

    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def jsonable(v):
    """``v`` with every value JSON can hold: paths as strings, numpy / torch scalars and arrays
    as numbers and lists, tuples and sets as lists, dataclasses as dicts."""
    import dataclasses
    from pathlib import PurePath

    import numpy as np

    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted(jsonable(x) for x in v)
    if isinstance(v, PurePath):
        return str(v)
    if isinstance(v, (np.generic, torch.Tensor, np.ndarray)):
        return v.tolist()
    return v


class Report:
    """The one protocol of every result, report and estimate fxprune returns: ``table()`` (text
    for a terminal, markdown tables), ``to_dict()`` (only JSON values) and ``to_json()``.

    A dataclass report gets ``to_dict`` from its fields; it overrides it to leave out what JSON
    cannot hold (a model) or to add derived values."""

    def table(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return jsonable(self)

    def to_json(self, indent: int | None = None) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent)


def is_default(v, default) -> bool:
    """``v`` is ``default`` or as empty as it (``[]`` for ``()``, ``0`` for ``0.0``, ``{}`` for
    None): an option the caller left alone."""
    return v == default or (not v and not default)


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


def registrar(module: str, attr: str, base: type, what: str):
    """``@what("name")``: a class decorator registering an instance of a ``base`` subclass as
    ``name`` in the dict ``attr`` of ``module``, looked up when a class registers (so a dict a
    test swaps in receives it). Sets the class's ``name``."""
    import sys

    def register(name: str):
        def deco(cls):
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise ConfigError(
                    f"@{what}({name!r}) decorates a {base.__name__} subclass, not {cls!r}"
                )
            cls.name = name
            getattr(sys.modules[module], attr)[name] = cls()
            return cls

        return deco

    register.__doc__ = f"Class decorator: register a :class:`{base.__name__}` subclass by name."
    return register


def lookup(registry: dict, base: type, value, option: str):
    """The registered object ``value`` names, or ``value`` itself when it is a ``base``
    instance; anything else is a ConfigError naming ``option`` and the registered names."""
    if isinstance(value, base):
        return value
    if isinstance(value, str) and value in registry:
        return registry[value]
    raise ConfigError(
        f"{option}={value!r}: choose one of {tuple(registry)} or pass a {base.__name__} instance"
    )


@contextlib.contextmanager
def frozen_gc():
    """Everything alive now (modules, classes, models: long-lived) moved out of the collector's
    sight for the duration, so a full collection inside, which frees a loop step's reference
    cycles (fx graphs), walks only what the step made. The stream's collection after each
    block cost 0.4 s walking torch's and transformers' own objects (0.5B shape)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
