"""``fxprune prune hf:DIR --stream --save-pretrained OUT``: the command line of
:func:`fxprune.stream` (kept apart from ``cli_commands.py``, which holds the other
commands), and the choice to stream without the flag when the whole model would not fit.

The whole-model path holds the checkpoint several times over: the model cast to float32, the
pruning copy, and the proof's float32 dense and zeroed copies with their activations. Measured
with ``/usr/bin/time -v fxprune prune hf:DIR --heads 0.25 --ffn 0.25 --save-pretrained OUT`` on
the 0.5B-shaped bf16 Llama of ``benchmarks/llm_scale.py`` (0.98 GB of safetensors): peak RSS
7.55 GB, 7.7x the file; the 3B shape (5.6 GiB) was OOM-killed at 23 GB. :func:`plain_peak`
prices a folder at that multiple; when it exceeds :data:`FIT` of the memory available and the
request is one the stream runs, ``prune`` streams and says so in one line (``--no-stream``
keeps the whole-model path).
"""

from __future__ import annotations

import json
import os
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
    ("unstructured", "--unstructured"),
    ("experts", "--experts"),
    ("recipe", "--recipe"),
    ("heads_round", "--heads-round"),
    ("allow_approximate", "--allow-approximate"),
    ("input_shape", "--input-shape"),
)
PLAIN_PEAK_PER_BYTE = 7.7  # peak RSS of the whole-model path / safetensors bytes (see above)
FIT = 0.8  # stream when the whole-model path would need more than this share of free memory


def plain_peak(folder: Path) -> int:
    """Bytes the whole-model prune of ``folder`` is expected to peak at."""
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return int(size * PLAIN_PEAK_PER_BYTE)


def mem_available() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def should_stream(a) -> str | None:
    """Why ``prune`` streams although ``--stream`` was not given, or None: the source is a
    decoder folder the stream knows, the request is one it runs (``--save-pretrained``, no flag
    it refuses), and the whole-model path would not fit in the memory available."""
    from fxprune.streaming_io import FAMILIES

    kind, _, folder = a.model.partition(":")
    path = Path(folder)
    if getattr(a, "no_stream", False) or kind != "hf" or not a.save_pretrained or a.overwrite:
        return None
    if not path.is_dir() or any(getattr(a, attr, None) for attr, _ in STREAM_REFUSES):
        return None
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    need, free = plain_peak(path), mem_available()
    if model_type not in FAMILIES or free is None or need <= FIT * free:
        return None
    gib = 2**30
    return (
        f"the whole-model path would need about {need / gib:.1f} GiB ({PLAIN_PEAK_PER_BYTE}x "
        f"the weights), {free / gib:.1f} GiB is available: streaming block by block "
        "(--no-stream to keep the whole model in memory)"
    )


def stream_command(a, log, writing) -> int:
    """``prune --stream``: :func:`fxprune.stream` from a Hugging Face folder to another;
    ``log`` prints progress, ``writing(flag, path)`` turns an OSError into a one-line error."""
    import torch

    from fxprune.errors import ConfigError
    from fxprune.streaming import stream

    kind, _, folder = a.model.partition(":")
    if getattr(a, "no_stream", False):
        raise ConfigError("--stream and --no-stream: give one")
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
