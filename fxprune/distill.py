"""The losses ``fxprune.heal`` trains with: knowledge distillation from a teacher's logits and
the plain next-token loss, each averaged over a batch's real (unpadded) tokens.

- KD: KL(teacher || student) on the temperature-softened distributions, times T^2 (Hinton et al.
  2015, so the gradient scale does not shrink with T), summed over the vocabulary and averaged
  over tokens; the teacher runs under ``no_grad`` in eval mode (each submodule's flag restored).
- LM: cross entropy of token t+1 from position t, on the batch's own ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fxprune._util import eval_mode
from fxprune.errors import ConfigError

LOSSES = ("kd", "lm", "kd+lm")


def call(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"heal: cannot find logits in the model's output ({type(out).__name__})")


def _ids_and_mask(batch):
    if isinstance(batch, Mapping):
        return batch.get("input_ids"), batch.get("attention_mask")
    if isinstance(batch, torch.Tensor) and not batch.is_floating_point():
        return batch, None
    return None, None


def batch_loss(student, teacher, batch, loss, temperature) -> tuple[torch.Tensor, int]:
    """The batch's loss (mean over its real tokens) and how many tokens it had."""
    ids, attn = _ids_and_mask(batch)
    logits = logits_of(call(student, batch))
    keep = None  # positions that count: real (unpadded) tokens
    if attn is not None and attn.shape == logits.shape[:-1]:
        keep = attn.bool()
    parts = []
    if loss in ("kd", "kd+lm"):
        with torch.no_grad(), eval_mode(teacher):  # each submodule's own flag comes back
            target = logits_of(call(teacher, batch)).detach()
        if target.shape != logits.shape:
            raise ConfigError(
                f"heal: teacher logits {tuple(target.shape)} and student logits "
                f"{tuple(logits.shape)} differ; KD needs the same vocabulary and positions"
            )
        t = float(temperature)
        kl = F.kl_div(
            F.log_softmax(logits.float() / t, -1),
            F.log_softmax(target.float() / t, -1),
            log_target=True,
            reduction="none",
        ).sum(-1)
        parts.append(_masked_mean(kl, keep) * t * t)
    if loss in ("lm", "kd+lm"):
        if ids is None or ids.shape != logits.shape[:-1]:
            raise ConfigError(
                "heal(loss='lm'): each batch needs token ids (a [batch, seq] integer tensor or "
                "a dict with input_ids) matching the logits"
            )
        ce = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
        ).view(ids.shape[0], -1)
        parts.append(_masked_mean(ce, None if keep is None else keep[:, 1:] & keep[:, :-1]))
    n = int(keep.sum()) if keep is not None else int(math.prod(logits.shape[:-1]))
    return sum(parts), n


def _masked_mean(x: torch.Tensor, keep) -> torch.Tensor:
    if keep is None:
        return x.mean()
    return (x * keep).sum() / keep.sum().clamp(min=1)
