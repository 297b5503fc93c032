"""Graph passes and the runner that applies them in a fixed order.

A pass has one signature, ``pass_fn(graph: DependencyGraph, cfg, args) -> PassResult``: it decides
what to remove (or replays a decision recorded in ``cfg``), applies it through
``fxprune.graph.rewrite.apply_removal`` and reports what changed. The runner rebuilds the dependency
graph after every pass that changed the model and names the failing pass (and the passes before it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import ClassVar

import numpy as np

from fxprune._util import jsonable
from fxprune.errors import ConfigError, FxPruneError, PassError
from fxprune.graph import DependencyGraph, build_graph

_EMPTY: Mapping = MappingProxyType({})


@dataclass
class PassResult:
    """What a pass did: the base every pass's typed result extends.

    ``name``, ``changed`` and ``plan`` (what replays the pass, see :class:`fxprune.plan.Plan`)
    are common to all. So are the *effects* that consumers read off any result (the plan, the
    proof, the module tree, the reports): ``keeps``, ``zero``, ``masks``, ``updated``,
    ``order``, ``bypassed``, ``unrouted``, ``approximate_groups`` and ``units``; a pass without that effect reads as empty, and its
    subclass declares as fields only the effects it has. ``details`` is a plain-dict view of the
    subclass's report fields (for tables and JSON).
    """

    name: str
    changed: bool
    plan: dict = field(default_factory=dict)

    keeps: ClassVar[Mapping] = _EMPTY  # param -> dim -> kept indices (units passes)
    zero: ClassVar[Mapping] = _EMPTY  # consumer param -> dim -> keep mask (units passes)
    masks: ClassVar[Mapping] = _EMPTY  # param -> bool tensor, pruned shapes (N:M)
    updated: ClassVar[Mapping] = _EMPTY  # param -> new values, pruned shapes (SparseGPT)
    order: ClassVar[Mapping] = _EMPTY  # param -> dim -> gather (permute)
    bypassed: ClassVar[tuple] = ()  # module names of removed blocks (blocks)
    unrouted: ClassVar[Mapping] = _EMPTY  # router weight -> dense indices of removed experts
    approximate_groups: ClassVar[int] = 0  # groups pruned by an approximate coupling rule
    units: ClassVar[Mapping] = _EMPTY  # group -> [units before, kept] (units passes)

    @property
    def details(self) -> dict:
        """The subclass's report fields (not its effects) as a dict."""
        skip = {"name", "changed", "plan", *_EFFECTS}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def to_dict(self) -> dict:
        return {"name": self.name, "changed": self.changed, **jsonable(self.details)}


_EFFECTS = (
    "keeps",
    "zero",
    "masks",
    "updated",
    "order",
    "bypassed",
    "unrouted",
    "approximate_groups",
)


@dataclass
class UnitsResult(PassResult):
    """Channels, heads or FFN neurons removed (``units``: group -> [units before, kept])."""

    keeps: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    zero: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    approximate_groups: int = 0
    units: dict[str, list[int]] = field(default_factory=dict)
    taylor_loss: str | None = None  # the loss a Taylor score differentiated

    @property
    def details(self) -> dict:
        out = {"groups_pruned": len(self.units), "units": self.units}
        if self.taylor_loss:
            out["taylor_loss"] = self.taylor_loss
        return out


class MaskCoverage:
    """What a masking pass (N:M, unstructured) covered: ``coverage()`` says how many layers it
    masked and why each other Linear / Conv weight stayed dense (the CLI's table, ``--json`` and
    ``CompileResult.report()`` print it)."""

    def coverage(self) -> dict:
        return {"pass": self.name, "masked": len(self.layers), "dense": dict(self.ineligible)}


def coverage_lines(results, top: int = 10) -> list[str]:
    """The report's lines for every masking pass: layers masked, and the dense ones with why."""
    lines = []
    for r in results:
        if not isinstance(r, MaskCoverage):
            continue
        c = r.coverage()
        what = f"{r.n}:{r.m}" if isinstance(r, NMResult) else f"unstructured {r.sparsity:.0%}"
        lines.append(
            f"\n{what} ({r.method}): {c['masked']} layers masked, {len(c['dense'])} left dense"
            + (f" (first {top}):" if len(c["dense"]) > top else ":" if c["dense"] else "")
        )
        lines += [f"  {layer}: {why}" for layer, why in list(c["dense"].items())[:top]]
    return lines


