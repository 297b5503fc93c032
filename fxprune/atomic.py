"""Writing files and folders so that a kill at any moment leaves the old one whole.

A folder is written into a staging folder beside it (``.<name>.<pid>.<8 hex>``) and swapped in
(:func:`write_folder`, :func:`swap_in`): with one ``renameat2(RENAME_EXCHANGE)`` on Linux, else two
renames, the old folder put back if the second fails. A writer's files in an old folder are
replaced or removed; the user's other files are carried over (hard links, else copies). What a
killed writer left (staging folders, ``atomic_save``'s ``.tmp`` files) is removed by the next
write once its pid no longer runs or it is untouched for :data:`STALE_AFTER_S`
(:func:`remove_stale_beside`, :func:`is_stale`). Used by ``save_pretrained`` (fxprune/hf.py),
checkpoints (fxprune/checkpoint.py) and the exporters' staging folders.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import time
import warnings
from pathlib import Path

STALE_AFTER_S = 6 * 3600  # a staging file or folder untouched this long has no live writer


def write_folder(out: Path, write, owned: re.Pattern, what: str) -> None:
    """Call ``write(staging)`` on an empty staging folder beside ``out`` and swap it in for
    ``out`` (see the module docstring): ``out`` is the old folder or the new one, never a mix.
    Files of an old ``out`` whose names ``owned`` matches are the writer's (replaced, or gone
    when it does not write them again); every other entry is carried over. ``what`` names the
    writer in the warning a mount point gets."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir() and (os.path.ismount(out) or not os.access(out.parent, os.W_OK)):
        return _write_in_place(out, write, owned, what)
    remove_stale_beside(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.mkdir(0o777)  # not mkdtemp: the folder gets the umask's permissions, as mkdir would
    aside = tmp.with_name(tmp.name + ".old")
    try:
        write(tmp)
        for f in tmp.rglob("*"):  # on disk before the swap, as atomic_save does for a file
            if f.is_file() and not f.is_symlink():
                _fsync(f)
        if out.is_dir():
            carry_over(out, tmp, owned)
            shutil.copymode(out, tmp)
        swap_in(tmp, out, aside)
        _fsync(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the staging folder, or the old folder swapped out
        shutil.rmtree(aside, ignore_errors=True)


def _write_in_place(out: Path, write, owned: re.Pattern, what: str) -> None:
    """Where nothing can be staged beside ``out`` (a mount point, a parent that is not
    writable): stage inside it, then move each file in, config.json last. Not atomic."""
    warnings.warn(
        f"{what}: {out} is a mount point or its parent is not writable, so the save "
        "cannot be staged beside it: writing in place (a kill mid-save can mix old and new files)",
        UserWarning,
        stacklevel=4,
    )
    remove_stale_beside(out / out.name)  # its siblings: the staging folders inside ``out``
    tmp = out / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write(tmp)
        for f in out.iterdir():
            if owned.fullmatch(f.name) and f.is_file() and not (tmp / f.name).exists():
                f.unlink()
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            if (out / f.name).is_dir() and not (out / f.name).is_symlink():
                shutil.rmtree(out / f.name)
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def carry_over(old: Path, new: Path, owned: re.Pattern) -> list[str]:
    """Link (else copy) every entry of ``old`` that the writer does not own (``owned``) and
    ``new`` does not hold into ``new``; the names carried."""
    carried = []
    for entry in sorted(old.iterdir()):
        dst = new / entry.name
        if owned.fullmatch(entry.name) or dst.exists() or dst.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst)
        elif entry.is_dir():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dst)
        carried.append(entry.name)
    return carried


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem's rules (no hard links): a copy
        shutil.copy2(src, dst)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # a folder cannot be opened on Windows
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or the filesystem cannot, OSError on any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc before glibc 2.28 or musl 1.2.0
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(new: Path, path: Path, aside: Path) -> None:
    """Put the finished ``new`` at ``path``. An existing ``path`` is swapped with ``new`` in one
    step where the system can (:func:`exchange`: the old one ends at ``new``), else renamed to
    ``aside`` first and renamed back if the second rename fails: the old one is never lost."""
    if not path.exists():
        os.replace(new, path)
        return
    if exchange(new, path):
        return
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise


def remove_stale_beside(path: Path, suffix: str = "") -> list[Path]:
    """Remove what killed saves to ``path`` left beside it, ``.<name>.<pid>.<8 hex><suffix>``
    (staging folders; ``suffix=".tmp"``: ``atomic_save``'s files), when :func:`is_stale`;
    the paths removed. A ``.old`` folder (the old one, renamed aside) is never touched."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[0-9a-f]{8}" + re.escape(suffix))
    removed = []
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            found = pattern.fullmatch(p.name)
            if found and is_stale(p, int(found[1])):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
                removed.append(p)
    return removed


def is_stale(path: Path, pid: int | None) -> bool:
    """Whether the staging file or folder ``path`` of process ``pid`` is left from a killed
    writer: the pid no longer runs (POSIX), or ``path`` is untouched for :data:`STALE_AFTER_S`
    (a pid reused since, a name without one, or Windows, where the pid is not probed)."""
    try:
        if time.time() - path.stat().st_mtime > STALE_AFTER_S:
            return True
    except OSError:  # removed meanwhile by its owner
        return False
    if pid is None or os.name != "posix" or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0 only probes
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid)
        return True
    except OSError:  # EPERM: it runs, under another user
        return False
    return False
