"""Every error fxprune's public functions raise derives from :class:`FxPruneError`.

User mistakes (bad arguments, untraceable models) are typed errors with a message that names the
argument, node or layer and says what to do; ``assert`` is kept for internal invariants. Inside
the fake-tensor shape checks (``graph.shapeprop``) a misfit raises ``RuntimeError``, as the real
op would, and the capture or rewrite that ran them turns it into a :class:`TraceError` or
:class:`PassError`. The classes that also derive from a builtin (``ConfigError`` is a
``ValueError``, ``FileAccessError`` an ``OSError``, ``MissingExtraError`` an ``ImportError``)
can be caught either way.
"""

from __future__ import annotations


class FxPruneError(Exception):
    """Base class of all fxprune errors."""


class ConfigError(FxPruneError, ValueError):
    """An option is out of range or refers to something that does not exist."""


class TraceError(FxPruneError):
    """Neither torch.fx symbolic tracing nor torch.export could capture the model."""


class UnsupportedModelError(FxPruneError):
    """The model has a property fxprune refuses to prune (tied weights, non-tensor outputs, ...)."""


class PassError(FxPruneError):
    """A pass produced a graph that does not run; names the pass and the node."""


class PlanError(FxPruneError):
    """A saved plan does not match the model it is applied to."""


class CheckpointError(PlanError):
    """A checkpoint file is missing, unreadable, corrupt, holds pickled code (without trust) or
    does not fit the model; the message names the file."""


class FileAccessError(FxPruneError, OSError):
    """A file or folder cannot be read or written (a read-only folder, a directory given where a
    file goes); the message names the path."""


class ExportError(FxPruneError):
    """An exporter failed (validation, tolerance, missing extra)."""


class MissingExtraError(FxPruneError, ImportError):
    """An optional dependency is not installed; the message names the pip extra."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(f"{purpose} needs the '{package}' package: pip install 'fxprune[{extra}]'")
        self.package = package
        self.extra = extra


class NothingToPruneError(ConfigError):
    """A pass the user asked for would remove nothing; the message says why (nothing of that
    kind in the graph, everything ignored or blocked, or the ratio rounds to zero)."""


class TrainModeError(UnsupportedModelError):
    """A pruned graph captured in eval mode would not train like the model; the message says why
    (``F.dropout(training=...)``, an ``if self.training:`` branch, a torch.export capture)."""
