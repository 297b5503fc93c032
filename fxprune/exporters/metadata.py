"""The hand-off metadata of an exported ONNX file: what fxprune did to the model, written into
its ``metadata_props`` (:func:`build_metadata`, :func:`write_metadata`) and read back with every
field's digest checked (:func:`read_metadata`; :func:`describe` prints it).

A serving team gets the ``.onnx`` file and nothing else; the file says what it is. Keys, all
prefixed ``fxprune.``; ``version`` and ``plan_sha256`` are plain strings, the others JSON:

- ``version``: the fxprune that wrote the file. Always written: a plain
  ``fxprune.exporters.export(module, x, "m.onnx")`` without a compile result writes this key,
  ``io`` and ``sha256`` only (plus ``equivalence`` / ``latency`` when those reports are
  passed): the exporter vouches for nothing it was not given.
- ``plan``: the plan (``Plan.to_dict()``: the kept indices per pass, the config, the input
  shapes; no paths of the exporting machine), compact JSON; ``fxprune.Plan.from_json`` reads it.
- ``plan_sha256``: sha256 (hex) of the UTF-8 bytes of exactly the stored ``plan`` string (what
  fxprune before the per-field digests checked).
- ``removed``: per pass, by its plan name: units passes (channels, heads, ffn) as
  ``{"groups", "units_before", "units_kept"}``, blocks as ``{"removed": [...], "blocks_before"}``,
  any other pass (nm, permute, ...) as its report fields, lists and dicts as their lengths.
- ``equivalence``: the proof's ``ok``, ``max_rel_err``, ``max_abs_err``, ``tolerance``,
  ``worst_output``, ``dtype``, ``inputs_checked``, ``approximate``, ``pruning_effect``.
- ``nm_audit``: the exporter's own N:M audit of the file's weights (after an N:M pass):
  ``n``, ``m``, ``layers_checked``, ``masked`` (weights the pass masked), ``nm_layers`` (all
  that keep the pattern), ``violations`` (masked weights that lost it), ``ok``.
- ``latency``: the verifier's ``backend``, ``threads``, ``warmup``, ``repeats``, ``machine``
  (``noisy`` when the report judges it) and per batch ``dense_ms`` / ``pruned_ms`` (medians),
  ``speedup``, ``verdict``.
- ``io``: the file's ``inputs`` and ``outputs``, each ``{"name", "dtype", "shape"}`` (a dim as
  its size or its axis name): the names serving code binds by (see ``exporters.onnx``).
- ``sha256``: field -> sha256 of its stored string, for every other field
  (``fxprune.exporters.record``).

The reports are duck-typed (any object or mapping with those fields). Non-finite floats are
stored as strings (``"inf"``), so every value is strict JSON. ONNX Runtime shows the keys without
fxprune: ``InferenceSession(path).get_modelmeta().custom_metadata_map``.

Writing loads the model without its external data (a model over 2 GB keeps its tensors on disk)
and replaces only the ``fxprune.*`` entries. Reading names each field changed, deleted or not
covered by a digest, and what the record says failed (``digest_ok``, ``unverified``,
``failures``); a file that cannot be read is a :class:`~fxprune.errors.FileAccessError`, one
that is not ONNX or holds malformed fxprune JSON, or a field of the wrong JSON type, a
:class:`MetadataError`, each naming it.
"""

from __future__ import annotations

from pathlib import Path

from fxprune.errors import FileAccessError
from fxprune.exporters.describe import describe
from fxprune.exporters.record import (
    DIGESTS,
    PREFIX,
    MetadataError,
    compact,
    decode_metadata,
    digest,
    encode_metadata,
    seal,
)

__all__ = [  # the record's codec lives in exporters.record; its readers import it from here
    "DIGESTS",
    "PREFIX",
    "MetadataError",
    "decode_metadata",
    "encode_metadata",
    "build_metadata",
    "write_metadata",
    "read_metadata",
    "describe",
]
EQUIVALENCE_FIELDS = (
    "ok",
    "max_rel_err",
    "max_abs_err",
    "tolerance",
    "worst_output",
    "dtype",
    "inputs_checked",
    "approximate",
    "pruning_effect",
)


