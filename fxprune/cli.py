"""The ``fxprune`` command line: ``prune | export | verify | estimate | inspect``.

Tables go to stdout, progress to stderr, ``--json`` prints one JSON object for machines.
Exit codes: 0 success, 1 a failed check (equivalence, or a verify gate), 2 a usage or fxprune
error.

This module is the entry point: it parses the arguments (``fxprune.cli_args``), checks the
output paths before any work, runs the sub-command (``fxprune.cli_commands``) and turns an
fxprune error into one line and exit code 2.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from fxprune.cli_args import parser
from fxprune.cli_commands import COMMANDS, Log
from fxprune.cli_inputs import is_checkpoint  # noqa: F401 - re-exported (fxprune.cli's public name)

# the flags that name a file to write, checked before any work: a directory given as a file
# fails at once, not after minutes of pruning
OUTPUTS = (("--save", "save"), ("--export", "export"), ("-o", "out"), ("--report", "report"))
FOLDERS = (("--save-pretrained", "save_pretrained"),)  # written as a folder


def _check_outputs(a) -> None:
    from fxprune.errors import FileAccessError

    folders = FOLDERS + ((("-o", "out"),) if getattr(a, "format", None) == "genai" else ())
    for flag, attr in OUTPUTS:
        if (flag, attr) in folders:
            continue
        path = getattr(a, attr, None)
        if path and Path(path).is_dir():
            raise FileAccessError(f"{flag} {path} is a directory: give a file path")
        _no_file_above(flag, path)
    for flag, attr in folders:
        path = getattr(a, attr, None)
        if path and Path(path).exists() and not Path(path).is_dir():
            raise FileAccessError(f"{flag} {path} is a file: give a folder")
        _no_file_above(flag, path)
    out = Path(a.out) if ("-o", "out") in folders else None
    if out is not None and not a.overwrite and out.is_dir() and any(out.iterdir()):
        # the exporter refuses it too, but only after the pruning
        raise FileAccessError(f"-o {out} is a folder that is not empty: pass --overwrite")


def _no_file_above(flag: str, path) -> None:
    """A path under a file (``-o afile/sub/m.onnx``) is refused before any work."""
    from fxprune.errors import FileAccessError

    above = next((p for p in Path(path).parents if p.exists()), None) if path else None
    if above is not None and not above.is_dir():
        raise FileAccessError(f"{flag} {path}: {above} is a file, not a folder")


def _timing(a):
    """``--semi-structured MODE`` as the torch-cuda latency backend of that mode, verify's
    ``--precision`` / ``--tokenizer-from`` as the onnxruntime-genai backend with them (None
    without those flags), refused before any work where nothing would use them."""
    from fxprune.errors import ConfigError

    decode = [f for f in ("prompt_len", "new_tokens") if getattr(a, f, None) is not None]
    if decode:
        from fxprune.verify.latency import resolve

        flags = ", ".join("--" + f.replace("_", "-") for f in decode)
        if not resolve(a.backend).decode:
            raise ConfigError(f"{flags}: decode backends time generation, not {a.backend}")
        if not getattr(a, "measure", True):
            raise ConfigError(f"{flags}: estimate times decoding only with --measure")
    mode = getattr(a, "semi_structured", None)
    genai = [f for f in ("precision", "tokenizer_from") if getattr(a, f, None)]
    if mode is not None and a.backend == "onnxruntime-genai":
        raise ConfigError(
            f"--semi-structured {mode} applies to torch-cuda timings, not onnxruntime-genai"
        )
    if genai and a.cmd == "verify":
        if a.backend != "onnxruntime-genai":
            flags = ", ".join("--" + f.replace("_", "-") for f in genai)
            raise ConfigError(f"{flags}: options of --backend onnxruntime-genai, not {a.backend}")
        from fxprune.verify.latency import OnnxRuntimeGenai

        return OnnxRuntimeGenai(a.precision or "fp32", a.tokenizer_from)
    if mode is None:
        return None
    from fxprune.verify.latency import TorchCuda

    if a.backend != "torch-cuda" or not getattr(a, "measure", True):
        where = "without --measure" if a.backend == "torch-cuda" else f"on --backend {a.backend}"
        raise ConfigError(f"--semi-structured {mode} applies to torch-cuda timings, not {where}")
    return TorchCuda(mode)


def _one_line(e: Exception) -> str:
    from fxprune.errors import FxPruneError

    text = str(e)
    if not isinstance(e, FxPruneError) and e.filename:  # an OSError no command wrapped
        text = f"{e.filename}: {e.strerror or e}"
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip()) or type(e).__name__


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    from fxprune._util import silent
    from fxprune.errors import FxPruneError

    log = Log(a.quiet or a.json)
    try:
        _check_outputs(a)
        a.timing = _timing(a)
        with silent() if a.quiet or a.json else contextlib.nullcontext():
            return COMMANDS[a.cmd](a, log)
    except (FxPruneError, OSError) as e:  # an fxprune error, or I/O on a path the user gave
        if a.debug:
            raise
        log(None)
        print(f"fxprune: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
