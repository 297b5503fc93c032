"""``fxprune.backend``: a ``torch.compile`` backend that prunes the graphs dynamo captures.

``torch.compile(dense, backend=fxprune.backend(plan))`` replays a saved plan (or runs a recipe)
on each graph dynamo hands the backend, then gives the smaller graph to inductor (or any other
dynamo backend). Dynamo lifts every parameter and buffer to a graph input; the backend names
each by identity with the model's own tensors (``layer1.0.conv1.weight``, whatever frame or
submodule the graph comes from), turns them into ``get_attr`` attributes of a graph module,
runs the pass registry on it exactly as ``fxprune.apply_plan`` does, and returns a callable
that drops the dense tensors dynamo passes at each call: the compiled graph reads the pruned
ones it holds.

Where dynamo splits the forward (a graph break), each graph is pruned on its own. A plan that
prunes a layer whose channels leave its graph (consumed after the break) is refused with a
:class:`PlanError` naming the layers and the break; a recipe keeps those channels. ``.report``
says what each graph pruned.
"""

from __future__ import annotations

import json
import time
import weakref
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.checkpoint import read_checkpoint
from fxprune.compile_backend.dynamo import (
    compiled_module,
    frame_object,
    graph_end,
    leaving,
    prefixes,
    rebuild,
    state_root,
)
from fxprune.compile_backend.report import BackendReport, GraphReport
from fxprune.compile_backend.sparse import check_all, compile_sparse, semi_structured
from fxprune.errors import (
    CheckpointError,
    ConfigError,
    NothingToPruneError,
    PlanError,
    TrainModeError,
)
from fxprune.importance import resolve
from fxprune.options import from_options
from fxprune.passes import REGISTRY, Blocks, run_passes
from fxprune.plan import CompileResult, Plan, Summary
from fxprune.recipe import Recipe, check_recipe
from fxprune.stats import layer_stats
from fxprune.uniform import check_uniform
from fxprune.verify.semi_structured import check_options

__all__ = ["Backend", "BackendReport", "GraphReport", "backend"]

NAMED = ("kept", "orders", "layers", "removed")  # plan-entry fields keyed by layer / param names


def backend(
    source=None,
    *,
    compiler="inductor",
    trust: bool = False,
    semi_structured: str = "measured",
    min_speedup: float | None = None,
    **options,
) -> Backend:
    """A ``torch.compile`` backend that prunes what dynamo captures, then compiles it.

    Args:
        source: what to prune: a :class:`fxprune.Plan` (or its dict / JSON text), a path to a
            plan JSON file, a checkpoint written by ``CompileResult.save`` (plan + pruned
            weights, e.g. fine-tuned), a :class:`fxprune.CompileResult` (its plan and
            ``module``'s weights), or a :class:`fxprune.Recipe` run on each graph. None: the
            keyword ``options`` build the recipe, as for ``fxprune.compile``.
        compiler: the dynamo backend that compiles the pruned graph: a name for
            ``torch._dynamo.lookup_backend`` (``"inductor"``, ``"aot_eager"``, ``"eager"``) or
            a backend callable (e.g. ``functools.partial(compile_fx, config_patches=...)``).
        trust: a checkpoint may hold pickled objects (see ``fxprune.load``).
        semi_structured: on a CUDA graph, N:M-masked Linear weights become 2:4 semi-structured
            sparse tensors where each Linear was measured at least ``min_speedup`` times faster
            that way at the graph's shapes (each Linear timed alone, eager: the kernel, not what
            inductor fuses around it; ``"measured"``), all eligible ones (``"all"``, an error
            when none converts) or none (``"off"``); each graph's report holds the decisions.
            CPU graphs stay dense.
        **options: ``fxprune.compile``'s recipe keywords (``channels=0.5, ignore=["fc"]``),
            only without ``source``. Names are resolved against the compiled model.

    A plan is replayed exactly: the pruned graph equals ``fxprune.apply_plan(model, plan)``'s.
    Weights are read when a graph compiles (sliced from the dense model, or the checkpoint's);
    in-place changes to the dense model afterwards are not seen (``torch._dynamo.reset()``).
    Inference only: a model in training mode is refused (``TrainModeError``). Criteria that
    measure on calibration data are refused inside dynamo: prune with ``fxprune.compile(...,
    calibration=...)`` and pass ``result.plan``.

    Example:
        >>> b = fxprune.backend("r18.plan.json")  # doctest: +SKIP
        >>> y = torch.compile(model, backend=b)(x)  # doctest: +SKIP
        >>> print(b.report.table())  # doctest: +SKIP
    """
    if options and source is not None:
        raise ConfigError(
            f"fxprune.backend(source, {', '.join(sorted(options))}=...): keyword options build "
            "a recipe and go without a source (put them in the Recipe)"
        )
    if "calibration" in options or "loss_fn" in options:
        raise ConfigError(
            "fxprune.backend does not measure on calibration data (dynamo shows it one call's "
            "inputs): run fxprune.compile(model, x, ..., calibration=...) and pass result.plan"
        )
    if source is None and not options:
        raise ConfigError("fxprune.backend(): give a plan, a checkpoint, a recipe or options")
    plan, weights, recipe, what = _source(source, trust)
    check_options(semi_structured, min_speedup)
    check_all(semi_structured, plan, recipe, options)
    b = Backend(plan, weights, recipe, options, _compiler(compiler), what)
    b.sparse = (semi_structured, min_speedup)
    return b


