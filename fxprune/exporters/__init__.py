"""Exporters behind one interface: ONNX (``exporters.onnx``, which writes the hand-off metadata
of ``exporters.metadata`` into the file), a TensorRT engine (``exporters.tensorrt``) and an
ONNX Runtime GenAI decoder folder with its KV cache (``exporters.genai``).

An exporter declares what it needs as class attributes and registers itself; ``export`` picks one
by its ``format`` name when given, else by the output file's suffix. Optional packages are
imported inside ``export`` and a missing one raises ``MissingExtraError`` naming the pip extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from fxprune.errors import ExportError, FileAccessError

EXPORTERS: dict[str, type[Exporter]] = {}


class Exporter:
    """Base class: subclasses set ``format``, ``suffixes`` and ``extra`` and implement ``export``.

    ``audits_nm``: the exporter takes ``nm`` / ``nm_weights`` (the N:M pattern and the masked
    weights it audits in what it wrote)."""

    format: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()  # empty: chosen by format only (a folder)
    extra: ClassVar[str | None] = None  # pip extra providing the backend, if optional
    audits_nm: ClassVar[bool] = True

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.format:
            EXPORTERS[cls.format] = cls

    def export(self, module, example_inputs, path: Path, **options) -> Path:
        raise NotImplementedError


def _register_builtins() -> None:
    from fxprune.exporters import genai as _genai  # noqa: F401 - registers (imports no genai)
    from fxprune.exporters import onnx as _onnx  # noqa: F401 - registers (imports no onnx yet)
    from fxprune.exporters import tensorrt as _trt  # noqa: F401 - registers (imports no tensorrt)


def exporter_for(path: str | Path, format: str | None = None) -> type[Exporter]:
    """The registered exporter named ``format``, else the one for ``path``'s suffix; an
    ExportError lists what exists."""
    _register_builtins()
    if format is not None:
        if format in EXPORTERS:
            return EXPORTERS[format]
        raise ExportError(f"format={format!r}: no such exporter; known: {sorted(EXPORTERS)}")
    suffix = Path(path).suffix
    for cls in EXPORTERS.values():
        if suffix in cls.suffixes:
            return cls
    known = sorted(s for c in EXPORTERS.values() for s in c.suffixes)
    folders = sorted(f for f, c in EXPORTERS.items() if not c.suffixes)
    raise ExportError(
        f"no exporter for {suffix or 'a file without suffix'!r}; known: {known}"
        + (f", or format= one of {folders} for a folder" if folders else "")
    )


def check_target(path: str | Path, folder: bool = False) -> None:
    """Refuse, before any work, a destination the export could not write at its end: one
    under a file (the nearest existing folder above ``path`` is a file), a folder where a file
    goes or (``folder=True``) a file where a folder goes.

    Raises:
        FileAccessError: naming ``path`` and what is in the way.
    """
    path = Path(path)
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise FileAccessError(f"cannot export to {path}: {above} is a file, not a folder")
    if not folder and path.is_dir():
        raise FileAccessError(f"cannot export to {path}: it is a folder; give a file path")
    if folder and path.exists() and not path.is_dir():
        raise FileAccessError(f"cannot export to {path}: it is a file; give a folder")


def export(module, example_inputs, path: str | Path, format: str | None = None, **options):
    """Export ``module`` with the exporter named ``format`` (else the one registered for
    ``path``'s suffix); returns its report. A destination it could not write is refused first
    (:func:`check_target`)."""
    cls = exporter_for(path, format)
    check_target(path, folder=not cls.suffixes)
    return cls().export(module, example_inputs, Path(path), **options)
