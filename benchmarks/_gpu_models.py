"""Models and 2:4 helpers for ``benchmarks/gpu_semi_structured.py`` (only ``torch``).

* A BERT-base-sized encoder and a ViT-B/16-sized model built from plain torch modules with random
  weights (``MODELS`` maps the table name to constructor, tokens per sample and input factory).
* Magnitude 2:4 masking along the input-feature axis of an ``nn.Linear`` weight ``[out, in]``,
  the per-backend shape eligibility check, and conversion of the masked weights with
  ``torch.sparse.to_sparse_semi_structured`` (optionally forcing the CUTLASS backend).
* ``cpu_smoke``: a small CPU check of the model and mask code (no sparse kernels).

Not a package: the entry script puts this directory on ``sys.path``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPE = torch.float16


# --------------------------------------------------------------------------
# Models (plain torch, random weights)
# --------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, fused_qkv: bool):
        super().__init__()
        self.heads = heads
        self.fused_qkv = fused_qkv
        if fused_qkv:  # ViT (timm) style
            self.qkv = nn.Linear(hidden, 3 * hidden)
        else:  # BERT style
            self.q = nn.Linear(hidden, hidden)
            self.k = nn.Linear(hidden, hidden)
            self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x):
        b, s, h = x.shape
        d = h // self.heads
        if self.fused_qkv:
            qkv = self.qkv(x).view(b, s, 3, self.heads, d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q = self.q(x).view(b, s, self.heads, d).transpose(1, 2)
            k = self.k(x).view(b, s, self.heads, d).transpose(1, 2)
            v = self.v(x).view(b, s, self.heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(b, s, h)  # reshape -> contiguous copy
        return self.out(o)


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class PostLNBlock(nn.Module):  # BERT
    def __init__(self, hidden, heads, ffn):
        super().__init__()
        self.attn = SelfAttention(hidden, heads, fused_qkv=False)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.mlp = MLP(hidden, ffn)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class PreLNBlock(nn.Module):  # ViT
    def __init__(self, hidden, heads, ffn):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden, eps=1e-6)
        self.attn = SelfAttention(hidden, heads, fused_qkv=True)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = MLP(hidden, ffn)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class BertEncoder(nn.Module):
    """BERT-base sized: embeddings + 12 post-LN layers (no pooler / head)."""

    def __init__(self, hidden=768, heads=12, ffn=3072, layers=12, vocab=30522, max_pos=512):
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_pos, hidden)
        self.typ = nn.Embedding(2, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-12)
        self.blocks = nn.ModuleList([PostLNBlock(hidden, heads, ffn) for _ in range(layers)])

    def forward(self, ids):
        s = ids.shape[1]
        pos = torch.arange(s, device=ids.device)
        x = self.tok(ids) + self.pos(pos)[None] + self.typ.weight[0]
        x = self.ln(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class ViT(nn.Module):
    """ViT-B/16 sized: patch embed + cls + 12 pre-LN layers + LN + 1000-way head."""

    def __init__(self, hidden=768, heads=12, ffn=3072, layers=12, img=224, patch=16, classes=1000):
        super().__init__()
        n = (img // patch) ** 2
        self.patch = nn.Conv2d(3, hidden, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, hidden) * 0.02)
        self.blocks = nn.ModuleList([PreLNBlock(hidden, heads, ffn) for _ in range(layers)])
        self.ln = nn.LayerNorm(hidden, eps=1e-6)
        self.head = nn.Linear(hidden, classes)  # 1000 rows: not a multiple of 16/32 -> stays dense

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x[:, 0]))


MODELS = {
    # name: (constructor, tokens per sample, input factory)
    "BERT-base (seq 128)": (
        BertEncoder,
        128,
        lambda b, dev: torch.randint(0, 30522, (b, 128), device=dev),
    ),
    "ViT-B/16 (197 tok)": (
        ViT,
        197,
        lambda b, dev: torch.randn(b, 3, 224, 224, device=dev, dtype=DTYPE),
    ),
}


def clone_model(ctor, src: nn.Module) -> nn.Module:
    """A fresh fp16 CUDA eval copy of `src` (same constructor, `src`'s state dict)."""
    m = ctor().to("cuda", DTYPE).eval()
    m.load_state_dict(src.state_dict())
    return m


# --------------------------------------------------------------------------
# 2:4 masking and conversion
# --------------------------------------------------------------------------
def mask_2_4(w: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 along the input axis: in every group of 4 consecutive
    weights of a row of w[out, in] keep the 2 largest |w|. Vectorised."""
    out_f, in_f = w.shape
    if in_f % 4:
        raise ValueError(f"in_features {in_f} not a multiple of 4")
    g = w.reshape(out_f, in_f // 4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    m = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return m.reshape(out_f, in_f)


def check_2_4(w: torch.Tensor) -> bool:
    nz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
    return bool((nz <= 2).all())


def eligible(lin: nn.Linear, backend_cls) -> bool:
    c = backend_cls._DTYPE_SHAPE_CONSTRAINTS[DTYPE]
    o, i = lin.weight.shape
    return (
        o >= c.sparse_min_rows
        and o % c.sparse_min_rows == 0
        and i >= c.sparse_min_cols
        and i % c.sparse_min_cols == 0
    )


def eligible_names(model: nn.Module, backend_classes) -> list[str]:
    """Names of the Linear layers eligible for 2:4 under every class in `backend_classes`."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and all(eligible(m, c) for c in backend_classes)
    ]


def apply_mask_(model: nn.Module, names=None) -> list[str]:
    """Mask (in place) every Linear weight (or only those in `names`); returns the names masked."""
    done = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (names is None or name in names):
            with torch.no_grad():
                mod.weight.mul_(mask_2_4(mod.weight))
            done.append(name)
    return done


@contextlib.contextmanager
def cutlass_forced(force_cutlass: bool):
    """Set ``SparseSemiStructuredTensor._FORCE_CUTLASS`` for the conversions inside; restore it."""
    from torch.sparse import SparseSemiStructuredTensor

    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old


def to_semi_structured_(model: nn.Module, names: list[str], force_cutlass: bool) -> None:
    from torch.sparse import to_sparse_semi_structured

    with cutlass_forced(force_cutlass):
        mods = dict(model.named_modules())
        for n in names:
            lin = mods[n]
            sw = to_sparse_semi_structured(lin.weight.detach())
            lin.weight = nn.Parameter(sw, requires_grad=False)


def linear_shapes(model: nn.Module, names: list[str]) -> dict:
    """(out, in) -> how many of the Linear layers `names` have that weight shape."""
    mods = dict(model.named_modules())
    shapes: dict = {}
    for n in names:
        o, i = mods[n].weight.shape
        shapes[(o, i)] = shapes.get((o, i), 0) + 1
    return shapes


# --------------------------------------------------------------------------
# CPU smoke check
# --------------------------------------------------------------------------
def cpu_smoke() -> int:
    """Small CPU check of the model and mask code (no sparse kernels)."""
    torch.manual_seed(0)
    for name, ctor, inp in [
        (
            "bert",
            lambda: BertEncoder(hidden=64, heads=4, ffn=256, layers=2),
            torch.randint(0, 30522, (2, 16)),
        ),
        ("vit", lambda: ViT(hidden=64, heads=4, ffn=256, layers=2), torch.randn(2, 3, 224, 224)),
    ]:
        m = ctor().eval()
        names = apply_mask_(m)
        mods = dict(m.named_modules())
        assert all(check_2_4(mods[n].weight) for n in names)
        # the 2 kept weights per group must be the 2 largest |w|
        w = torch.randn(8, 16)
        km = mask_2_4(w).reshape(8, 4, 4)
        g = w.abs().reshape(8, 4, 4)
        assert (km.sum(-1) == 2).all()
        assert ((g * km).amax(-1) == g.amax(-1)).all()
        assert ((g * km).sum(-1) >= (g * ~km).sum(-1)).all()
        with torch.no_grad():
            out = m(inp)
        print(
            f"[cpu-smoke] {name}: {len(names)} Linear layers masked 2:4, output {tuple(out.shape)} OK"
        )
    return 0
