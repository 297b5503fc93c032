"""Real text nobody here wrote, split by file into calibration and held-out token windows.

Two texts:

- ``docs``: English prose, the Python documentation's reST sources as Debian's ``python3-doc``
  installs them (``/usr/share/doc/python3-doc/html/_sources/**/*.txt``; ``apt-get install
  python3-doc`` when missing).
- ``code``: the running Python's standard library source (``sysconfig.get_paths()["stdlib"]``,
  every ``*.py`` except test suites and ``site-packages``, as ``benchmarks/_tinylm.py`` reads it).

Each file goes to the held-out split when a hash of its relative path says so (sha256, the first
8 bytes mod 1000 below ``10 x heldout_percent``): deterministic, independent of file order and of
the other files. Each split is tokenized with the model's tokenizer (no special tokens), files
joined in path order with a separator token, and cut into evenly spaced, non-overlapping windows:
calibration windows from the calibration files, evaluation windows from the held-out files.

A pretrained model may have seen these files during its own pre-training (both are public); the
split keeps them apart from calibration, which is what a pruning benchmark needs, and the
dense row is the reference every other row is read against.

Token streams are cached in ``$FXPRUNE_BENCH_CACHE/realtext-<hash>.pt`` (default
``~/.cache/fxprune-bench``); the hash covers the tokenizer, the file lists and sizes and the
split.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DOCS = Path("/usr/share/doc/python3-doc/html/_sources")
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
TEXTS = ("docs", "code")
VERSION = 1  # bump when the split or the encoding changes meaning


@dataclass
class Text:
    """One text's token streams (1-D int64): calibration files and held-out files."""

    name: str
    calib: torch.Tensor
    heldout: torch.Tensor
    info: dict


def cache_root() -> Path:
    return Path(os.environ.get("FXPRUNE_BENCH_CACHE", Path.home() / ".cache" / "fxprune-bench"))


def sources() -> dict[str, tuple[Path, list[str]]]:
    """``{text: (root, sorted relative paths)}`` for ``docs`` and ``code``."""
    if not DOCS.is_dir():
        raise FileNotFoundError(f"{DOCS} is missing: apt-get install python3-doc")
    docs = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.txt") if p.is_file())
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = sorted(
        r.as_posix()
        for r in (p.relative_to(lib) for p in lib.rglob("*.py") if p.is_file())
        if SKIP_DIRS.isdisjoint(r.parts[:-1])
    )
    return {"docs": (DOCS, docs), "code": (lib, code)}


def is_heldout(rel: str, percent: float) -> bool:
    """Whether the file at relative path ``rel`` is held out (a fixed hash of the path)."""
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return h % 1000 < round(10 * percent)


def backend(tok):
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer (or ``tok`` itself)."""
    return getattr(tok, "backend_tokenizer", tok)


def separator(tok) -> int:
    """The token joining two files: ``<|endoftext|>`` if the vocabulary has it, else EOS."""
    b = backend(tok)
    sep = b.token_to_id("<|endoftext|>")
    if sep is None:
        sep = getattr(tok, "eos_token_id", None)
    if sep is None:
        raise ValueError("the tokenizer has neither <|endoftext|> nor an EOS token")
    return sep


def encode(tok, root: Path, rel: list[str], sep: int) -> torch.Tensor:
    b = backend(tok)
    texts = [(root / r).read_bytes().decode("utf-8", errors="replace") for r in rel]
    out: list[int] = []
    for enc in b.encode_batch(texts, add_special_tokens=False):
        out += enc.ids
        out.append(sep)
    return torch.tensor(out, dtype=torch.int64)


def load(tok, heldout_percent: float = 10.0, log=print) -> dict[str, Text]:
    """``{"docs": Text, "code": Text}`` tokenized with ``tok``, from the cache or made now."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    src = sources()
    sep = separator(tok)
    key = {
        "version": VERSION,
        "heldout_percent": heldout_percent,
        "sep": sep,
        "tokenizer": hashlib.sha256(backend(tok).to_str().encode()).hexdigest(),
        "files": {
            name: [(r, (root / r).stat().st_size) for r in rel] for name, (root, rel) in src.items()
        },
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / f"realtext-{digest}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=True)
        return {
            n: Text(n, blob[n]["calib"].long(), blob[n]["heldout"].long(), blob[n]["info"])
            for n in TEXTS
        }
    out, blob = {}, {}
    for name, (root, rel) in src.items():
        t0 = time.perf_counter()
        held = [r for r in rel if is_heldout(r, heldout_percent)]
        cal = [r for r in rel if not is_heldout(r, heldout_percent)]
        calib, heldout = encode(tok, root, cal, sep), encode(tok, root, held, sep)
        info = {
            "root": root.as_posix(),
            "calib_files": len(cal),
            "heldout_files": len(held),
            "calib_tokens": int(calib.numel()),
            "heldout_tokens": int(heldout.numel()),
            "chars": sum((root / r).stat().st_size for r in rel),
        }
        log(
            f"{name}: {len(cal)} calibration files ({calib.numel()} tokens), {len(held)} held-out "
            f"files ({heldout.numel()} tokens), tokenized in {time.perf_counter() - t0:.0f} s"
        )
        out[name] = Text(name, calib, heldout, info)
        blob[name] = {"calib": calib.to(torch.int32), "heldout": heldout.to(torch.int32)}
        blob[name]["info"] = info
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    torch.save(blob, tmp)
    tmp.replace(path)
    return out


def windows(stream: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """``n`` evenly spaced, non-overlapping windows of ``seq`` tokens: ``[n, seq]``."""
    if n * seq > stream.numel():
        raise ValueError(f"{n} windows of {seq} tokens need more than {stream.numel()} tokens")
    step = (stream.numel() - seq) // max(n - 1, 1)
    return torch.stack([stream[i * step : i * step + seq] for i in range(n)])


def calibration(texts: dict[str, Text], n: int, seq: int) -> list[torch.Tensor]:
    """``n`` calibration windows ``[1, seq]``, shared evenly between the texts and interleaved
    (docs, code, docs, ...), from the calibration files only."""
    names = list(texts)
    per = [n // len(names) + (i < n % len(names)) for i in range(len(names))]
    wins = {k: windows(texts[k].calib, c, seq) for k, c in zip(names, per, strict=True) if c}
    out = []
    for i in range(max(per)):
        out += [wins[k][i : i + 1] for k in names if k in wins and i < len(wins[k])]
    return out


def evaluation(texts: dict[str, Text], n: int, seq: int) -> dict[str, torch.Tensor]:
    """``{text: [n, seq]}``: ``n`` held-out windows per text."""
    return {k: windows(t.heldout, n, seq) for k, t in texts.items()}
