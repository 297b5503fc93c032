"""Graph passes and the runner that applies them in a fixed order.

A pass has one signature, ``pass_fn(graph: DependencyGraph, cfg, args) -> PassResult``: it decides
what to remove (or replays a decision recorded in ``cfg``), applies it through
``fxprune.graph.rewrite.apply_removal`` and reports what changed. The runner rebuilds the dependency
graph after every pass that changed the model and names the failing pass (and the passes before it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fxprune.errors import FxPruneError, PassError
from fxprune.graph import DependencyGraph, build_graph


@dataclass
class PassResult:
    """What a pass did."""

    name: str
    changed: bool
    zero: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # consumer keep masks
    approximate_groups: int = 0
    details: dict = field(default_factory=dict)
    keeps: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # param -> dim -> kept
    masks: dict = field(default_factory=dict)  # param -> bool tensor (N:M), in pruned shapes
    plan: dict = field(default_factory=dict)  # what replays this pass (see fxprune.plan.Plan)
    bypassed: list[str] = field(default_factory=list)  # blocks removed (module names)
    order: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # param -> dim -> gather
    updated: dict = field(default_factory=dict)  # param -> new values (SparseGPT), pruned shape


PassFn = Callable[..., PassResult]


@dataclass(frozen=True)
class PassSpec:
    """A registered pass: its plan name, its config type, the function that applies a config,
    and how a plan entry becomes the config that replays it exactly."""

    name: str
    config: type
    apply: PassFn
    replay: Callable[[dict], object]


REGISTRY: dict[str, PassSpec] = {}
"""Passes by plan name (``"heads"``, ``"nm"``, ...)."""
BY_CONFIG: dict[type, PassSpec] = {}


def register_pass(name: str, config: type, replay: Callable[[dict], object]):
    """Decorator for a pass function ``fn(graph, cfg, args) -> PassResult``: plans record its
    results under ``name``, ``config`` instances run it, ``replay(entry)`` rebuilds the config."""

    def deco(fn: PassFn) -> PassFn:
        spec = PassSpec(name, config, fn, replay)
        REGISTRY[name] = spec
        BY_CONFIG[config] = spec
        return fn

    return deco


def pass_of(cfg) -> PassFn:
    """The pass function a config runs (by its type, or a registered base type)."""
    for cls in type(cfg).__mro__:
        if cls in BY_CONFIG:
            return BY_CONFIG[cls].apply
    raise PassError(f"no registered pass takes a {type(cfg).__name__} config")


def run_passes(
    gm, passes: list, args: tuple, allow_approximate: bool = False
) -> tuple[DependencyGraph, list[PassResult]]:
    """Run ``passes`` in order on ``gm``: each a config of a registered pass, or an explicit
    ``(function, config)`` pair.

    Returns the dependency graph of the model as it came in (its barrier report is what the user
    needs to see) and each pass's result.
    """
    graph = first = build_graph(gm, allow_approximate=allow_approximate)
    results: list[PassResult] = []
    for i, item in enumerate(passes):
        fn, cfg = item if isinstance(item, tuple) else (pass_of(item), item)
        try:
            res = fn(graph, cfg, args)
        except FxPruneError as e:
            done = ", ".join(r.name for r in results) or "none"
            raise type(e)(f"pass {fn.__name__} failed (after: {done}): {e}") from e
        except Exception as e:  # noqa: BLE001 - an internal failure still names the pass
            done = ", ".join(r.name for r in results) or "none"
            raise PassError(f"pass {fn.__name__} failed (after: {done}): {e}") from e
        results.append(res)
        if res.changed and i + 1 < len(passes):
            graph = build_graph(gm, allow_approximate=allow_approximate)
    return first, results


# the built-in passes register themselves on import; their configs are the public names a
# Recipe is made of (fxprune.passes.Heads, ...)
from fxprune.passes import blocks, channels, ffn, heads, nm, permute  # noqa: E402, F401
from fxprune.passes.blocks import Blocks  # noqa: E402
from fxprune.passes.channels import Channels  # noqa: E402
from fxprune.passes.ffn import FFN  # noqa: E402
from fxprune.passes.heads import Heads  # noqa: E402
from fxprune.passes.nm import NM  # noqa: E402
from fxprune.passes.permute import Permute  # noqa: E402

__all__ = [
    "FFN",
    "NM",
    "REGISTRY",
    "Blocks",
    "Channels",
    "Heads",
    "PassResult",
    "PassSpec",
    "Permute",
    "pass_of",
    "register_pass",
    "run_passes",
]
