"""Whether a source folder's ``config.json`` describes its safetensors shards, checked before
:func:`fxprune.stream` writes anything: the config's layer count is the number of blocks the
shards hold (fewer would stream silently fewer layers), and every tensor the shards hold is the
shape the config builds. A count key that ``config.json`` leaves out and its config class
defaults (``num_key_value_heads`` defaults to ``num_attention_heads``, ``hidden_size`` to 4096)
is fine while the weights agree with the default, and is named when they do not."""

from __future__ import annotations

import re
from pathlib import Path

from fxprune.errors import CheckpointError

# the counts a decoder's config holds that its weights' shapes show (what a missing key is)
COUNT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def check_config_fits(src: Path, cfg, raw: dict, skeleton, fam, shards) -> None:
    """Refuse a config that does not describe the shards.

    Args:
        src: the model folder (for the messages).
        cfg: its config as transformers built it (defaults filled in).
        raw: its ``config.json`` as written (to tell a defaulted key from a given one).
        skeleton: the model ``cfg`` builds, on the meta device.
        fam: the decoder's :class:`fxprune.streaming_io.Family`.
        shards: its :class:`fxprune.streaming_io.Shards` (tensor shapes from the headers).

    Raises:
        CheckpointError: the layer counts differ (both named), a key ``config.json`` leaves out
            defaults to a count the weights contradict (the key, the default and the count the
            weights hold named), or another tensor is not the shape the config builds.
    """
    prefix = fam.layers + "."
    _check_layer_count(src, cfg, prefix, shards.keys())
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    bad = [
        (k, shards.shapes[k], want.get(k))
        for k in shards.keys()
        if (k in want and want[k] != shards.shapes[k]) or (k.startswith(prefix) and k not in want)
    ]
    lacking = [k for k in want if k.startswith(prefix) and k not in shards.where]
    if not (bad or lacking):
        return
    held = _held_counts(cfg, raw, fam, prefix, shards.shapes)
    for key in COUNT_KEYS:
        if key not in raw and key in held and held[key] != getattr(cfg, key, None):
            raise CheckpointError(
                f"{src / 'config.json'} gives no {key}; {type(cfg).__name__} defaults it to "
                f"{getattr(cfg, key, None)}, but the weights hold {held[key]}: add "
                f'"{key}": {held[key]} to config.json'
            )
    if lacking:
        raise CheckpointError(
            f"{src}: the shards lack {lacking[:3]} ({len(lacking)} tensor(s) the config builds)"
        )
    k, shape, built = bad[0]
    raise CheckpointError(
        f"{src / 'config.json'} does not describe the weights: {k} is {list(shape)} in "
        f"{shards.where[k]}, the config builds "
        + (f"{list(built)}" if built else "no such tensor")
        + f" ({len(bad)} tensor(s) differ)"
    )


def _check_layer_count(src: Path, cfg, prefix: str, keys) -> None:
    n = cfg.num_hidden_layers
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    held = sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})
    if held == list(range(n)):
        return
    span = f"{prefix}{held[0]}..{held[-1]}" if held else f"no {prefix}*"
    if held and held != list(range(len(held))):
        span += f", with gaps: {len(held)} distinct"
    raise CheckpointError(
        f"{src / 'config.json'} says num_hidden_layers={n}, but the shards hold {len(held)} "
        f"blocks ({span}); stream prunes the blocks the config counts, so set "
        "num_hidden_layers to the number of blocks the weights hold"
    )


def _held_counts(cfg, raw: dict, fam, prefix: str, shapes: dict) -> dict:
    """The :data:`COUNT_KEYS` read off the weights' shapes (those that can be: the head counts
    need the head size, from ``config.json``'s ``head_dim`` or its given hidden size and head
    count)."""
    held = {}
    emb = shapes.get(f"{fam.embed}.weight")
    if emb and len(emb) == 2:
        held["vocab_size"], held["hidden_size"] = emb
    up = shapes.get(f"{prefix}0.{fam.ffn}.weight")
    if up:
        held["intermediate_size"] = up[0]
    hidden = held.get("hidden_size", getattr(cfg, "hidden_size", None))
    heads = raw.get("num_attention_heads")
    head_dim = raw.get("head_dim")
    if not isinstance(head_dim, int) and isinstance(heads, int) and heads and hidden:
        head_dim = hidden // heads
    for key, path in (("num_attention_heads", fam.q), ("num_key_value_heads", fam.k)):
        w = shapes.get(f"{prefix}0.{path}.weight")
        if w and isinstance(head_dim, int) and head_dim and w[0] % head_dim == 0:
            held[key] = w[0] // head_dim
    return held
