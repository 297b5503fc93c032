"""Exporters behind one interface: ONNX (``exporters.onnx``, which writes the hand-off metadata
of ``exporters.metadata`` into the file) and a TensorRT engine (``exporters.tensorrt``).

An exporter declares what it needs as class attributes and registers itself; ``export`` picks one
by the output file's suffix. Optional packages are imported inside ``export`` and a missing one
raises ``MissingExtraError`` naming the pip extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from fxprune.errors import ExportError

EXPORTERS: dict[str, type[Exporter]] = {}


class Exporter:
    """Base class: subclasses set ``format``, ``suffixes`` and ``extra`` and implement ``export``."""

    format: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None  # pip extra providing the backend, if optional

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.format:
            EXPORTERS[cls.format] = cls

    def export(self, module, example_inputs, path: Path, **options) -> Path:
        raise NotImplementedError


def exporter_for(path: str | Path) -> type[Exporter]:
    """The registered exporter for a file name, or ExportError listing what exists."""
    from fxprune.exporters import onnx as _onnx  # noqa: F401 - registers (imports no onnx yet)
    from fxprune.exporters import tensorrt as _trt  # noqa: F401 - registers (imports no tensorrt)

    suffix = Path(path).suffix
    for cls in EXPORTERS.values():
        if suffix in cls.suffixes:
            return cls
    known = sorted(s for c in EXPORTERS.values() for s in c.suffixes)
    raise ExportError(f"no exporter for {suffix or 'a file without suffix'!r}; known: {known}")


def export(module, example_inputs, path: str | Path, **options):
    """Export ``module`` with the exporter registered for ``path``'s suffix; returns its report."""
    return exporter_for(path)().export(module, example_inputs, Path(path), **options)
