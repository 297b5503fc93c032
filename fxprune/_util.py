"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import fnmatch

import torch


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Every submodule in eval mode for the duration; each one's own flag is restored after."""
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield module
    finally:
        for m, was in modes:
            m.training = was


def module_matches(name: str, pattern: str) -> bool:
    """A module name matches itself, a glob, or a parent module's name (``layer1`` -> all in it)."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar on stderr when asked for and installed, else an object that does nothing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    import sys

    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