def _source(source, trust: bool):
    """(plan, pruned weights, recipe, description) from what ``backend`` was given."""
    if isinstance(source, CompileResult):
        return source.plan, source.module.state_dict(), None, "a CompileResult's plan"
    if isinstance(source, Recipe):
        return None, None, source, "recipe"
    if isinstance(source, Plan):
        return source, None, None, "plan"
    if isinstance(source, dict):
        return Plan.from_dict(source), None, None, "plan"
    if source is None:
        return None, None, None, "recipe keywords"
    if not isinstance(source, (str, Path)):
        raise ConfigError(
            f"fxprune.backend: source is a {type(source).__name__}; give a Plan, a plan or "
            "checkpoint path, a CompileResult or a Recipe"
        )
    text = str(source)
    if text.lstrip().startswith("{"):
        return Plan.from_json(text), None, None, "plan"
    p = Path(source)
    if not p.is_file():
        raise ConfigError(f"fxprune.backend: {p} is not a file (a plan, checkpoint or recipe)")
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{p}: not JSON ({e.msg} at line {e.lineno})") from e
        if isinstance(data, dict) and "passes" in data and "inputs" not in data:
            return None, None, Recipe.load(p), f"recipe {p.name}"  # a recipe has no inputs
        try:
            return Plan.from_dict(data), None, None, f"plan {p.name}"
        except PlanError as e:
            raise PlanError(f"{p}: {e}") from e
    ckpt = read_checkpoint(p, trust)
    try:
        plan = Plan.from_dict(ckpt["plan"])
    except PlanError as e:
        raise CheckpointError(f"{p}: {e}") from e
    return plan, ckpt["state_dict"], None, f"checkpoint {p.name}"


def _compiler(compiler):
    if callable(compiler):
        return compiler
    import torch._dynamo

    try:
        return torch._dynamo.lookup_backend(compiler)
    except Exception as e:  # noqa: BLE001 - dynamo raises InvalidBackend (a private type)
        names = torch._dynamo.list_backends(exclude_tags=())
        raise ConfigError(f"compiler={compiler!r}: not a dynamo backend ({names})") from e


def _entry_names(entry: dict) -> list[str]:
    """The layer / parameter names a plan entry refers to."""
    out = []
    for k in NAMED:
        v = entry.get(k)
        out += list(v) if isinstance(v, dict) else [x for x in v or () if isinstance(x, str)]
    return out


def _restrict(entry: dict, here: set[str]) -> dict | None:
    """``entry`` with only the layers / params this graph holds; None when none are here."""
    out, left = dict(entry), False
    for k in NAMED:
        v = entry.get(k)
        if isinstance(v, dict):
            out[k] = {n: x for n, x in v.items() if n in here}
            left |= bool(out[k])
        elif isinstance(v, (list, tuple)):
            out[k] = [n for n in v if not isinstance(n, str) or n in here]
            left |= bool(out[k])
    return out if left else None


