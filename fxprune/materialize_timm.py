"""``result.model`` for timm's classes whose forward reads sizes of their children.

Each entry recomputes the attributes a class's forward reads (split sizes, head counts) from
its pruned children's shapes; see ``fxprune.materialize`` for the registry. Where the forward
cannot express the pruned widths, or the shapes do not determine them, the entry raises
``NotMaterialized`` naming the class and attribute, and ``result.model`` stays the graph
module. Matched by class name, so timm is never imported here.
"""

from __future__ import annotations

from fxprune.materialize import NotMaterialized, module_fix


def _weight(layer):
    """The weight of a layer, or of timm's ``LinearNorm`` / ``ConvNorm`` around one."""
    return getattr(layer, "linear", layer).weight


@module_fix("timm.layers.mixed_conv2d.MixedConv2d")
def _mixed_conv(m, shrunk):
    # forward: torch.split(x, self.splits, 1), one conv per split
    m.splits = [c.in_channels for c in m.values()]


@module_fix("timm.models.rexnet.LinearBottleneck")
def _rexnet_block(m, shrunk):
    # forward: cat([x[:, 0:in_channels] + shortcut, x[:, in_channels:]]). The add couples the
    # front of conv_pwl's output with the block's input, so both keep as many channels, in front
    first = m.conv_exp if m.conv_exp is not None else m.conv_dw
    cin, cout = first.in_channels, m.conv_pwl.out_channels
    if m.use_shortcut and cin > cout:
        raise NotMaterialized(
            f"LinearBottleneck.in_channels: its residual over the first {cin} channels does not "
            f"fit its {cout} outputs"
        )
    m.in_channels, m.out_channels = cin, cout


@module_fix("timm.models.res2net.Bottle2neck")
def _res2net_block(m, shrunk):
    # forward: torch.split(conv1's output, self.width, 1): part i feeds convs[i], the last one
    # (scale > 1) passes by. The graph keeps each part's own width; torch.split takes a list
    parts = [c.in_channels for c in m.convs]
    total = m.conv1.out_channels
    if m.scale > 1:
        parts.append(total - sum(parts))
    if parts[-1] <= 0 or sum(parts) != total:
        raise NotMaterialized(
            f"Bottle2neck.width: its convs take {parts[: len(m.convs)]} channels of conv1's "
            f"{total}, which do not split into {m.scale} parts"
        )
    m.width = parts[0] if len(set(parts)) == 1 else parts


@module_fix("timm.models.dpn.DualPathBlock")
def _dpn_block(m, shrunk):
    # forward: x_s[:, :num_1x1_c] + out1 and, without b, out1 = c1x1_c(x)[:, :num_1x1_c]: the
    # residual width, the same in both (the add couples them); inc is read by __init__ only
    if m.c1x1_c1 is not None:  # b: out1 is c1x1_c1's whole output
        m.num_1x1_c = m.c1x1_c1.out_channels
        return
    # b=False: c1x1_c's outputs are [residual | dense]; the residual's new width is how many of
    # its first num_1x1_c outputs were kept (the shapes alone do not say where the split lies)
    kept = shrunk.kept(m.c1x1_c.conv)
    if kept is not None:
        m.num_1x1_c = int((kept < m.num_1x1_c).sum())


def _reads_width_off_input(m, qkv: list, proj, name: str) -> None:
    # forward: reshape(B, N, num_heads, C // num_heads) and back to (B, N, C), C = x.shape[-1]:
    # q/k/v must stay C wide, which heads removed (or the input narrowed) break
    width = qkv[0].in_features
    rows = [p.out_features for p in qkv]
    if sum(rows) != 3 * width or proj.in_features != width:
        raise NotMaterialized(
            f"{name}.num_heads: its forward takes head_dim as C // num_heads with C its input "
            f"width {width}, so q/k/v {rows} wide (heads removed) cannot be expressed"
        )


@module_fix("timm.models.xcit.XCA", "timm.models.cait.TalkingHeadAttn")
def _fused_width_off_input(m, shrunk):
    _reads_width_off_input(m, [m.qkv], m.proj, type(m).__name__)


@module_fix("timm.models.eva.EvaAttention")
def _eva_attention(m, shrunk):
    # forward: reshape(B, N, C) after attention, C its input width (q_bias / v_bias are sliced
    # with their heads in the graph, so the graph module is exact)
    qkv = [m.qkv] if getattr(m, "qkv", None) is not None else [m.q_proj, m.k_proj, m.v_proj]
    _reads_width_off_input(m, qkv, m.proj, "EvaAttention")


@module_fix("timm.models.cait.ClassAttn")
def _class_attn(m, shrunk):
    _reads_width_off_input(m, [m.q, m.k, m.v], m.proj, "ClassAttn")


def _set_heads(m, name: str, heads: int, key_rows: int, val_rows: int, qkv_rows: int, per: int):
    """Head counts and per-head widths from the pruned projections: ``key_rows`` and
    ``val_rows`` are heads x key_dim and heads x val_dim, ``qkv_rows`` holds ``per`` key widths
    and one value width a head (2: q and k, 1: k)."""
    kd, vd = key_rows // heads, val_rows // heads
    if key_rows % heads or val_rows % heads or qkv_rows != heads * (per * kd + vd):
        raise NotMaterialized(
            f"{name}.key_dim/val_dim: projections of {qkv_rows} and {val_rows} rows do not "
            f"split into its {heads} heads"
        )
    m.num_heads, m.key_dim, m.val_dim = heads, kd, vd
    m.key_attn_dim, m.val_attn_dim = heads * kd, heads * vd
    m.attention_bias_cache = {}  # eval caches attention_biases[:, idxs], one row per head
    # scale stays key_dim ** -0.5 of the dense model: the graph keeps that constant


@module_fix("timm.models.levit.Attention", "timm.models.efficientformer.Attention")
def _split_attention(m, shrunk):
    # forward: qkv(x).view(B, N, num_heads, -1).split([key_dim, key_dim, val_dim]), then
    # reshape(B, N, val_attn_dim) into proj; attention_biases holds one row per head
    heads = m.attention_biases.shape[0]
    proj = m.proj.ln if hasattr(m.proj, "ln") else m.proj  # levit: Sequential(act, ln)
    qkv_rows, val_rows = _weight(m.qkv).shape[0], _weight(proj).shape[1]
    _set_heads(m, type(m).__name__, heads, (qkv_rows - val_rows) // 2, val_rows, qkv_rows, 2)


@module_fix("timm.models.levit.AttentionDownsample")
def _levit_downsample(m, shrunk):
    # forward: kv(x).view(B, N, num_heads, -1).split([key_dim, val_dim]),
    # q(x).view(B, -1, num_heads, key_dim), reshape(B, -1, val_attn_dim) into proj
    heads = m.attention_biases.shape[0]
    key_rows, val_rows = _weight(m.q.ln).shape[0], _weight(m.proj.ln).shape[1]
    _set_heads(m, "AttentionDownsample", heads, key_rows, val_rows, _weight(m.kv).shape[0], 1)
