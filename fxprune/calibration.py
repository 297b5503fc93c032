"""Run calibration batches through the traced graph and collect what data-driven importance
needs: mean |activation| of every channel where a Linear / Conv reads it, first-order Taylor saliency of every
weight, and the entropy / confidence of every attention head.

Batches are given as an iterable (each batch a tensor or a tuple of tensors laid out like the
example inputs). Statistics are averaged over batches. Taylor needs a loss: ``loss_fn(output,
batch) -> scalar``; without one, token-id inputs with an output holding ``logits [B, S, V]`` get
the causal LM loss, anything else the mean squared output (a proxy the report names).
``"learned"`` importance needs no batches but the user's ``train_fn``, which :func:`collect`
checks and hands on (``Stats.train_fn``): the gates are trained when the criterion scores, on
exactly the groups it scores (``fxprune.gates``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from fxprune._util import ticking
from fxprune.errors import ConfigError
from fxprune.gates import require_train_fn
from fxprune.graph.attention import sdpa_rule
from fxprune.graph.depgraph import DependencyGraph
from fxprune.graph.rules import find_rule
from fxprune.graph.trace import as_args

MAX_BATCHES = 128  # what compile(calibration_batches=None) takes from a calibration iterable


def take_batches(calibration, limit: int | None = None, model=None) -> tuple[tuple, ...] | None:
    """At most ``limit`` (default :data:`MAX_BATCHES`) batches of ``calibration``, each an
    argument tuple, read lazily (an endless generator is fine) and checked to be finite.

    Raises:
        ConfigError: ``limit`` is not a positive int, ``calibration`` is a tensor rather than an
            iterable of batches, it gave no batches, or a batch holds NaN / Inf (named by index).

    Example:
        >>> import itertools, torch
        >>> len(take_batches(torch.zeros(1, 3) for _ in itertools.count()))
        128
    """
    limit = MAX_BATCHES if limit is None else limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"calibration_batches={limit!r}: must be a positive int")
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        raise ConfigError(
            "calibration must be an iterable of batches, got a tensor (iterating it would "
            "split it along dim 0): pass [x]"
        )
    try:
        batches = itertools.islice(iter(calibration), limit)
    except TypeError as e:
        raise ConfigError(f"calibration must be an iterable of batches: {e}") from e
    out = []
    for i, b in enumerate(batches):
        b = as_args(b, model)  # a tensor, a tuple, or a dict of keyword inputs
        for t in pytree.tree_leaves(b):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.isfinite().all():
                raise ConfigError(f"calibration batch {i} holds NaN or Inf values")
        out.append(b)
    if not out:
        raise ConfigError("calibration: the iterable gave no batches (an exhausted generator?)")
    return tuple(out)


def as_batches(calibration, args: tuple) -> list[tuple]:
    """Normalise ``calibration`` (None: the example inputs) to a list of argument tuples."""
    if calibration is None:
        return [args]
    out = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration]
    if not out:
        raise ConfigError("calibration: the iterable gave no batches")
    return out


@dataclass
class Stats:
    """Per-atom statistics (NaN where a statistic does not apply) and per-weight saliency."""

    activation: np.ndarray | None = None
    entropy: np.ndarray | None = None  # log(keys) - entropy: higher = more focused
    confidence: np.ndarray | None = None
    taylor: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: str = ""
    train_fn: object = None  # "learned": the user's loop, run by fxprune.gates.learn


class Capture(fx.Interpreter):
    """Run ``gm`` and keep the values of the nodes named in ``keep`` (``seen``); with
    ``on_value(name, value)`` hand each over as it is made instead of keeping it, so a forward
    through many layers holds one layer's statistics input at a time, not every layer's."""

    def __init__(self, gm, keep: set[str], on_value=None):
        super().__init__(gm)
        self.keep, self.seen, self.on_value = keep, {}, on_value

    def run_node(self, n):
        v = super().run_node(n)
        if n.name in self.keep:
            if self.on_value is None:
                self.seen[n.name] = v
            else:
                self.on_value(n.name, v)
        return v


class Lockstep:
    """Every batch through ``gm`` together, one node at a time: ``after(node, values)`` sees a
    node's value for every batch before any later node runs, so it may change a weight that
    later nodes read (a sequential calibration prunes each layer on the inputs the already
    pruned layers before it give). Holds every batch's live values at once."""

    def __init__(self, gm: fx.GraphModule, batches):
        self.gm, self.batches = gm, list(batches)

    def run(self, after) -> list:
        """The graph's outputs, one per batch."""
        its = [fx.Interpreter(self.gm) for _ in self.batches]
        for it, b in zip(its, self.batches, strict=True):
            it.env, it.args_iter = {}, iter(self.gm.graph.process_inputs(*b))
        for node in self.gm.graph.nodes:
            for it in its:
                it.env[node] = it.run_node(node)
            after(node, [it.env[node] for it in its])
            if node.op == "output":
                return [self.gm.graph.process_outputs(it.env[node]) for it in its]
            for it in its:
                for dead in it.user_to_last_uses.get(node, []):
                    del it.env[dead]
        raise AssertionError("a graph without an output node")


