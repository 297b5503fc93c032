"""Keep a Hugging Face ``model.config`` consistent with what the passes removed.

The pruned model is a GraphModule whose shapes live in the graph, so nothing here is needed to
run it; the config is what tools around the model read (``num_attention_heads``,
``intermediate_size``, ``num_hidden_layers``). A count is written when it is uniform across
layers; per-layer counts are in the plan (``units`` of each head / FFN pass entry).
"""

from __future__ import annotations

import copy

LAYERS = ("num_hidden_layers", "n_layer")
HEADS = ("num_attention_heads", "n_head")
FFN = ("intermediate_size", "n_inner")


def _attr(cfg, names):
    return next((n for n in names if hasattr(cfg, n)), None)


def pruned_config(model, results) -> tuple[object | None, dict]:
    """``(updated copy of model.config, notes)``; ``(None, {})`` for models without one."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None, {}
    new, notes = copy.deepcopy(cfg), {}
    layers_attr, heads_attr, ffn_attr = _attr(cfg, LAYERS), _attr(cfg, HEADS), _attr(cfg, FFN)
    n_layers = getattr(cfg, layers_attr) if layers_attr else None
    for r in results:
        if not r.changed:
            continue
        if r.name == "blocks" and layers_attr:
            n_layers = n_layers - len(r.bypassed)
            setattr(new, layers_attr, n_layers)
        units = r.details.get("units", {})
        counts = {after for _, after in units.values()}
        uniform = len(counts) == 1 and len(units) == n_layers
        if r.name == "heads" and heads_attr:
            if not uniform:
                notes["heads"] = "differs per layer: see the plan's 'units'"
                continue
            heads = getattr(cfg, heads_attr)
            kv = getattr(cfg, "num_key_value_heads", None) or heads
            per_unit = heads // next(iter(units.values()))[0]  # query heads per unit (GQA)
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            after = counts.pop()
            setattr(new, heads_attr, after * per_unit)
            if hasattr(new, "num_key_value_heads") and kv != heads:
                new.num_key_value_heads = after
            elif hasattr(new, "num_key_value_heads"):
                new.num_key_value_heads = after * per_unit
            new.head_dim = head_dim  # no longer hidden_size // num_attention_heads
        if r.name == "ffn" and ffn_attr:
            if uniform:
                setattr(new, ffn_attr, counts.pop())
            else:
                notes["ffn"] = "differs per layer: see the plan's 'units'"
    return new, notes