class Backend:
    """The callable ``torch.compile`` runs on each graph dynamo captures; see :func:`backend`.
    ``report`` (a :class:`BackendReport`) grows by one :class:`GraphReport` per graph."""

    __name__ = "fxprune"  # how dynamo's messages name the backend

    def __init__(self, plan, weights, recipe, options, compiler, what):
        self.plan, self.weights, self.recipe, self.options = plan, weights, recipe, options
        self.compiler = compiler
        self.sparse = ("measured", None)  # semi_structured mode, min_speedup (None: default)
        self.report = BackendReport(what)
        self._names: dict[int, tuple[str, weakref.ref]] = {}  # id(tensor) -> name in the model
        self._model = lambda: None
        self.model_type = "model"
        if plan is not None:
            data = [e.get("method") for e in plan.passes if e["name"] == "nm"]
            if weights is None and any(m not in (None, "magnitude") for m in data):
                raise PlanError(
                    "this plan's N:M masks were chosen on calibration data and cannot be "
                    "recomputed from the dense weights: give the checkpoint instead"
                )
            self.report.plan_layers = sorted(
                {n for e in plan.passes if e["name"] != "nm" for n in _entry_names(e)}
            )

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        try:
            return self._compile(gm, list(example_inputs))
        except Exception as e:
            self.report.errors.append(f"{type(e).__name__}: {e}")
            raise

    def _name(self, t) -> str | None:
        hit = self._names.get(id(t)) if isinstance(t, torch.Tensor) else None
        return hit[0] if hit and hit[1]() is t else None

    def _index(self, model: nn.Module) -> set[str]:
        named = list(model.named_parameters()) + list(model.named_buffers())
        self._names = {id(x): (k, weakref.ref(x)) for k, x in named}
        return {k for k, _ in named}

    def _learn(self, gm, example_inputs) -> bool:
        """Learn the model (the module the first stateful graph's parameters come from); return
        whether this graph is the model's own frame (not a submodule's after a break in it)."""
        own = False
        for n, t in zip(gm.graph.find_nodes(op="placeholder"), example_inputs, strict=True):
            arg = n.meta.get("grapharg")
            root = state_root(arg.source) if arg is not None else None
            if root is None or not isinstance(t, torch.Tensor):
                continue
            raw, model = frame_object(*root), self._model()
            own |= model is not None and raw is model
            if self._name(t) is None and model is not None:
                self._index(model)  # a parameter replaced since: dynamo recompiles, so do we
            if self._name(t) is not None:
                continue
            obj = compiled_module(raw)
            if model is not None:
                raise PlanError(
                    f"fxprune.backend: a graph reads {arg.source.name}, which is not a tensor of "
                    f"the {self.model_type} this backend compiled first: use one fxprune.backend "
                    "per model"
                )
            if not isinstance(obj, nn.Module):
                raise ConfigError(f"fxprune.backend: {root[1]!r} is not the module compiled")
            self.model_type = type(obj).__name__
            self._model = weakref.ref(obj)
            self._check(obj, self._index(obj))
            own = raw is obj
        model = self._model()
        if model is not None and any(m.training for m in model.modules()):
            raise TrainModeError(
                f"fxprune.backend compiles inference graphs: {self.model_type} is in training "
                "mode; call model.eval() first (train the pruned model from fxprune.compile)"
            )
        return own

    def _check(self, model: nn.Module, names: set[str]) -> None:
        """The plan's layers exist in ``model``; the recipe's names resolve and it measures on
        no data."""
        if self.plan is not None:
            wanted = {n for e in self.plan.passes for n in _entry_names(e)}
            missing = sorted(wanted - prefixes(names))
            if missing:
                raise PlanError(
                    f"plan names layers this {self.model_type} does not have: {missing[:5]}; "
                    "was it made for another model?"
                )
            return
        if self.recipe is None:
            self.recipe, _ = from_options(model, **self.options)
        check_recipe(model, self.recipe)
        for cfg in self.recipe.passes:
            crit = getattr(cfg, "importance", None)
            if (
                (isinstance(cfg, Blocks) and isinstance(cfg.which, int))
                or getattr(cfg, "method", "magnitude") != "magnitude"
                or (crit is not None and resolve(crit).needs)
            ):
                raise ConfigError(
                    f"recipe pass {type(cfg).__name__} measures on calibration data, which "
                    "fxprune.backend does not see: prune with fxprune.compile(model, x, "
                    "recipe, calibration=...) and pass result.plan"
                )

    def _compile(self, gm: fx.GraphModule, example_inputs: list):
        t0 = time.perf_counter()
        own = self._learn(gm, example_inputs)
        frame, ends, whole = graph_end(gm)
        rec = GraphReport(str(gm.meta.get("dynamo_compile_id", "?")), frame, ends)
        new, keep, args = rebuild(gm, example_inputs, self._name)
        self.report.graphs.append(rec)
        if new is None:  # no tensor of the model in this graph: nothing to prune
            return self.compiler(gm, example_inputs)
        before = {k: list(v.shape) for k, v in new.state_dict().items()}
        stats = layer_stats(new)
        masks = self._prune(new, args, whole and own, rec)
        rec.shapes = {
            k: [before[k], list(v.shape)]
            for k, v in new.state_dict().items()
            if list(v.shape) != before.get(k)
        }
        rec.summary = Summary.between(stats, layer_stats(new))
        rec.semi_structured, dense = semi_structured(new, masks, args, *self.sparse)
        for n in new.graph.nodes:  # fake values of fxprune's own fake mode stay out of inductor
            n.meta.pop("val", None)
        inputs = [example_inputs[i] for i in keep]
        inner = compile_sparse(self.compiler, new, inputs, rec.semi_structured, dense)
        rec.seconds = time.perf_counter() - t0

        def run(*inputs):  # dynamo passes the dense tensors too: the graph holds pruned ones
            return inner(*[inputs[i] for i in keep])

        return run

    def _prune(self, new: fx.GraphModule, args: tuple, whole: bool, rec: GraphReport) -> dict:
        """Run the plan's entries for this graph's layers, or the recipe, on ``new``; return
        the N:M masks it set (param name -> mask)."""
        out = [] if whole else leaving(new)
        if self.plan is None:
            passes, allow = list(self.recipe.passes), self.recipe.allow_approximate
            rec.kept_at_break = out
        else:
            passes, allow = self._replayed(new, out, rec), self.plan.config.get("allow_approximate")
        if not passes:
            return {}
        try:
            _, results = run_passes(new, passes, args, allow_approximate=bool(allow))
        except NothingToPruneError:
            if whole or self.plan is not None:
                raise
            results = []  # a recipe on a part of the forward that holds nothing it prunes
        if self.recipe is not None and self.recipe.uniform:
            check_uniform(results)
        rec.layers = sorted({la for r in results if r.name != "nm" for la in _entry_names(r.plan)})
        if self.weights is not None:
            self._load(new)
        return {k: m for r in results if r.name == "nm" for k, m in r.masks.items()}

    def _replayed(self, new: fx.GraphModule, out: list[str], rec: GraphReport) -> list:
        """The configs replaying the plan's entries restricted to this graph's layers; a layer
        whose channels leave the graph (a graph break) is refused."""
        here = prefixes(k for k, _ in new.named_parameters()) | prefixes(
            k for k, _ in new.named_buffers()
        )
        entries = [r for e in self.plan.passes if (r := _restrict(e, here)) is not None]
        crossing = sorted(set(out) & {n for e in entries for n in _entry_names(e)})
        if crossing:
            raise PlanError(
                f"fxprune.backend: the plan prunes {', '.join(crossing[:6])} in graph "
                f"{rec.compile_id} ({rec.frame}, which ends: {rec.ends}), but their channels "
                "leave that graph and are used after the graph break; a coupled group cannot "
                "be pruned across a graph break. Remove the break (torch._dynamo.explain(model)"
                "(x) lists them), or compile the pruned model: torch.compile(fxprune.apply_plan("
                "model, plan).model)"
            )
        configs = []
        for i, e in enumerate(entries):
            if e["name"] not in REGISTRY:
                raise PlanError(f"plan pass {i} is {e['name']!r}, not one of {sorted(REGISTRY)}")
            try:
                configs.append(REGISTRY[e["name"]].replay(e))
            except (KeyError, TypeError, ValueError) as err:
                raise PlanError(f"plan pass {i} ({e['name']}) is malformed: {err}") from err
        return configs

    def _load(self, new: fx.GraphModule) -> None:
        """The checkpoint's (or CompileResult's) pruned weights over the replayed ones."""
        with torch.no_grad():
            for k, v in new.state_dict().items():
                w = self.weights.get(k)
                if w is None:
                    continue
                if w.shape != v.shape:
                    raise CheckpointError(
                        f"the saved {k} is {tuple(w.shape)}, the replayed plan gives "
                        f"{tuple(v.shape)}: the weights do not belong to this plan"
                    )
                v.copy_(w)
