"""ONNX exporter: torch.onnx (dynamo) export with a dynamic batch axis, ``onnx.checker``, ONNX
Runtime parity on fresh inputs, the N:M audit, and an atomic write.

The file appears at its destination only after every check passed: the model (and its external
data, for models over 2 GB) is written into a hidden staging folder beside the destination
(``.<name>.<pid>.<random>``), checked there, then moved into place. An export that was killed
leaves its staging folder behind; the next export to the same destination removes it when the
pid in its name no longer runs on this machine (a folder of an older fxprune, without a pid, or
any folder on Windows, where the pid is not probed: when untouched for
``fxprune.atomic.STALE_AFTER_S``; the rule all of fxprune's writers share, ``atomic.is_stale``).
A destination under a file, or a folder where the file goes, is refused before any work
(``fxprune.exporters.check_target``).

The graph's outputs are named as the forward returns them (``logits``, ``last_hidden_state``,
``output_0``: ``fxprune.exporters.io_names``), its inputs after the forward's parameters
(``input_ids``, ``x``).

Before the checks run, the staged file gets the hand-off metadata (``fxprune.exporters.metadata``:
the fxprune version, the inputs and outputs, and with the ``result`` / ``equivalence`` /
``latency`` given, the plan and its sha256, what each pass removed, the proof, the N:M audit and
the latency per batch; a sha256 of every field), so ``onnx.checker`` and ONNX Runtime check the
very file that lands.

ONNX Runtime parity fails on a NaN/Inf in either runtime's output: a non-finite PyTorch output
proves nothing, and a non-finite ONNX Runtime output where PyTorch is finite is a mismatch.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxprune._util import Report, eval_mode
from fxprune.atomic import is_stale
from fxprune.errors import ExportError, MissingExtraError
from fxprune.exporters import Exporter, check_target
from fxprune.exporters.audit import AuditRow, audit_nm
from fxprune.exporters.io_names import name_outputs
from fxprune.exporters.metadata import build_metadata, graph_io, write_metadata
from fxprune.graph.trace import DYNAMIC_DIMS, default_dynamic_dims, widen

DEFAULT_OPSET = 18  # the torch.onnx dynamo exporter's well-tested range; ORT runs it everywhere
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit, with room for the graph


@dataclass
class OnnxReport(Report):
    """What an ONNX export wrote and checked."""

    path: Path
    opset: int
    dynamic_batch: bool
    ort_max_abs_err: float
    ort_max_rel_err: float
    audit: list[AuditRow] = field(default_factory=list)
    external_data: bool = False
    metadata: list[str] = field(default_factory=list)  # the metadata_props keys written

    def summary(self) -> str:  # the name before the report protocol
        return self.table()

    def table(self) -> str:
        nm = [r for r in self.audit if r.expected]
        lines = [
            f"wrote {self.path} (opset {self.opset}, dynamic batch: {self.dynamic_batch}, "
            f"external data: {self.external_data})",
            f"onnx.checker: ok; ONNX Runtime parity: max abs err {self.ort_max_abs_err:.2e}, "
            f"max rel err {self.ort_max_rel_err:.2e}",
        ]
        if self.metadata:
            lines.append(
                f"hand-off metadata: {', '.join(self.metadata)} (fxprune inspect {self.path.name})"
            )
        if self.audit:
            lines.append(
                f"sparsity audit: {len(nm)} weights masked by fxprune keep the pattern; "
                f"{sum(r.nm_ok for r in self.audit)}/{len(self.audit)} GEMM/conv "
                "weights are N:M along their reduction axis"
            )
        return "\n".join(lines)


class OnnxExporter(Exporter):
    format = "onnx"
    suffixes = (".onnx",)
    extra = None  # onnx and onnxruntime are core dependencies

    def export(
        self,
        module,
        example_inputs,
        path,
        *,
        opset: int = DEFAULT_OPSET,
        dynamic_batch: bool = True,
        rtol: float = 1e-3,
        atol: float = 1e-4,
        nm: tuple[int, int] | None = None,
        nm_weights: dict | None = None,
        seed: int = 0,
        result=None,  # the CompileResult it came from, for the hand-off metadata
        equivalence=None,  # fxprune.verify.equivalence's report, recorded in the metadata
        latency=None,  # fxprune.verify.latency's report, recorded in the metadata
        written: str | Path | None = None,
    ) -> OnnxReport:
        """Export ``module`` to ``path`` and check it; see the module docstring (and
        ``fxprune.exporters.metadata`` for what ``result``, ``equivalence`` and ``latency``
        add to the file).

        ``written``: an ONNX file :func:`write_onnx` already made of this ``module``, on inputs
        of ``example_inputs``' shapes with this ``opset`` and ``dynamic_batch`` (the one
        ``fxprune verify`` timed on ONNX Runtime): copied instead of capturing the module a
        second time, where its weights are inline. Every check below runs on the copy.

        Raises:
            FileAccessError: ``path`` is a folder, or lies under a file (before any work).
            ExportError: the export, the checker, the N:M audit or ONNX Runtime parity failed.
        """
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - core deps
            raise MissingExtraError("onnx/onnxruntime", "onnx", "ONNX export") from e
        path = Path(path)
        check_target(path)  # a folder there, or a file above it: refused before the work
        args = (
            tuple(example_inputs)
            if isinstance(example_inputs, (tuple, list))
            else (example_inputs,)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent))
        try:
            staged = tmp / path.name
            if written is not None and weight_bytes(module) <= EXTERNAL_DATA_BYTES:
                shutil.copyfile(written, staged)  # the capture already made, not a second one
                external = False
            else:
                external = write_onnx(module, args, staged, opset, dynamic_batch)
            rows = []
            if nm:  # the audit reads the weights: load them (external data too)
                model = onnx.load(str(staged), load_external_data=True)
                rows = audit_nm(model, *nm, expected=nm_weights)
                del model
            io = graph_io(staged)
            props = build_metadata(result, equivalence, latency, nm=nm, audit=rows, io=io)
            write_metadata(staged, props)
            onnx.checker.check_model(str(staged), full_check=True)
            abs_err, rel_err = _parity(module, args, staged, ort, dynamic_batch, rtol, atol, seed)
            for f in tmp.iterdir():  # all checks passed: move into place
                os.replace(f, path.parent / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return OnnxReport(path, opset, dynamic_batch, abs_err, rel_err, rows, external, list(props))


def remove_stale_staging(path: Path) -> list[Path]:
    """Remove the staging folders that killed exports to ``path`` left beside it (see the
    module docstring for which count as stale); returns the folders removed."""
    # mkdtemp's random part is 8 characters of [a-z0-9_]; the pid is absent in older names
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:(\d+)\.)?[a-z0-9_]{8}")
    removed = []
    for d in path.parent.iterdir():
        found = pattern.fullmatch(d.name)
        if not found or not d.is_dir():
            continue
        if is_stale(d, int(found.group(1)) if found.group(1) else None):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def write_onnx(module, args: tuple, dest: Path, opset: int, dynamic_batch: bool) -> bool:
    """Write ``module`` as ONNX to ``dest``; True when the weights went to external data.

    With ``dynamic_batch``, the dims the capture left free (``gm.meta[DYNAMIC_DIMS]``, else
    :func:`default_dynamic_dims`: batch, and sequence length of integer 2-D inputs) become named
    axes: ``batch`` (dim 0), ``sequence`` (dim 1 of a token-id / mask input), ``<input>_dim<d>``
    otherwise. A model that cannot take them all keeps only the batch axis free."""
    dims = getattr(module, "meta", {}).get(DYNAMIC_DIMS)
    if not dynamic_batch:
        tries = [[[] for _ in args]]
    else:
        if dims is None or len(dims) != len(args):
            dims = default_dynamic_dims(args)
        tries = [dims, [[d for d in ds if d == 0] for ds in dims]]
        tries = tries[:1] if tries[1] == tries[0] else tries
    for k, free in enumerate(tries):
        spec = _named_axes(args, free)
        try:
            with eval_mode(module), warnings.catch_warnings():
                # shared Dim objects (one batch for all inputs) make it note every reuse
                warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
                prog = torch.onnx.export(
                    module,
                    widen(args, free),
                    dynamo=True,
                    opset_version=opset,
                    dynamic_shapes=spec if any(free) else None,
                    verbose=False,
                )
            break
        except Exception as e:  # noqa: BLE001
            if k < len(tries) - 1:
                continue  # a length the model fixes: keep the batch axis alone
            raise ExportError(
                f"torch.onnx.export failed: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            ) from e
    name_outputs(prog)
    external = weight_bytes(module) > EXTERNAL_DATA_BYTES
    prog.save(str(dest), external_data=external)
    if any(a is None for a in args) and any(free) and not external:
        _name_axes_in_file(dest, args, free)
    return external


def weight_bytes(module) -> int:
    """Bytes of ``module``'s parameters and buffers (past ``EXTERNAL_DATA_BYTES`` they are
    written as external data)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _name_axes_in_file(dest: Path, args: tuple, free: list[list[int]]) -> None:
    """torch.onnx renames dynamic axes only when every input is a tensor; with a None
    positional (GPT-2's cache before its mask) write the ``batch`` / ``sequence`` names here."""
    import onnx

    model = onnx.load(str(dest))
    tensors = [
        (i, a, ds) for i, (a, ds) in enumerate(zip(args, free, strict=True)) if a is not None
    ]
    for inp, (i, a, ds) in zip(model.graph.input, tensors, strict=False):
        for d in ds:
            text = d == 1 and a.ndim == 2 and not a.is_floating_point()
            dim = inp.type.tensor_type.shape.dim[d]
            dim.dim_param = "batch" if d == 0 else "sequence" if text else f"input{i}_dim{d}"
    onnx.save(model, str(dest))


