"""``fxprune prune hf:DIR --stream --save-pretrained OUT``: the command line of
:func:`fxprune.stream` (kept apart from ``cli_commands.py``, which holds the other
commands)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

STREAM_REFUSES = (
    ("channels", "--channels"),
    ("blocks", "--blocks"),
    ("load", "--load"),
    ("save", "--save"),
    ("export", "--export"),
    ("report", "--report"),
    ("sparsity_permute", "--sparsity-permute"),
    ("sparsity_exclude", "--sparsity-exclude"),
    ("global_ranking", "--global-ranking"),
    ("ignore", "--ignore"),
)


def stream_command(a, log, writing) -> int:
    """``prune --stream``: :func:`fxprune.stream` from a Hugging Face folder to another;
    ``log`` prints progress, ``writing(flag, path)`` turns an OSError into a one-line error."""
    import torch

    from fxprune.errors import ConfigError
    from fxprune.streaming import stream

    kind, _, folder = a.model.partition(":")
    if kind != "hf" or not Path(folder).is_dir():
        raise ConfigError(f"--stream: the source must be hf:DIR (a model folder), got {a.model}")
    if not a.save_pretrained:
        raise ConfigError("--stream writes a Hugging Face folder: give --save-pretrained DIR")
    given = [flag for attr, flag in STREAM_REFUSES if getattr(a, attr, None)]
    if given:
        raise ConfigError(f"--stream does not take {', '.join(given)}")
    calibration = None
    if a.sparsity_method != "magnitude" or a.importance in ("activation", "entropy", "confidence"):
        from fxprune.models import hf_config

        vocab = hf_config(Path(folder) / "config.json", a.trust, "stream").vocab_size
        gen = torch.Generator().manual_seed(a.seed)
        shape = (a.batch or 1, a.seq_len or 128)
        calibration = [torch.randint(0, vocab, shape, generator=gen)]
    log(f"streaming {a.model} to {a.save_pretrained}")
    with writing("--save-pretrained", a.save_pretrained):
        res = stream(
            folder,
            a.save_pretrained,
            heads=a.heads,
            ffn=a.ffn,
            sparsity=a.sparsity,
            sparsity_method=a.sparsity_method,
            importance=a.importance,
            round_to=a.round_to,
            calibration=calibration,
            trust=a.trust,
            log=None if a.quiet else (lambda s: print(f"  {s}", file=sys.stderr)),
        )
    log(None)
    if a.json:
        print(json.dumps(res.to_dict()))
    else:
        print(res.table())
        print(
            f"saved a Hugging Face folder to {a.save_pretrained} (opens with transformers' "
            "from_pretrained, without fxprune)"
        )
    return 0
