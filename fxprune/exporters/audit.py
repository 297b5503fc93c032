"""Post-export sparsity audit: read every weight initializer that feeds a Conv / Gemm / MatMul and
check the N:M pattern along the axis the runtime reduces over.

Axes, per ONNX semantics: ``Conv`` weight ``[M, C/group, kH, kW]`` reduces over dim 1; ``Gemm``
``B`` reduces over dim 1 when ``transB=1`` (``[N, K]``) and dim 0 otherwise; ``MatMul(X, W)``
reduces over ``W``'s dim -2. A ``Transpose`` between the initializer and the op is followed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fxprune.errors import ExportError


@dataclass
class AuditRow:
    initializer: str
    op: str
    node: str
    axis: int  # reduction axis in the initializer's own layout
    shape: tuple[int, ...]
    nm_ok: bool  # every group of M along the axis has at most N non-zeros
    expected: bool  # fxprune's N:M pass masked this weight


def _reduction_axis(node, arg_index: int, ndim: int) -> int | None:
    if node.op_type == "Conv" and arg_index == 1:
        return 1
    if node.op_type == "Gemm" and arg_index == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    if node.op_type == "Gemm" and arg_index == 0:
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return 0 if trans_a else 1
    if node.op_type == "MatMul" and arg_index == 1 and ndim >= 2:
        return ndim - 2
    if node.op_type == "MatMul" and arg_index == 0 and ndim >= 1:
        return ndim - 1
    return None


def is_nm_array(w: np.ndarray, n: int, m: int, axis: int) -> bool:
    """True when every group of ``m`` consecutive entries of ``w`` along ``axis`` has at most
    ``n`` non-zeros (False when the axis is not a multiple of ``m``). Shared by this audit and
    the equivalence proof (``fxprune.verify.proof.nm_violations``), which passes ``w != 0``."""
    moved = np.moveaxis(w, axis, -1)
    if moved.shape[-1] % m:
        return False
    nz = (moved.reshape(-1, moved.shape[-1] // m, m) != 0).sum(-1)
    return bool((nz <= n).all())


def audit_nm(
    model, n: int, m: int, expected: dict[str, np.ndarray] | None = None
) -> list[AuditRow]:
    """Audit an ``onnx.ModelProto`` (loaded with its external data).

    Args:
        model: the exported model.
        n, m: the pattern to check.
        expected: torch parameter name -> masked weight (numpy) for the weights the N:M pass
            masked. An initializer matches by name, or by value when the exporter renamed or
            transposed it.

    Returns:
        One row per weight initializer feeding a Conv / Gemm / MatMul.

    Raises:
        ExportError: a weight the pass masked is missing or lost its pattern on the way.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: node for node in model.graph.node for o in node.output}
    expected = expected or {}
    found: set[str] = set()
    rows = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        for k, name in enumerate(node.input[:2]):
            perm, src = None, name
            prod = producers.get(name)
            if prod is not None and prod.op_type == "Transpose" and prod.input[0] in inits:
                src = prod.input[0]
                perm = next((list(a.ints) for a in prod.attribute if a.name == "perm"), None)
            if src not in inits:
                continue
            w = numpy_helper.to_array(inits[src])
            axis = _reduction_axis(node, k, w.ndim)
            if axis is None or w.ndim < 2:
                continue
            if perm is not None:  # the op reads W.transpose(perm): map its axis back
                axis = perm[axis] if perm else w.ndim - 1 - axis
            match = _match(src, w, axis, expected)
            if match:
                found.add(match)
            rows.append(
                AuditRow(
                    src,
                    node.op_type,
                    node.name,
                    axis,
                    tuple(w.shape),
                    is_nm_array(w, n, m, axis),
                    bool(match),
                )
            )
    broken = [r for r in rows if r.expected and not r.nm_ok]
    missing = sorted(set(expected) - found)
    if broken or missing:
        parts = []
        if broken:
            parts.append(
                "lost the pattern: "
                + ", ".join(f"{r.initializer} ({r.op} axis {r.axis})" for r in broken[:5])
            )
        if missing:
            parts.append("not found in the ONNX graph: " + ", ".join(missing[:5]))
        raise ExportError(f"{n}:{m} sparsity audit failed: " + "; ".join(parts))
    return rows


def _match(name: str, w: np.ndarray, axis: int, expected: dict[str, np.ndarray]) -> str | None:
    if name in expected:
        return name
    for pname, pw in expected.items():
        # renamed or transposed copies: same values with the reduction axis at dim 1
        cand = np.moveaxis(w, axis, 1) if w.ndim == pw.ndim else None
        if cand is not None and cand.shape == pw.shape and np.array_equal(cand, pw):
            return pname
    return None