def _named_axes(args: tuple, free: list[list[int]]) -> tuple:
    """torch.export dims named for the ONNX axes: one ``batch`` and one ``sequence`` shared by
    the inputs whose size there matches the first such input's (so ids and mask stay equal)."""
    shared: dict[str, tuple[torch.export.Dim, int]] = {}
    spec = []
    for i, (a, ds) in enumerate(zip(args, free, strict=True)):
        axes = {}
        for d in ds:
            text = d == 1 and a.ndim == 2 and not a.is_floating_point()
            name = "batch" if d == 0 else "sequence" if text else f"input{i}_dim{d}"
            dim, size = shared.setdefault(name, (torch.export.Dim(name, min=1), a.shape[d]))
            axes[d] = dim if size == a.shape[d] else torch.export.Dim(f"{name}{i}", min=1)
        spec.append(axes or None)
    return tuple(spec)


def padding(sess, feeds) -> np.ndarray | None:
    """``[batch, sequence]`` True at padded positions, from an integer 2-D input named like an
    attention mask holding only 0 / 1; None when the model takes no such input."""
    for i in sess.get_inputs():
        v = feeds.get(i.name)
        if (
            v is not None
            and "mask" in i.name.lower()
            and v.ndim == 2
            and np.issubdtype(v.dtype, np.integer)
            and np.isin(v, (0, 1)).all()
        ):
            return v == 0
    return None


