"""ONNX exporter: torch.onnx (dynamo) export with a dynamic batch axis, ``onnx.checker``, ONNX
Runtime parity on fresh inputs, the N:M audit, and an atomic write.

The file appears at its destination only after every check passed: the model (and its external
data, for models over 2 GB) is written into a temporary folder beside the destination, checked
there, then moved into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxprune._util import eval_mode
from fxprune.errors import ExportError, MissingExtraError
from fxprune.exporters import Exporter
from fxprune.exporters.audit import AuditRow, audit_nm

DEFAULT_OPSET = 18  # the torch.onnx dynamo exporter's well-tested range; ORT runs it everywhere


@dataclass
class OnnxReport:
    """What an ONNX export wrote and checked."""

    path: Path
    opset: int
    dynamic_batch: bool
    ort_max_abs_err: float
    ort_max_rel_err: float
    audit: list[AuditRow] = field(default_factory=list)
    external_data: bool = False

    def summary(self) -> str:
        nm = [r for r in self.audit if r.expected]
        lines = [
            f"wrote {self.path} (opset {self.opset}, dynamic batch: {self.dynamic_batch}, "
            f"external data: {self.external_data})",
            f"onnx.checker: ok; ONNX Runtime parity: max abs err {self.ort_max_abs_err:.2e}, "
            f"max rel err {self.ort_max_rel_err:.2e}",
        ]
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
    ) -> OnnxReport:
        """Export ``module`` to ``path`` and check it; see the module docstring."""
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - core deps
            raise MissingExtraError("onnx/onnxruntime", "onnx", "ONNX export") from e
        path = Path(path)
        args = (
            tuple(example_inputs)
            if isinstance(example_inputs, (tuple, list))
            else (example_inputs,)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            staged = tmp / path.name
            external = _export(module, args, staged, opset, dynamic_batch)
            onnx.checker.check_model(str(staged), full_check=True)
            model = onnx.load(str(staged), load_external_data=True)
            abs_err, rel_err = _parity(module, args, staged, ort, dynamic_batch, rtol, atol, seed)
            rows = audit_nm(model, *nm, expected=nm_weights) if nm else []
            for f in tmp.iterdir():  # all checks passed: move into place
                os.replace(f, path.parent / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return OnnxReport(path, opset, dynamic_batch, abs_err, rel_err, rows, external)


def _export(module, args: tuple, dest: Path, opset: int, dynamic_batch: bool) -> bool:
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic = tuple(
            {0: batch} if isinstance(a, torch.Tensor) and a.ndim else None for a in args
        )
    try:
        with eval_mode(module):
            prog = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic,
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001
        raise ExportError(
            f"torch.onnx.export failed: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from e
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    external = size > 2**31 - 2**26  # protobuf's 2 GB limit, with room for the graph
    prog.save(str(dest), external_data=external)
    return external


def _parity(module, args, path: Path, ort, dynamic_batch, rtol, atol, seed):
    """Run fresh random inputs (twice the batch when it is dynamic) through both runtimes."""
    g = torch.Generator().manual_seed(seed)
    fresh = []
    for a in args:
        shape = list(a.shape)
        if dynamic_batch and shape:
            shape[0] *= 2
        if a.is_floating_point():
            fresh.append(torch.randn(shape, generator=g, dtype=a.dtype))
        else:
            hi = int(a.max()) + 1 if a.numel() else 2
            fresh.append(torch.randint(0, max(hi, 2), shape, generator=g, dtype=a.dtype))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), fresh, strict=False)}
    try:
        got = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001
        raise ExportError(
            f"ONNX Runtime could not run the exported model on a batch of {fresh[0].shape[0]}"
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
    abs_err = rel_err = 0.0
    for r, o in zip(ref, got, strict=True):
        r = r.detach().double().numpy()
        if r.shape != o.shape:
            raise ExportError(f"ONNX Runtime output shape {o.shape} != PyTorch {r.shape}")
        err = float(np.abs(r - o).max()) if r.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        abs_err, rel_err = max(abs_err, err), max(rel_err, err / scale if scale else 0.0)
        if not np.allclose(o, r, rtol=rtol, atol=atol * max(scale, 1.0)):
            raise ExportError(
                f"ONNX Runtime differs from PyTorch: max abs err {err:.3e} "
                f"(scale {scale:.3e}, rtol {rtol}, atol {atol})"
            )
    return abs_err, rel_err
