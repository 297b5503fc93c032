"""The fixes that make a sliced module consistent again, each in a registry.

``LAYERS`` (``@layer_fix``): a layer's shape attributes follow its new tensors
(``out_features``, ``in_channels`` / ``groups``, ``num_features``, HF ``Conv1D.nf``...).
``MODULES`` (``@module_fix``): a module whose forward reads its children's sizes (head counts,
split sizes) recomputes them; a class without an entry gets the generic attention and MLP fixes.
``fxprune.materialize`` applies them; timm's and torchvision's entries live in
``materialize_timm`` and ``materialize_torch``.
"""

from __future__ import annotations

import numpy as np
import torch.nn as nn

from fxprune._util import module_attr

# ---------------------------------------------------------------- layer attributes from weights

LAYERS: dict = {}  # layer type -> fix(module): its shape attributes follow its tensors
LAYERS_BY_NAME: dict = {}  # "module.Class" -> fix, for types of optional packages


def layer_fix(*types, names=()):
    def deco(fn):
        for t in types:
            LAYERS[t] = fn
        for n in names:
            LAYERS_BY_NAME[n] = fn
        return fn

    return deco


def fix_layer(m: nn.Module) -> None:
    for cls in type(m).__mro__:
        fn = LAYERS.get(cls) or LAYERS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            fn(m)
            return
    _expert_counts(m)


EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def _expert_counts(m: nn.Module) -> None:
    """A mixture-of-experts router or experts module (no class of its own here): its expert
    count follows its per-expert tensors (dim 0 of a router's 2-D weight or of a 3-D expert
    parameter), the experts' FFN width their down projection's input."""
    own = [t for t in m._parameters.values() if t is not None]
    per_expert = [t for t in own if t.ndim == 3] or [t for t in own if t.ndim == 2]
    if not per_expert:
        return
    for a in EXPERT_COUNTS:
        if isinstance(getattr(m, a, None), int):
            setattr(m, a, per_expert[0].shape[0])
    down = m._parameters.get("down_proj")
    if (
        down is not None
        and down.ndim == 3
        and isinstance(getattr(m, "intermediate_dim", None), int)
    ):
        m.intermediate_dim = down.shape[2]


@layer_fix(nn.Linear)
def _linear(m):
    m.out_features, m.in_features = m.weight.shape


@layer_fix(names=("transformers.pytorch_utils.Conv1D",))
def _hf_conv1d(m):
    m.nx, m.nf = m.weight.shape  # GPT-2's Conv1D stores its weight transposed: (in, out)


