"""The user's model is never touched, and the pruned module behaves like a model.

``fxprune.compile`` works on a copy. This module holds what that promise needs:

* every submodule's own ``training`` flag, saved and restored exactly (``model.train(flag)``
  would reset a frozen BatchNorm inside a training model);
* ``inplace=True`` commits a finished copy into the user's model in one step, so a failing pass
  leaves it exactly as it was; where the passes only replace tensors with sliced ones and write
  into none, that copy's tensors alias the model's storage (:func:`shared_copy`) instead of
  duplicating every weight;
* hooks, which a traced graph cannot carry, are refused with the module's name;
* a graph traced in eval mode that would not train like the model (``F.dropout(training=...)``,
  an ``if self.training:`` branch, anything captured by ``torch.export``) refuses ``.train()``
  with the reason instead of silently training as an inference graph.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import copyreg
import types

import torch.nn as nn

from fxprune.errors import TrainModeError, UnsupportedModelError
from fxprune.graph.canonical import canonicalize
from fxprune.graph.capture import without_cache
from fxprune.graph.trace import symbolic

HOOKS = {
    "_forward_pre_hooks": "forward pre-hook",
    "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
}


def training_flags(model: nn.Module) -> dict[str, bool]:
    """Each submodule's own ``training`` flag, by name ("" is the model itself)."""
    return {name: m.training for name, m in model.named_modules(remove_duplicate=False)}


def restore_training(model: nn.Module, flags: dict[str, bool]) -> None:
    """Set each submodule's flag back to ``flags`` (names the model no longer has are skipped;
    modules the capture added, such as a GraphModule's own, take their parent's flag)."""
    for name, m in model.named_modules(remove_duplicate=False):
        if name in flags:
            flag = flags[name]
        else:
            parent = name.rpartition(".")[0]
            flag = flags.get(parent, flags.get("", False))
        if m.training is not flag:  # Module.__setattr__ is slow: set only what changes
            m.training = flag


def check_hooks(model: nn.Module) -> None:
    """Refuse a model with hooks: a traced graph runs its layers without them (top-level hooks
    vanish) or runs them on fake tensors while tracing (inner ones crash or see garbage)."""
    found = [
        f"{HOOKS[attr]} on {name or type(model).__name__!r}"
        for name, m in model.named_modules()
        for attr in HOOKS
        if getattr(m, attr, None)
    ]
    if found:
        raise UnsupportedModelError(
            f"the model has hooks fxprune cannot carry into the pruned graph: {', '.join(found[:5])}"
            + (f" (+{len(found) - 5} more)" if len(found) > 5 else "")
            + "; remove them before fxprune.compile and register them again on the pruned "
            "model's submodules (result.model, your class, runs them)"
        )


def train_difference(eval_code: str, train_code: str) -> str | None:
    """None when the graphs traced in eval and in train mode are the same code (training
    behaviour lives in leaf modules such as BatchNorm and Dropout, which keep their flags);
    else the first line that differs."""
    a, b = eval_code.splitlines(), train_code.splitlines()
    for x, y in zip(a, b, strict=False):
        if x != y:
            return f"traced in eval as `{x.strip()}`, in train mode as `{y.strip()}`"
    if len(a) != len(b):
        return "the forward traces to a different graph in train mode"
    return None


def guard_training(gm: nn.Module, reason: str) -> None:
    """Make ``gm.train(True)`` raise :class:`TrainModeError` with ``reason``; ``eval()`` works."""

    def train(self, mode: bool = True):
        if mode:
            raise TrainModeError(
                f"{type(self).__name__} cannot be put in train mode: {reason}. It would run as an "
                "inference graph (no dropout, frozen batch-norm statistics, train-only branches "
                "dropped). Fine-tune it in eval mode if that is what you want (gradients flow), or "
                "prune a model that traces with torch.fx to one graph in both modes"
            )
        return nn.Module.train(self, False)

    gm.train = types.MethodType(train, gm)
    gm.fxprune_train_refused = reason


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree over the model's own storage: each parameter a new Parameter
    viewing the same data (``requires_grad`` and ``.grad`` its own), each buffer the same
    tensor; modules, flags and other attributes are copies. Only for work that replaces tensors
    and never writes into one: anything written into a tensor here is written into the model."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b
    return _deepcopy(model, memo)