@dataclass
class NMResult(MaskCoverage, PassResult):
    """N:M masks of ``layers`` (``kept_magnitude``: the fraction of |w| the masks keep)."""

    masks: dict = field(default_factory=dict)
    updated: dict = field(default_factory=dict)
    n: int = 2
    m: int = 4
    method: str = "magnitude"
    layers: list[str] = field(default_factory=list)
    ineligible: dict[str, str] = field(default_factory=dict)  # layer -> why it was left dense
    kept_magnitude: float = 1.0
    wanda_fallback: dict[str, str] = field(default_factory=dict)  # SparseGPT -> Wanda, why
    magnitude_fallback: dict[str, str] = field(default_factory=dict)  # no input captured
    sequential: bool = False  # calibrated layer by layer in one forward (NM.sequential)
    outputs: list | None = field(default=None, repr=False)  # the graph's, per batch (sequential)

    @property
    def details(self) -> dict:
        out = super().details
        del out["outputs"]
        for k in ("wanda_fallback", "magnitude_fallback"):
            if not out[k]:
                del out[k]
        return out


@dataclass
class UnstructuredResult(MaskCoverage, PassResult):
    """Weights zeroed without a pattern (``layers``: param -> weights zeroed)."""

    masks: dict = field(default_factory=dict)
    sparsity: float = 0.0  # zeroed / eligible weights
    scope: str = "layer"
    method: str = "magnitude"
    layers: dict[str, int] = field(default_factory=dict)
    ineligible: dict[str, str] = field(default_factory=dict)  # layer -> why it stayed dense
    kept_magnitude: float = 1.0
    magnitude_fallback: dict[str, str] = field(default_factory=dict)  # wanda: no input captured

    @property
    def details(self) -> dict:
        out = super().details
        if not out["magnitude_fallback"]:
            del out["magnitude_fallback"]
        return out


@dataclass
class PermuteResult(PassResult):
    """Channels reordered so N:M masks keep more magnitude (exact: the model is unchanged)."""

    order: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    groups_permuted: int = 0
    kept_magnitude_before: float = 1.0
    kept_magnitude_after: float = 1.0
    not_permuted: dict[str, str] = field(default_factory=dict)  # layer -> why


@dataclass
class BlocksResult(PassResult):
    """Residual blocks bypassed (``removed``, in model order)."""

    removed: list[str] = field(default_factory=list)
    blocks_before: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    criterion: str | None = None
    output_deviation: float = 0.0  # max |change| of the outputs / max |output|
    not_removable: dict[str, str] = field(default_factory=dict)  # block -> why

    @property
    def bypassed(self) -> list[str]:
        return self.removed


@dataclass
class ExpertsResult(PassResult):
    """Routed experts removed from each mixture-of-experts layer (``removed``: layer -> expert
    indices; ``unrouted``: the same by router weight, what the proof's reference masks)."""

    keeps: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    unrouted: dict[str, list[int]] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    experts_before: dict[str, int] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    criterion: str | None = None
    output_deviation: float = 0.0  # max |change| of the outputs / max |output|


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


def check_masks_disjoint(results: list[PassResult]) -> None:
    """A weight carries one mask: an unstructured and an N:M pass may not both choose it."""
    owner: dict[str, str] = {}
    for r in results:
        for name in r.masks:
            if name in owner and owner[name] != r.name:
                raise ConfigError(
                    f"{name}: both the {owner[name]} and the {r.name} pass mask this weight; "
                    "split them with sparsity_exclude / unstructured_exclude (or the passes' "
                    "include / exclude)"
                )
            owner[name] = r.name


# the built-in passes register themselves on import; their configs are the public names a
# Recipe is made of (fxprune.passes.Heads, ...)
from fxprune.passes import (  # noqa: E402, F401
    blocks,
    channels,
    experts,
    ffn,
    heads,
    nm,
    permute,
    unstructured,
)
from fxprune.passes.blocks import Blocks  # noqa: E402
from fxprune.passes.channels import Channels  # noqa: E402
from fxprune.passes.experts import Experts  # noqa: E402
from fxprune.passes.ffn import FFN  # noqa: E402
from fxprune.passes.heads import Heads  # noqa: E402
from fxprune.passes.nm import NM  # noqa: E402
from fxprune.passes.permute import Permute  # noqa: E402
from fxprune.passes.unstructured import Unstructured  # noqa: E402

__all__ = [
    "FFN",
    "NM",
    "REGISTRY",
    "Blocks",
    "BlocksResult",
    "Channels",
    "Experts",
    "ExpertsResult",
    "Heads",
    "NMResult",
    "PassResult",
    "PassSpec",
    "Permute",
    "PermuteResult",
    "UnitsResult",
    "Unstructured",
    "UnstructuredResult",
    "check_masks_disjoint",
    "pass_of",
    "register_pass",
    "run_passes",
]