@layer_fix(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(m):
    per_group = m.out_channels // m.groups  # outputs per group: whole groups are removed
    out = m.weight.shape[0]
    m.groups = out // per_group if m.groups > 1 else 1
    m.out_channels, m.in_channels = out, m.weight.shape[1] * m.groups


@layer_fix(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_t(m):
    per_group = m.in_channels // m.groups
    cin = m.weight.shape[0]
    m.groups = cin // per_group if m.groups > 1 else 1
    m.in_channels, m.out_channels = cin, m.weight.shape[1] * m.groups


@layer_fix(nn.modules.batchnorm._NormBase)
def _bn(m):
    t = m.weight if m.weight is not None else m.running_mean
    if t is not None:
        m.num_features = t.shape[0]


@layer_fix(nn.GroupNorm)
def _gn(m):
    if m.weight is not None:
        per_group = m.num_channels // m.num_groups
        m.num_channels = m.weight.shape[0]
        m.num_groups = m.num_channels // per_group


@layer_fix(nn.LayerNorm, nn.RMSNorm)
def _ln(m):
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@layer_fix(nn.Embedding, nn.EmbeddingBag)
def _embedding(m):
    m.num_embeddings, m.embedding_dim = m.weight.shape


@layer_fix(nn.PReLU)
def _prelu(m):
    m.num_parameters = m.weight.numel()


# ---------------------------------------------------------------- attention / MLP attributes

HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "dim_head", "key_value_proj_dim")
Q_PROJ = ("q_proj", "query", "q", "wq", "to_q", "q_lin")
K_PROJ = ("k_proj", "key", "k", "wk", "to_k", "k_lin")
QKV_PROJ = ("qkv", "c_attn", "qkv_proj", "Wqkv", "query_key_value")  # q, k, v stacked
HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
INNER = ("all_head_size", "inner_dim", "split_size", "attn_dim")  # heads x head_dim
MLP_IN = ("gate_proj", "up_proj", "fc1", "c_fc", "w1", "dense_h_to_4h")


def out_size(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    if hasattr(m, "nf"):  # HF Conv1D
        return m.nf
    return None


def _first(m: nn.Module, names) -> tuple[str, nn.Module] | None:
    for n in names:
        child = module_attr(m, n)
        if isinstance(child, nn.Module):
            return n, child
    return None


def fix_attention(m: nn.Module, shrunk: set[int]) -> None:
    """Recompute ``m``'s head counts from its projections' new sizes and its ``head_dim`` when
    one of its projections is in ``shrunk`` (ids of layers whose output size changed). A module
    without a ``head_dim`` attribute derives its sizes per call; the agreement check decides."""
    q, k, qkv = _first(m, Q_PROJ), _first(m, K_PROJ), _first(m, QKV_PROJ)
    proj = [p[1] for p in (q, k, qkv) if p is not None]
    if not any(id(p) in shrunk for p in proj):  # the common case: read no more attributes
        return
    hd = next((getattr(m, a) for a in HEAD_DIM if isinstance(getattr(m, a, None), int)), None)
    if hd is None or any(out_size(p) is None for p in proj):
        return
    if q is None:  # fused q, k, v
        n_q, n_kv = _fused_counts(m, out_size(qkv[1]) // hd)
    else:
        n_q = out_size(q[1]) // hd
        n_kv = out_size(k[1]) // hd if k is not None else n_q
    for names, value in ((HEADS, n_q), (KV_HEADS, n_kv), (INNER, n_q * hd)):
        for a in names:
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, value)
    if isinstance(getattr(m, "num_key_value_groups", None), int) and n_kv:
        m.num_key_value_groups = n_q // n_kv


def _fused_counts(m: nn.Module, slots: int) -> tuple[int, int]:
    """(query heads, key/value heads) of a fused projection holding ``slots`` head-sized rows,
    ``n_q + 2 n_kv``. The module's dense counts say the layout: as many KV heads as query heads
    (3 per head); one KV head shared by every query head (multi-query: the queries were the
    units, the KV head stays); else KV groups removed whole, each with its query heads."""
    n_q0 = next((getattr(m, a) for a in HEADS if isinstance(getattr(m, a, None), int)), None)
    n_kv0 = next((getattr(m, a) for a in KV_HEADS if isinstance(getattr(m, a, None), int)), n_q0)
    if not n_q0 or not n_kv0 or n_kv0 == n_q0 or n_q0 % n_kv0:
        return slots // 3, slots // 3
    if n_kv0 == 1:
        return slots - 2, 1
    groups = slots // (n_q0 // n_kv0 + 2)
    return groups * (n_q0 // n_kv0), groups


def fix_mlp(m: nn.Module, shrunk: set[int]) -> None:
    hit = _first(m, MLP_IN)
    if hit is not None and id(hit[1]) in shrunk:
        for a in ("intermediate_size", "ffn_dim", "hidden_features"):
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, out_size(hit[1]))


# Modules whose forward reads sizes of their children (split sizes, head counts): by class,
# run after every layer has its new shape, children before parents. A class without an entry
# gets the generic attention and MLP fixes. Entries for timm's classes: materialize_timm.py.
class Shrunk(set):
    """Ids of the layers whose output size changed, as a module fix receives them, and which of
    a layer's original outputs it kept (for a forward that slices by a count, where the new
    count depends on where the kept outputs lie: DPN's ``num_1x1_c``)."""

    def __init__(self, ids, rows: dict[str, np.ndarray], names: dict[int, str]):
        super().__init__(ids)
        self._rows, self._names = rows, names

    def kept(self, layer: nn.Module) -> np.ndarray | None:
        """Indices of ``layer``'s original output rows (weight dim 0) it kept; None when the
        passes did not change them."""
        return self._rows.get(f"{self._names.get(id(layer), '')}.weight")


def kept_rows(results) -> dict[str, np.ndarray]:
    """``{weight name: original output rows kept}``, composed over the passes in order."""
    rows: dict[str, np.ndarray] = {}
    for r in results:
        for name, dims in r.keeps.items():
            if 0 in dims:
                mask = np.asarray(dims[0], dtype=bool)
                idx = rows.get(name, np.arange(mask.size))
                rows[name] = idx[mask]
    return rows


MODULES: dict = {}  # "module.Class" -> fix(module, shrunk: Shrunk)


def module_fix(*names):
    def deco(fn):
        for n in names:
            MODULES[n] = fn
        return fn

    return deco


def fix_module(m: nn.Module, shrunk: set[int]) -> None:
    for cls in type(m).__mro__:
        fn = MODULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            fn(m, shrunk)
            return
    fix_attention(m, shrunk)
    fix_mlp(m, shrunk)