def _per_position(v: torch.Tensor, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean |v| at every position of ``arr`` (dims of size 1 in ``arr`` are averaged)."""
    dims = [d for d in range(v.ndim) if arr.shape[d] == 1 and v.shape[d] > 1]
    m = v.detach().abs().double().mean(dim=dims, keepdim=True) if dims else v.detach().abs()
    m = m.double().expand(arr.shape) if m.shape != arr.shape else m.double()
    return arr.reshape(-1), m.reshape(-1).cpu().numpy()


def _probs(node: fx.Node, env: dict) -> torch.Tensor:
    """Attention probabilities ``[B, H, L, S]`` of a scaled-dot-product attention node."""
    q, k = env[node.args[0].name], env[node.args[1].name]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    mask = env.get(mask.name) if isinstance(mask, fx.Node) else None
    causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
    scale = node.kwargs.get("scale") or (node.args[6] if len(node.args) > 6 else None)
    scale = scale or 1.0 / math.sqrt(q.shape[-1])
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return F.softmax(s, dim=-1)


def _head_stats(p: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per head: log(S) - mean entropy, and mean max probability (over batch and queries)."""
    p = p.double().flatten(0, -4) if p.ndim > 4 else p.double()
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1)  # [B, H, L]
    info = math.log(p.shape[-1]) - ent.mean(dim=(0, 2))
    conf = p.amax(-1).mean(dim=(0, 2))
    return info.cpu().numpy(), conf.cpu().numpy()


def _lm_loss(shift: bool):
    def loss(out, batch):
        logits, ids = getattr(out, "logits", None), batch[0]
        if not (isinstance(logits, torch.Tensor) and logits.shape[:2] == ids.shape):
            raise ConfigError("LM loss: the output has no logits [batch, tokens, vocab]")
        if shift:  # predict the next token
            logits, ids = logits[:, :-1], ids[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))

    loss.__doc__ = "causal LM loss" if shift else "masked LM loss on the input tokens"
    return loss


def default_loss(model):
    """The LM loss for Hugging Face causal / masked LMs (by class name), else None."""
    name = type(model).__name__
    if "MaskedLM" in name:
        return _lm_loss(shift=False)
    if "CausalLM" in name or "LMHead" in name:
        return _lm_loss(shift=True)
    return None


def _loss(out, batch: tuple, loss_fn) -> tuple[torch.Tensor, str]:
    if loss_fn is not None:
        return loss_fn(out, batch), (loss_fn.__doc__ or "user loss_fn").strip().splitlines()[0]
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return sum(t.float().pow(2).mean() for t in leaves), "mean squared output (proxy)"


