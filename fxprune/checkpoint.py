"""Checkpoint files: written atomically (a kill mid-write leaves the old file) and read with
``torch.load(weights_only=True)``, every failure a :class:`CheckpointError` saying why.

A checkpoint carries a sha256 digest of each stored tensor, of each compressed weight (its
tensors and shape together), of the plan, of the ``source`` entry and of the stored equivalence
proof (``proof``, see ``fxprune.stored_proof``), in ``ckpt["sha256"]``, written by :func:`seal`;
:func:`read_checkpoint` recomputes them and refuses a file whose bytes changed after it was
saved, naming the tensor, the plan or the proof. A checkpoint saved before digests existed
loads with a warning; one sealed before proofs were stored has no proof digest, and a proof
added to it later is refused like any other edit. The digests guard against corruption (a
flipped byte, a truncated copy, an edited plan or proof), not against a forger, who can
recompute them: :func:`expand` also checks every compressed weight's declared shape against the
bytes present and the model's own weight before it allocates anything.

A save killed mid-write leaves its ``.<name>.<pid>.<random>.tmp`` file; the next save to the
same path removes it once that pid no longer runs or the file is untouched for
``fxprune.atomic.STALE_AFTER_S``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import secrets
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fxprune.atomic import remove_stale_beside
from fxprune.errors import CheckpointError


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``: a kill
    or a full disk mid-write leaves the previous file intact, never a truncated checkpoint."""
    path = Path(path)
    remove_stale_beside(path, ".tmp")  # what saves killed mid-write left
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


