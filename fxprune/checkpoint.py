"""Checkpoint files: written atomically (a kill mid-write leaves the old file) and read with
``torch.load(weights_only=True)``, every failure a :class:`CheckpointError` saying why."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import warnings
import zipfile
from pathlib import Path

import torch

from fxprune.errors import CheckpointError


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``: a kill
    or a full disk mid-write leaves the previous file intact, never a truncated checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open, not mkstemp: the checkpoint gets the umask's permissions, not mkstemp's 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# what torch.save's legacy (non-zip) format starts with: the pickled magic number
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """The dict :meth:`CompileResult.save` wrote: ``plan``, ``state_dict`` and maybe ``source``.

    Read with ``torch.load(weights_only=True)`` unless ``trust=True``.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated or corrupt, is not an fxprune
            checkpoint, or holds pickled code and ``trust`` is False (only that case suggests
            trusting it).

    Example:
        >>> ckpt = read_checkpoint("r50.pt")  # doctest: +SKIP
        >>> sorted(ckpt)  # doctest: +SKIP
        ['plan', 'source', 'state_dict']
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if p.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    try:
        ckpt = torch.load(p, weights_only=not trust, map_location="cpu")
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on a bad file
        raise CheckpointError(
            f"cannot read checkpoint {path}: {_why_unreadable(p, e, trust)}"
        ) from e
    if not (
        isinstance(ckpt, dict)
        and isinstance(ckpt.get("plan"), dict)
        and isinstance(ckpt.get("state_dict"), dict)
    ):
        raise CheckpointError(
            f"{path} is a torch file but not an fxprune checkpoint (it needs 'plan' and "
            "'state_dict'): write one with CompileResult.save or `fxprune prune --save`"
        )
    return ckpt


def _why_unreadable(p: Path, e: Exception, trust: bool) -> str:
    text = str(e)
    # torch's weights-only refusal advises weights_only=False even for random bytes: only a
    # well-formed torch file that names a Python global really needs trust
    code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if code and not trust and _is_torch_file(p):
        return (
            f"it holds pickled Python objects ({code[1]}), not only weights; pass --trust "
            "(trust=True in Python) only if you trust where it came from"
        )
    if p.stat().st_size == 0:
        return "the file is empty"
    text = text.partition("WeightsUnpickler error:")[2] or text
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    first = first.split(". ")[0]
    return f"not a valid checkpoint, truncated or corrupt ({type(e).__name__}: {first})"


def _is_torch_file(p: Path) -> bool:
    if zipfile.is_zipfile(p):
        return True
    with open(p, "rb") as f:
        return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


# ---------------------------------------------------------------- compressed weights

COMPRESSIONS = ("bitmask", "csr")
"""How ``CompileResult.save(path, compress=...)`` stores zeroed weights: ``bitmask`` (the
non-zero values plus one bit per position, ``numpy.packbits``) or ``csr`` (the weight as a 2-D
[rows, columns] matrix in torch's CSR layout, indices stored as int32: values + a column index
per non-zero + row pointers; the estimator prices both the same way)."""


def compress(tensor: torch.Tensor, how: str) -> dict:
    """One weight in the compact form ``how`` names (plain tensors only, so
    ``torch.load(weights_only=True)`` reads it)."""
    import numpy as np

    t = tensor.detach().cpu().contiguous()
    if how == "bitmask":
        mask = t != 0
        bits = np.packbits(mask.flatten().numpy())
        return {"bitmask": torch.from_numpy(bits), "values": t[mask], "shape": list(t.shape)}
    if how == "csr":
        rows = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(1, -1)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = rows.to_sparse_csr()
        return {
            "crow": csr.crow_indices().to(torch.int32),
            "col": csr.col_indices().to(torch.int32),
            "values": csr.values(),
            "shape": list(t.shape),
        }
    raise ValueError(f"compress={how!r}: choose one of {COMPRESSIONS}")


def expand(entry: dict) -> torch.Tensor:
    """The dense weight :func:`compress` stored, bit for bit."""
    import numpy as np

    shape = tuple(entry["shape"])
    n = int(np.prod(shape)) if shape else 1
    values = entry["values"]
    if "bitmask" in entry:
        bits = np.unpackbits(entry["bitmask"].numpy(), count=n).astype(bool)
        out = torch.zeros(n, dtype=values.dtype)
        out[torch.from_numpy(bits)] = values
        return out.reshape(shape)
    rows = shape[0] if len(shape) > 1 else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(  # checked: a corrupt file is an error, not a crash
            entry["crow"].long(),
            entry["col"].long(),
            values,
            (rows, n // rows),
            check_invariants=True,
        )
        return csr.to_dense().reshape(shape)


def compressed_bytes(entry: dict) -> int:
    """Bytes of the tensors one compressed weight is stored as."""
    return sum(v.numel() * v.element_size() for v in entry.values() if isinstance(v, torch.Tensor))


def expand_state(ckpt: dict, path) -> dict:
    """The checkpoint's full ``state_dict``: its dense tensors plus every compressed weight
    expanded (a ``compressed`` entry that does not fit is a :class:`CheckpointError`)."""
    state = dict(ckpt["state_dict"])
    packed = ckpt.get("compressed") or {}
    if not isinstance(packed, dict):
        raise CheckpointError(f"{path}: its 'compressed' entry is not a mapping of weights")
    for name, entry in packed.items():
        try:
            state[name] = expand(entry)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: compressed weight {name!r} is corrupt ({e})") from e
    return state