def collect(
    graph: DependencyGraph, batches: list[tuple], need: set[str], loss_fn=None, train_fn=None
) -> Stats:
    """Statistics ``need`` (``"activation"``, ``"taylor"``, ``"entropy"``, ``"confidence"``;
    ``"learned"``: ``train_fn``, checked, a ConfigError naming it when missing)."""
    gm, st = graph.gm, Stats()
    n = graph.n_atoms
    if "learned" in need:
        st.train_fn = require_train_fn(train_fn)
    if need & {"activation", "entropy", "confidence"}:
        keep = set(graph.probes) if "activation" in need else set()
        att_nodes = {nd.name: nd for nd in gm.graph.nodes if nd.name in graph.attention}
        if need & {"entropy", "confidence"}:
            for nd in att_nodes.values():
                keep.add(nd.name)
                keep |= {a.name for a in nd.all_input_nodes}
        act, ent, conf = np.zeros(n), np.full(n, np.nan), np.full(n, np.nan)
        held = {a.name for nd in att_nodes.values() for a in (nd, *nd.all_input_nodes)}

        def on_value(name, v):  # a probe is measured as it is made; attention inputs are held
            arr = graph.probes.get(name) if "activation" in need else None
            if arr is not None and isinstance(v, torch.Tensor) and v.ndim == arr.ndim:
                ids, vals = _per_position(v, arr)
                ok = ids >= 0
                np.add(act, np.bincount(ids[ok], vals[ok], minlength=n) / len(batches), out=act)
            if name in held:
                cap.seen[name] = v

        with torch.no_grad():
            for b in ticking(batches, "calibrating (activations)"):
                cap = Capture(gm, keep, on_value=on_value)
                cap.run(*b)
                for name, nd in att_nodes.items():
                    if not need & {"entropy", "confidence"}:
                        break
                    v = cap.seen[name]
                    p = _probs(nd, cap.seen) if find_rule(gm, nd) is sdpa_rule else v
                    info, c = _head_stats(p)
                    heads = graph.attention[name].reshape(-1, *graph.attention[name].shape[-3:])
                    for h, atom in enumerate(heads[0, :, 0, 0].tolist()):
                        if atom >= 0 and h < info.size:
                            ent[atom] = np.nan_to_num(ent[atom]) + info[h] / len(batches)
                            conf[atom] = np.nan_to_num(conf[atom]) + c[h] / len(batches)
        st.activation, st.entropy, st.confidence = act, ent, conf
    if "taylor" in need:
        params = dict(gm.named_parameters())
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        flags = {k: p.requires_grad for k, p in params.items()}
        try:
            for p in params.values():
                p.requires_grad_(True)
            for b in ticking(batches, "calibrating (gradients)"):
                gm.zero_grad(set_to_none=True)
                loss, st.loss = _loss(gm(*b), b, loss_fn)
                loss.backward()
                for k, p in params.items():
                    if p.grad is not None:
                        grads[k] += p.grad.detach()
        finally:
            for k, p in params.items():
                p.grad = None
                p.requires_grad_(flags[k])
        st.taylor = {k: (params[k].detach() * g).abs() for k, g in grads.items()}
    return st


def recalibrate_bn(module: torch.nn.Module, batches, max_batches: int | None = None):
    """Re-estimate every BatchNorm's running mean / variance on ``batches`` (in place) and return
    the module in eval mode. After channels are removed, the layers after them see different
    statistics than the stored ones; a few forward passes fix that without any training (a
    cumulative average: ``momentum=None`` while it runs). Other layers are not changed.
    """
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return module.eval()
    saved = [(m, m.momentum) for m in bns]
    stats = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns
    ]
    ran = 0
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    flags = [(m, m.training) for m in module.modules()]  # each submodule's own, restored after
    for m, _ in flags:
        m.training = any(m is b for b in bns)
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                module(*(b if isinstance(b, (tuple, list)) else (b,)))
                ran += 1
    finally:
        for m, mom in saved:
            m.momentum = mom
        for m, was in flags:
            m.training = was
        if not ran:  # nothing seen: put the old statistics back rather than mean 0 / var 1
            for m, (mean, var, n) in zip(bns, stats, strict=True):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)
    if not ran:
        raise ConfigError("recalibrate_bn: the batches gave nothing (an exhausted generator?)")
    return module.eval()
