"""``result.model`` for torch.nn classes whose forward reads their own sizes.

See ``fxprune.materialize`` for the registry (entries run after every layer has its new shape).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from fxprune.materialize import NotMaterialized, module_fix


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with heads removed: q, k, v are ``num_heads x head_dim`` wide
    (``in_proj_weight.shape[0] // 3``), narrower than ``embed_dim``, which torch's own forward
    cannot hold. The same forward and signature with that inner width; the state_dict keeps its
    names. ``_qkv_same_embed_dim`` is False so ``nn.TransformerEncoderLayer``'s fused fast path,
    which assumes q/k/v ``embed_dim`` wide, calls this forward instead."""

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        batched, fused = query.dim() == 3, query is key and key is value
        if not batched:  # (L, E): a batch of one
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, tgt, h, d = query.shape[0], query.shape[1], self.num_heads, self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if fused:
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        else:
            bs = b.chunk(3) if b is not None else (None, None, None)
            q, k, v = (
                F.linear(t, wi, bi)
                for t, wi, bi in zip((query, key, value), w.chunk(3), bs, strict=True)
            )
        q, k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in (q, k, v))  # (N, H, L, D)

        # masks as F.multi_head_attention_forward takes them: bool True = masked, float added
        kpm = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=q.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        causal = is_causal and kpm is None and not need_weights
        mask = None
        if not causal:
            mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=q.dtype,
                check_other=False,
            )
        if mask is not None and mask.dim() == 3:  # (N * H, L, S)
            mask = mask.view(n, h, tgt, -1)
        if kpm is not None:
            kpm = kpm.view(n, 1, 1, -1)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            weights = (q * d**-0.5) @ k.transpose(-2, -1)
            if mask is not None:
                weights = weights + mask
            weights = weights.softmax(dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, p, causal)
        out = F.linear(out.transpose(1, 2).flatten(2), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


@module_fix("torch.nn.modules.activation.MultiheadAttention")
def _mha(m, shrunk):
    if m.in_proj_weight is None:
        if any(p is not None for p in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)):
            raise NotMaterialized(
                "nn.MultiheadAttention with separate q/k/v weights (kdim/vdim) is not rebuilt"
            )
        return
    inner, width = m.in_proj_weight.shape
    heads, rest = divmod(inner // 3, m.head_dim)  # whole heads go: head_dim stays
    out_in = m.out_proj.weight.shape[1]
    if inner % 3 or rest or out_in != inner // 3:
        raise NotMaterialized(
            f"nn.MultiheadAttention: in_proj's {inner} rows and out_proj's {out_in} inputs are "
            f"not 3 x and 1 x whole heads of head_dim {m.head_dim}"
        )
    m.embed_dim = m.kdim = m.vdim = width
    m.num_heads = heads
    if heads * m.head_dim != width:
        if m.bias_k is not None or m.add_zero_attn:
            raise NotMaterialized(
                "nn.MultiheadAttention with add_bias_kv / add_zero_attn and heads removed is not "
                "rebuilt"
            )
        m.__class__ = PrunedMultiheadAttention
        m._qkv_same_embed_dim = False
