"""Learned importance: train one soft gate per unit with the user's loop, and read the gates.

``importance="learned"`` wraps the captured model in a :class:`GatedModel` and hands it to the
user's ``train_fn(gated)``. Every unit ``u`` of the groups being scored gets a gate
``g_u = sigmoid(z_u)`` that scales every *consumer* slice of the unit (the o-projection columns of
a head, the down-projection columns of an FFN neuron, the next layers' input channels of a
channel): exactly the slices the equivalence proof zeroes when the unit is removed, so a gate at 0
is the unit removed and a gate at its start value is the dense model (the slices are scaled by
``g_u / g_0``; the wrapped model starts as the dense one, bit for bit).

The gate logits are the wrapper's only parameters; the model's weights are frozen and never
copied (``torch.func.functional_call`` runs the model on ``W * gates`` computed each forward), so
training cannot change the model that is then pruned. An L1 penalty ``l1 * mean(g)`` (the mean
over the gates: its gradient per gate shrinks with the unit count as a loss's share per unit
does, so one ``l1`` suits a pass of 72 heads and one of 9216 neurons) is added to every backward
through a gradient hook on the logits: ``train_fn``'s loss needs no extra term.
After ``train_fn`` returns, the gate values are the unit scores (low: removed first); the hook
is removed and the wrapper dropped.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from fxprune.errors import ConfigError
from fxprune.graph.depgraph import DependencyGraph, Group

L1 = 0.3
"""Default strength of the gates' L1 penalty ``l1 * mean(g)`` (``GatedModel.l1`` overrides it for
one run): ``l1 / n_gates * dg/dz`` is added to each gate logit's gradient on every backward. It
is in the loss's units: a gate closes when opening it fully lowers the loss by less than
``l1 / n_gates``. 0.3 suits losses of order 1 (cross-entropy, 1 - cosine, a relative squared
error); scale it with a loss much smaller or larger (on MiniLM 0.2 to 0.5 did equally well)."""

START = 3.0
"""Initial gate logit: ``sigmoid(3) = 0.953``, open but not saturated."""

NO_TRAIN_FN = (
    "importance='learned' needs train_fn=: your training loop, called as train_fn(gated) on the "
    "model wrapped with one trainable gate per unit (e.g. a few dozen Adam steps on "
    "gated.parameters() with your loss); fxprune.compile(..., train_fn=...)"
)


def require_train_fn(train_fn):
    """``train_fn``, checked to be callable (a ConfigError naming it otherwise)."""
    if train_fn is None:
        raise ConfigError(NO_TRAIN_FN)
    if not callable(train_fn):
        raise ConfigError(f"train_fn={train_fn!r:.60}: must be callable as train_fn(gated)")
    return train_fn


def _tensor(gm: nn.Module, name: str) -> torch.Tensor | None:
    try:
        return gm.get_parameter(name)
    except AttributeError:
        try:
            return gm.get_buffer(name)  # a buffer used as a weight (a fixed filter)
        except AttributeError:
            return None


def consumer_slices(
    graph: DependencyGraph, slot: np.ndarray, n: int
) -> list[tuple[str, torch.Tensor, list[tuple[int, torch.Tensor]]]]:
    """Per weight holding a gated unit's consumer slices: (name, tensor, [(dim, gate index of
    each position along dim)]); ``slot[unit]`` is the unit's gate, ``n`` means no gate (1)."""
    out: dict[int, tuple[str, torch.Tensor, list]] = {}  # by tensor identity: tied names once
    for name, dims in graph.params.items():
        w = _tensor(graph.gm, name)
        if w is None:
            continue
        for d, pd in dims.items():
            if not pd.consumer or pd.vec.size != w.shape[d]:
                continue
            lab = np.where(pd.vec >= 0, graph.label[np.maximum(pd.vec, 0)], -1)
            idx = np.where(lab >= 0, slot[np.maximum(lab, 0)], n)
            if not (idx < n).any():
                continue
            entry = out.setdefault(id(w), (name, w, []))
            if all(d != e[0] for e in entry[2]):
                entry[2].append((d, torch.as_tensor(idx, dtype=torch.long, device=w.device)))
    return list(out.values())