def fxprune_version() -> str:
    """The installed fxprune's version, ``fxprune.__version__`` (read from the distribution:
    the package's ``__init__`` is a layer above the exporters)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fxprune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def plan_digest(plan_json: str) -> str:
    """sha256 (hex) of the UTF-8 bytes of a stored plan string (``plan_sha256``)."""
    return digest(plan_json)


def _get(obj, name, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def _pass_entry(p) -> dict:
    from fxprune.passes import BlocksResult, UnitsResult

    if isinstance(p, UnitsResult):
        entry = {
            "groups": len(p.units),
            "units_before": sum(int(b) for b, _ in p.units.values()),
            "units_kept": sum(int(k) for _, k in p.units.values()),
        }
        if p.approximate_groups:
            entry["approximate_groups"] = p.approximate_groups
        return entry
    if isinstance(p, BlocksResult):
        return {"removed": list(p.removed), "blocks_before": p.blocks_before}
    details = getattr(p, "details", {}) or {}
    entry = {k: len(v) if isinstance(v, (dict, list, tuple)) else v for k, v in details.items()}
    return entry or {"changed": bool(getattr(p, "changed", False))}


def removed(passes) -> dict:
    """What each pass removed, by its plan name (a name seen again gets ``#2``, ``#3``)."""
    out: dict[str, dict] = {}
    for p in passes:
        key, k = p.name, 2
        while key in out:
            key, k = f"{p.name}#{k}", k + 1
        out[key] = _pass_entry(p)
    return out


def audit_summary(rows, nm: tuple[int, int]) -> dict:
    """The N:M audit's rows (``fxprune.exporters.audit.AuditRow``) as counts."""
    violations = sum(1 for r in rows if r.expected and not r.nm_ok)
    return {
        "n": nm[0],
        "m": nm[1],
        "layers_checked": len(rows),
        "masked": sum(1 for r in rows if r.expected),
        "nm_layers": sum(1 for r in rows if r.nm_ok),
        "violations": violations,
        "ok": violations == 0,
    }


def latency_summary(lat) -> dict:
    """The verifier's latency report (``LatencyReport``, duck-typed) per batch."""
    rows = [
        {k: _get(r, k) for k in ("batch", "dense_ms", "pruned_ms", "speedup", "verdict")}
        for r in _get(lat, "rows", []) or []
    ]
    head = {k: _get(lat, k) for k in ("backend", "threads", "warmup", "repeats", "machine")}
    if _get(lat, "mode") == "decode":  # ms per decode step; the generation timed
        head.update({k: _get(lat, k) for k in ("mode", "prompt_len", "new_tokens")})
    if _get(lat, "noisy") is not None:  # the verifier's judgement of the machine's quiet
        head["noisy"] = bool(_get(lat, "noisy"))
    return {**head, "batches": rows}


def build_metadata(
    result=None, equivalence=None, latency=None, *, nm=None, audit=None, io=None, extra=None
) -> dict:
    """The ``fxprune.*`` entries (key -> string) for an export, sealed with ``sha256``: see the
    module docstring.

    Args:
        result: the ``CompileResult`` exported (its ``plan`` and ``passes``), or None.
        equivalence: ``fxprune.verify.equivalence``'s report, or None.
        latency: ``fxprune.verify.latency``'s report, or None.
        nm, audit: the ``(n, m)`` pattern the exporter audited and its rows; None when no N:M
            pass ran.
        io: the file's inputs and outputs (:func:`graph_io`), or None.
        extra: more fields (name -> JSON-able value), e.g. the genai record's ``genai``.
    """
    props = {"version": fxprune_version()}
    if result is not None:
        plan = compact(result.plan.to_dict())
        props.update(plan=plan, plan_sha256=plan_digest(plan))
        props["removed"] = compact(removed(result.passes))
    if equivalence is not None:
        props["equivalence"] = compact({k: _get(equivalence, k) for k in EQUIVALENCE_FIELDS})
    if nm:
        props["nm_audit"] = compact(audit_summary(audit or [], nm))
    if latency is not None:
        props["latency"] = compact(latency_summary(latency))
    if io is not None:
        props["io"] = compact(io)
    props.update({k: compact(v) for k, v in (extra or {}).items()})
    return {PREFIX + k: v for k, v in seal(props).items()}


def graph_io(path: str | Path) -> dict:
    """The inputs and outputs of the ONNX file at ``path`` as the hand-off records them:
    ``{"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}``, a dim as its size or its
    axis name (``batch``), ``None`` where neither is known."""
    model = _load(Path(path))
    return {
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
    }


def _value_info(v) -> dict:
    import onnx

    t = v.type.tensor_type
    name = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else "unknown"
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim]
    return {
        "name": v.name,
        "dtype": {"float": "float32", "double": "float64"}.get(name, name),
        "shape": dims if t.HasField("shape") else None,
    }


def _load(path: Path):
    """The ModelProto at ``path`` without its external data, or a typed error naming it."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FileAccessError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise MetadataError(f"{path} is not an ONNX model (truncated or corrupt): {e}") from e
    if not model.ir_version or not model.HasField("graph"):
        raise MetadataError(f"{path} is not an ONNX model (no IR version or graph)")
    return model


STRIPPED = frozenset({"pkg.torch.onnx.stack_trace"})
"""Node metadata keys removed from exported files (absolute source paths of the build machine)."""


def write_metadata(path: str | Path, props: dict[str, str]) -> None:
    """Replace the ``fxprune.*`` entries of the ONNX file at ``path`` with ``props``; other
    entries stay, external data files are not read or rewritten. The exporter's per-node
    Python stack traces (:data:`STRIPPED`) go: they hold this machine's file paths, which a
    file handed to another team should not carry."""
    import onnx

    path = Path(path)
    model = _load(path)
    for node in model.graph.node:
        props_kept = [(p.key, p.value) for p in node.metadata_props if p.key not in STRIPPED]
        del node.metadata_props[:]
        for key, value in props_kept:
            node.metadata_props.add(key=key, value=value)
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in [*keep, *props.items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(path))  # tensors left on disk carry no raw data: none rewritten


def read_metadata(path: str | Path) -> dict:
    """The fxprune metadata of an ONNX file, decoded, keys without the ``fxprune.`` prefix
    (``{}`` when the file has none), with the judgements ``digest_ok``, ``unverified`` and
    ``failures`` (``fxprune.exporters.record``): ``digest_ok`` False means a field was changed
    or deleted after the export, or is not covered by a digest.

    Raises:
        FileAccessError: the file cannot be read.
        MetadataError: not an ONNX model, or an ``fxprune.*`` value is not valid JSON or has
            the wrong JSON type.
    """
    path = Path(path)
    raw = {
        p.key[len(PREFIX) :]: p.value
        for p in _load(path).metadata_props
        if p.key.startswith(PREFIX)
    }
    return decode_metadata(raw, path)