def read_checkpoint(path: str | Path, trust: bool = False, verify: bool = True) -> dict:
    """The dict :meth:`CompileResult.save` wrote: ``plan``, ``state_dict`` and maybe ``source``
    and ``compressed``, its digests checked (``verify``, see the module docstring).

    Read with ``torch.load(weights_only=True)`` unless ``trust=True``.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated or corrupt, is not an fxprune
            checkpoint, holds pickled code and ``trust`` is False (only that case suggests
            trusting it), or a tensor, the plan or the source does not match its digest.

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
    if verify:
        verify_digests(ckpt, path)
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


def expand(entry: dict, expected: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight :func:`compress` stored, bit for bit.

    Before allocating, the declared shape is checked against the tensors present (a bitmask
    holds one bit per position, CSR one row pointer per row) and, given ``expected`` (the
    model's own weight of that name), against its shape and dtype: a small file cannot demand
    more memory than the model's weight takes. Raises TypeError / ValueError saying what does
    not fit."""
    import numpy as np

    shape, values = _declared(entry)
    n = math.prod(shape)
    if expected is not None and (shape != tuple(expected.shape) or values.dtype != expected.dtype):
        raise ValueError(
            f"it declares a {_dt(values.dtype)} {list(shape)} weight, the model's is "
            f"{_dt(expected.dtype)} {list(expected.shape)}"
        )
    if "bitmask" in entry:
        bits = _stored(entry, "bitmask", torch.uint8)
        if bits.numel() != (n + 7) // 8:
            raise ValueError(
                f"it declares shape {list(shape)} ({n} positions, a {(n + 7) // 8}-byte "
                f"bitmask) but holds a {bits.numel()}-byte bitmask"
            )
        mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool))
        if int(mask.sum()) != values.numel():
            raise ValueError(
                f"its bitmask marks {int(mask.sum())} non-zeros but it holds {values.numel()} values"
            )
        out = torch.zeros(n, dtype=values.dtype)
        out[mask] = values
        return out.reshape(shape)
    crow, col = _stored(entry, "crow", torch.int32), _stored(entry, "col", torch.int32)
    rows = shape[0] if len(shape) > 1 else 1
    if crow.numel() != rows + 1 or col.numel() != values.numel():
        raise ValueError(
            f"it declares {rows} rows and {values.numel()} values but holds "
            f"{crow.numel()} row pointers and {col.numel()} column indices"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(  # checked: a corrupt file is an error, not a crash
            crow.long(),
            col.long(),
            values,
            (rows, n // rows if rows else 0),
            check_invariants=True,
        )
        return csr.to_dense().reshape(shape)


def _declared(entry) -> tuple[tuple[int, ...], torch.Tensor]:
    if not isinstance(entry, dict):
        raise TypeError(f"it is a {type(entry).__name__}, not a compressed entry (a dict)")
    if "bitmask" not in entry and "crow" not in entry:
        raise ValueError(f"it holds neither a bitmask nor CSR row pointers ({sorted(entry)})")
    shape = entry.get("shape")
    if not (
        isinstance(shape, (list, tuple))
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ValueError(f"its shape is {shape!r:.60}, not a list of sizes")
    values = entry.get("values")
    if not isinstance(values, torch.Tensor) or values.ndim != 1:
        raise TypeError("its 'values' is not a 1-D tensor")
    return tuple(shape), values


def _stored(entry: dict, key: str, dtype: torch.dtype) -> torch.Tensor:
    t = entry.get(key)
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype != dtype:
        raise TypeError(f"its {key!r} is not a 1-D {_dt(dtype)} tensor")
    return t


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compressed_bytes(entry: dict) -> int:
    """Bytes of the tensors one compressed weight is stored as."""
    return sum(v.numel() * v.element_size() for v in entry.values() if isinstance(v, torch.Tensor))


def expand_state(ckpt: dict, path, expected: dict | None = None) -> dict:
    """The checkpoint's full ``state_dict``: its dense tensors plus every compressed weight
    expanded. ``expected`` (the model's ``state_dict``) bounds each expansion by the model's own
    weight (see :func:`expand`); a ``compressed`` entry that does not fit is a
    :class:`CheckpointError` naming the weight."""
    state = dict(ckpt["state_dict"])
    packed = ckpt.get("compressed") or {}
    if not isinstance(packed, dict):
        raise CheckpointError(f"{path}: its 'compressed' entry is not a mapping of weights")
    for name, entry in packed.items():
        if name in state or (expected is not None and name not in expected):
            why = "is stored twice" if name in state else "is not a weight of this model"
            raise CheckpointError(f"{path}: compressed weight {name!r} {why}")
        try:
            state[name] = expand(entry, None if expected is None else expected[name])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{path}: compressed weight {name!r} is corrupt ({e})") from e
    return state


# ---------------------------------------------------------------- digests

DIGESTS = "sha256"  # the checkpoint entry that holds them
_PARALLEL_BYTES = 1 << 26  # above: tensors hashed on several threads (hashlib frees the GIL)


def sha256_of(obj) -> str:
    """sha256 (hex) of a tensor (dtype, shape and bytes), or of a structure of dicts, lists,
    tensors and JSON scalars as pickled into a checkpoint (key order as stored)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        h.update(f"T{_dt(t.dtype)}{list(t.shape)}:".encode())
        if t.layout != torch.strided or t.is_quantized:  # not one flat buffer: its torch.save
            buf = io.BytesIO()
            torch.save(t, buf)
            h.update(buf.getvalue())
            return
        t = t.resolve_conj().resolve_neg().contiguous()
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"{{{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}[{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{json.dumps(obj, default=repr)};".encode())


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return sum(map(_nbytes, obj.values())) if isinstance(obj, dict) else 0


def _sha256_each(items: dict) -> dict[str, str]:
    if len(items) < 2 or sum(map(_nbytes, items.values())) < _PARALLEL_BYTES:
        return {k: sha256_of(v) for k, v in items.items()}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(items, pool.map(sha256_of, items.values()), strict=True))


def state_digest(state: dict) -> str:
    """One sha256 (hex) of a ``state_dict``: its names, and each tensor's dtype, shape and
    bytes (large ones hashed on several threads)."""
    return sha256_of(_sha256_each(state))


def seal(ckpt: dict) -> dict:
    """The digests :func:`verify_digests` checks, for ``ckpt["sha256"]``: one per tensor of
    ``state_dict``, one per ``compressed`` weight, one each for ``plan``, ``source`` and
    ``proof`` (None where the checkpoint stores none)."""
    return {
        "plan": sha256_of(ckpt["plan"]),
        "source": sha256_of(ckpt.get("source")),
        "proof": sha256_of(ckpt.get("proof")),
        "state_dict": _sha256_each(ckpt["state_dict"]),
        "compressed": _sha256_each(ckpt.get("compressed") or {}),
    }


def verify_digests(ckpt: dict, path) -> None:
    """Recompute :func:`seal`'s digests and refuse what changed since the save, by name; a
    checkpoint without digests (saved by an fxprune before them) loads with a warning."""
    rec = ckpt.get(DIGESTS)
    if rec is None:
        warnings.warn(
            f"{path} holds no digests (saved by an fxprune before they were written): a "
            "corrupted weight in it cannot be detected; save it again to add them",
            UserWarning,
            stacklevel=3,
        )
        return
    sections = {"state_dict": ckpt["state_dict"], "compressed": ckpt.get("compressed") or {}}
    if not (
        isinstance(rec, dict)
        and all(isinstance(rec.get(k), str) for k in ("plan", "source"))
        and isinstance(rec.get("proof", ""), str)
        and all(isinstance(rec.get(k), dict) for k in sections)
        and all(isinstance(v, dict) for v in sections.values())
    ):
        raise CheckpointError(f"{path}: its digest record ({DIGESTS!r}) is malformed")
    # a file sealed before proofs were stored has no proof digest: a proof added to it is an edit
    proof = ("proof",) if "proof" in rec or ckpt.get("proof") is not None else ()
    for what in ("plan", "source", *proof):
        if sha256_of(ckpt.get(what)) != rec.get(what):
            raise CheckpointError(
                f"{path}: the {what} does not match its sha256 digest: the file was changed "
                "or corrupted after it was saved"
            )
    for section, stored in sections.items():
        want = rec[section]
        extra, missing = sorted(set(stored) - set(want)), sorted(set(want) - set(stored))
        if extra or missing:
            name, why = (extra[0], "has no digest") if extra else (missing[0], "is missing")
            raise CheckpointError(
                f"{path}: tensor {name!r} {why} in '{section}': the file was changed after it "
                "was saved"
            )
        got = _sha256_each(stored)
        bad = [k for k in stored if got[k] != want[k]]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            kind = "compressed weight" if section == "compressed" else "tensor"
            raise CheckpointError(
                f"{path}: {kind} {bad[0]!r}{more} does not match its sha256 digest: the file "
                "was changed or corrupted after it was saved; restore it, or save it again "
                "from the pruned model"
            )