class GatedModel(nn.Module):
    """The model with a trainable gate per unit: what ``train_fn(gated)`` receives.

    - ``gated(*inputs)`` runs the model (same inputs, same outputs as ``result.module``) with
      every consumer slice of unit ``u`` scaled by ``g_u / g_0``, ``g_u = sigmoid(z_u)``;
    - ``gated.parameters()`` yields only the gate logits ``gated.logits`` (one per unit, starting
      at :data:`START`); the model's weights are frozen and no gradient reaches them;
    - ``gated.l1`` (default :data:`L1`) is the L1 penalty ``l1 * mean(g)`` on the gates, applied
      automatically: every backward through the logits adds its gradient to theirs, so the loss
      of ``train_fn`` is the task loss alone (``gated.l1 = 0`` turns it off);
    - ``gated.gates()`` gives the current gate values (to log or stop on).

    The model runs as it was captured, in eval mode (dropout off, BatchNorm on its running
    statistics, which are not updated); ``gated.train()`` does not change that.
    """

    def __init__(self, graph: DependencyGraph, units: list[int], l1: float = L1):
        super().__init__()
        n_labels = int(graph.label.max()) + 1 if graph.n_atoms else 0
        slot = np.full(max(n_labels, 1), len(units), dtype=np.int64)
        slot[np.asarray(units, dtype=np.int64)] = np.arange(len(units))
        self._model = [graph.gm]  # in a list: not a submodule, so parameters() is the gates only
        self._slices = consumer_slices(graph, slot, len(units))
        device = self._slices[0][1].device if self._slices else torch.device("cpu")
        self.logits = nn.Parameter(torch.full((len(units),), START, device=device))
        self.l1 = l1
        self._start = torch.sigmoid(torch.tensor(START))
        self._hook = self.logits.register_hook(self._penalty)

    def _penalty(self, grad: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.logits.detach())
        return grad + float(self.l1) / g.numel() * g * (1 - g)

    def gates(self) -> torch.Tensor:
        """The current gate values ``sigmoid(logits)`` (detached)."""
        return torch.sigmoid(self.logits.detach())

    def forward(self, *args, **kwargs):
        scale = torch.sigmoid(self.logits) / self._start.to(self.logits.device)
        scale = torch.cat([scale, scale.new_ones(1)])  # the last slot: positions without a gate
        params = {}
        for name, w, dims in self._slices:
            t = w.detach()
            for d, idx in dims:
                shape = [1] * t.ndim
                shape[d] = -1
                t = t * scale[idx].to(t.dtype).view(shape)
            params[name] = t
        return functional_call(self._model[0], params, args, kwargs)

    def close(self) -> None:
        """Remove the penalty hook (the wrapper is not usable for training after)."""
        self._hook.remove()


def learn(
    graph: DependencyGraph, groups: list[Group], train_fn, l1: float | None = None
) -> dict[int, float]:
    """Train a gate per unit of ``groups`` with ``train_fn(gated)`` and return each unit's gate
    value (in (0, 1); higher: more important). ``graph.gm`` is not changed: its weights are
    frozen (their ``requires_grad`` flags are restored after) and receive no gradient.

    Raises:
        ConfigError: ``train_fn`` is missing or not callable, it left every gate at its start
            value (its optimizer does not step ``gated.parameters()``), or it drove a gate to
            NaN / Inf.
    """
    require_train_fn(train_fn)
    units = [u for g in groups for u in g.units]
    if not units:
        return {}
    params = list(graph.gm.parameters())
    flags = [p.requires_grad for p in params]
    gated = GatedModel(graph, units, L1 if l1 is None else l1)
    try:
        for p in params:  # frozen: no weight gradient is computed or stored
            p.requires_grad_(False)
        train_fn(gated)
    finally:
        gated.close()
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    z = gated.logits.detach().double()
    if not bool(torch.isfinite(z).all()):
        raise ConfigError("train_fn drove gate logits to NaN or Inf (lower its learning rate)")
    if bool((z == START).all()):
        raise ConfigError(
            "train_fn did not update the gates: does its optimizer take gated.parameters()? "
            "(every gate is still at its start value)"
        )
    return dict(zip(units, torch.sigmoid(z).tolist(), strict=True))