def _parity(module, args, path: Path, ort, dynamic_batch, rtol, atol, seed):
    """Run fresh random inputs through both runtimes: twice the batch when it is dynamic, and
    one token shorter where the file has a dynamic sequence axis (token ids, masks)."""
    g = torch.Generator().manual_seed(seed)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    axes = [list(i.shape) for i in sess.get_inputs()]
    fresh = []
    for k, a in enumerate(a for a in args if a is not None):  # ONNX has no None inputs
        shape = list(a.shape)
        if dynamic_batch and shape:
            shape[0] *= 2
        free = axes[k] if k < len(axes) else []
        if len(shape) == 2 and len(free) == 2 and isinstance(free[1], str) and shape[1] > 1:
            shape[1] -= 1
        if a.is_floating_point():
            fresh.append(torch.randn(shape, generator=g, dtype=a.dtype))
        else:
            hi = int(a.max()) + 1 if a.numel() else 2
            fresh.append(torch.randint(0, max(hi, 2), shape, generator=g, dtype=a.dtype))
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), fresh, strict=False)}
    it = iter(fresh)
    fresh = [None if a is None else next(it) for a in args]  # the module takes them back
    try:
        got = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001
        raise ExportError(
            f"ONNX Runtime could not run the exported model on inputs of shape "
            f"{[list(t.shape) for t in fresh]}"
            + (
                " (the model fixed its batch size; export with dynamic_batch=False)"
                if dynamic_batch
                else ""
            )
            + f": {str(e).strip().splitlines()[0]}"
        ) from e
    with torch.no_grad(), eval_mode(module):  # the export is an inference graph: compare in eval
        ref = [t for t in pytree.tree_leaves(module(*fresh)) if isinstance(t, torch.Tensor)]
    if len(got) != len(ref):
        raise ExportError(f"ONNX Runtime returned {len(got)} outputs, PyTorch {len(ref)}")
    pad = padding(sess, feeds)
    abs_err = rel_err = 0.0
    for i, (r, o) in enumerate(zip(ref, got, strict=True)):
        r = r.detach().double().numpy()
        if r.shape != o.shape:
            raise ExportError(f"ONNX Runtime output shape {o.shape} != PyTorch {r.shape}")
        if pad is not None and r.shape[:2] == pad.shape:
            # a padded position's output is undefined (every key of a causal row can be masked:
            # torch.onnx exports the dense model differently there too); compare real tokens
            r, o = r[~pad], o[~pad]
        # np.max over a NaN difference is NaN and NaN compares False either way: test explicitly
        if not np.isfinite(r).all():
            raise ExportError(
                f"PyTorch output {i} has {int((~np.isfinite(r)).sum())} NaN/Inf values on the "
                "fresh inputs: the ONNX Runtime parity check proves nothing (check the weights)"
            )
        if not np.isfinite(o).all():
            raise ExportError(
                f"ONNX Runtime output {i} has {int((~np.isfinite(o)).sum())} NaN/Inf values "
                "where PyTorch is finite"
            )
        err = float(np.abs(r - o).max()) if r.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        abs_err, rel_err = max(abs_err, err), max(rel_err, err / scale if scale else 0.0)
        if not np.allclose(o, r, rtol=rtol, atol=atol * max(scale, 1.0)):
            raise ExportError(
                f"ONNX Runtime differs from PyTorch: max abs err {err:.3e} "
                f"(scale {scale:.3e}, rtol {rtol}, atol {atol})"
            )
    return abs_err, rel_err