_ATOMS = frozenset({int, float, bool, str, bytes, type(None)})
_EMPTY = frozenset({dict, collections.OrderedDict, set})
_PLAIN: dict[type, bool] = {}
_NIL = object()


def _plain(m: nn.Module) -> bool:
    """Would ``copy.deepcopy`` copy ``m`` by the generic reduce (``cls.__new__``, then its
    ``__getstate__`` dict deep-copied into its ``__setstate__``)? Not where the class or the
    instance customises copying or reduction."""
    cls = type(m)
    if cls not in _PLAIN:
        _PLAIN[cls] = (
            getattr(cls, "__deepcopy__", None) is None
            and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and cls not in copyreg.dispatch_table
            and not hasattr(cls, "__getnewargs_ex__")
            and not hasattr(cls, "__getnewargs__")
            and not copyreg._slotnames(cls)
        )
    own = ("__deepcopy__", "__reduce_ex__", "__getstate__")  # set on the instance itself
    return _PLAIN[cls] and not any(k in m.__dict__ for k in own)


def _deepcopy(x, memo: dict):
    """``copy.deepcopy(x, memo)``, the same objects made, with the module tree's bulk done
    directly: each plain module's state, its plain dicts and the dozen empty hook dicts every
    module holds (copy's generic reduce path costs a few microseconds each: 7 of the 10 ms a
    ResNet-50 copy took). Anything else goes to ``copy.deepcopy`` with the same memo."""
    y = memo.get(id(x), _NIL)
    if y is not _NIL:
        return y
    t = type(x)
    if t in _ATOMS:
        return x
    if t is tuple and all(type(a) in _ATOMS for a in x):
        return x  # what copy.deepcopy gives a tuple of atoms: itself
    if t in _EMPTY and not x:
        y = memo[id(x)] = t()
        return y
    if t is dict:
        y = memo[id(x)] = {}
        for k, v in x.items():
            y[_deepcopy(k, memo)] = _deepcopy(v, memo)
        return y
    if isinstance(x, nn.Module) and _plain(x):
        state = x.__getstate__()
        if type(state) is dict:
            y = memo[id(x)] = t.__new__(t)
            y.__setstate__({k: _deepcopy(v, memo) for k, v in state.items()})
            return y
    return copy.deepcopy(x, memo)


def commit_inplace(model: nn.Module, work: nn.Module) -> None:
    """Make ``model`` the pruned ``work`` copy in one step (its layers, parameters, buffers and
    flags become the copy's; the pruned graph module shares them)."""
    model.__dict__.update(work.__dict__)


def inplace_refused(model: nn.Module, mode: str) -> str:
    return (
        f"inplace=True: {type(model).__name__} was captured with torch.export, whose graph holds "
        "its own copies of the layers, so the model cannot be pruned in place; drop inplace=True "
        "(the model stays untouched, the pruned model is result.module) or pass mode='fx' where "
        "the model traces with torch.fx"
        if mode == "export"
        else f"inplace=True is not supported with {mode} capture"
    )


__all__ = [
    "check_hooks",
    "commit_inplace",
    "guard_training",
    "inplace_refused",
    "restore_training",
    "shared_copy",
    "train_difference",
    "training_flags",
]


def train_refused(work, args, traced, leaf_modules, dynamic) -> str | None:
    """Why the eval-mode capture would not train like the model, or None when it would. The
    train-mode forward is traced symbolically only: the code is what is compared."""
    if traced.mode != "fx":
        return "it was captured by torch.export in eval mode"
    try:
        with all_training(work), without_cache(work):  # as the capture traced it
            again = symbolic(work, leaf_modules)
    except Exception as e:  # noqa: BLE001 - any failure to trace means it cannot be compared
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"its forward does not trace in train mode ({type(e).__name__}: {first[:200]})"
    canonicalize(again)  # the capture's own rewrite, so only the modes differ
    return train_difference(traced.gm.code, again.code)


@contextlib.contextmanager
def all_training(module: nn.Module):
    flags = training_flags(module)
    module.train()
    try:
        yield module
    finally:
        restore_training(module, flags)
