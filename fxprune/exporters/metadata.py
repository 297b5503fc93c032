"""The hand-off metadata of an exported ONNX file: what fxprune did to the model, written into
its ``metadata_props`` (:func:`build_metadata`, :func:`write_metadata`) and read back with the
plan's digest checked (:func:`read_metadata`, :func:`describe`).

A serving team gets the ``.onnx`` file and nothing else; the file says what it is. Keys, all
prefixed ``fxprune.``; ``version`` and ``plan_sha256`` are plain strings, the others JSON:

- ``version``: the fxprune that wrote the file. Always written: a plain
  ``fxprune.exporters.export(module, x, "m.onnx")`` without a compile result writes this key
  only (plus ``equivalence`` / ``latency`` when those reports are passed): the exporter vouches
  for nothing it was not given.
- ``plan``: the plan (``Plan.to_dict()``: the kept indices per pass, the config, the input
  shapes; no paths of the exporting machine), compact JSON; ``fxprune.Plan.from_json`` reads it.
- ``plan_sha256``: sha256 (hex) of the UTF-8 bytes of exactly the stored ``plan`` string.
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

The reports are duck-typed (any object or mapping with those fields). Non-finite floats are
stored as strings (``"inf"``), so every value is strict JSON. ONNX Runtime shows the keys without
fxprune: ``InferenceSession(path).get_modelmeta().custom_metadata_map``.

Writing loads the model without its external data (a model over 2 GB keeps its tensors on disk)
and replaces only the ``fxprune.*`` entries. Reading reports a changed plan as
``digest_ok: False``; a file that cannot be read is a :class:`~fxprune.errors.FileAccessError`,
one that is not ONNX or holds malformed fxprune JSON a :class:`MetadataError`, each naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from fxprune.errors import ExportError, FileAccessError

PREFIX = "fxprune."
PLAIN = ("version", "plan_sha256")  # stored as plain strings; every other key is JSON
# the order read_metadata returns the keys in (any other fxprune.* key after them, by name)
ORDER = (
    "version",
    "plan",
    "plan_sha256",
    "digest_ok",
    "removed",
    "equivalence",
    "nm_audit",
    "latency",
)
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


class MetadataError(ExportError):
    """An ``.onnx`` file is not an ONNX model, or its fxprune metadata is not valid JSON; the
    message names the file."""


def fxprune_version() -> str:
    """The installed fxprune's version, ``fxprune.__version__`` (read from the distribution:
    the package's ``__init__`` is a layer above the exporters)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fxprune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def plan_digest(plan_json: str) -> str:
    """sha256 (hex) of the UTF-8 bytes of a stored plan string."""
    return hashlib.sha256(plan_json.encode("utf-8")).hexdigest()


def _get(obj, name, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def _strict(v):
    """``v`` with non-finite floats as strings and numpy scalars as numbers (strict JSON)."""
    if isinstance(v, dict):
        return {str(k): _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        return _strict(v.tolist())  # numpy / torch scalars and arrays
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _dumps(v) -> str:
    return json.dumps(_strict(v), separators=(",", ":"), allow_nan=False)


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


def build_metadata(result=None, equivalence=None, latency=None, *, nm=None, audit=None) -> dict:
    """The ``fxprune.*`` entries (key -> string) for an export: see the module docstring.

    Args:
        result: the ``CompileResult`` exported (its ``plan`` and ``passes``), or None.
        equivalence: ``fxprune.verify.equivalence``'s report, or None.
        latency: ``fxprune.verify.latency``'s report, or None.
        nm, audit: the ``(n, m)`` pattern the exporter audited and its rows; None when no N:M
            pass ran.
    """
    props = {"version": fxprune_version()}
    if result is not None:
        plan = _dumps(result.plan.to_dict())
        props.update(plan=plan, plan_sha256=plan_digest(plan))
        props["removed"] = _dumps(removed(result.passes))
    if equivalence is not None:
        props["equivalence"] = _dumps({k: _get(equivalence, k) for k in EQUIVALENCE_FIELDS})
    if nm:
        props["nm_audit"] = _dumps(audit_summary(audit or [], nm))
    if latency is not None:
        props["latency"] = _dumps(latency_summary(latency))
    return {PREFIX + k: v for k, v in props.items()}


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
    (``{}`` when the file has none). With a plan (or a digest), ``digest_ok`` says whether
    ``plan_sha256`` is the sha256 of the stored plan string: False means the plan was changed
    after the export (or the digest is missing).

    Raises:
        FileAccessError: the file cannot be read.
        MetadataError: not an ONNX model, or an ``fxprune.*`` JSON value does not decode.
    """
    path = Path(path)
    raw = {
        p.key[len(PREFIX) :]: p.value
        for p in _load(path).metadata_props
        if p.key.startswith(PREFIX)
    }
    return decode_metadata(raw, path)


def encode_metadata(decoded: dict) -> dict[str, str]:
    """The stored strings (keys without the prefix) of a decoded record: what
    :func:`decode_metadata` reads back (``digest_ok`` is a judgement, not stored)."""
    return {k: str(v) if k in PLAIN else _dumps(v) for k, v in decoded.items() if k != "digest_ok"}


def decode_metadata(raw: dict[str, str], path: str | Path = "") -> dict:
    """Stored entries (key without the prefix -> string) decoded as :func:`read_metadata`
    returns them, with ``digest_ok``; ``path`` names the source in a :class:`MetadataError`."""
    out: dict = {}
    if "plan" in raw or "plan_sha256" in raw:
        out["digest_ok"] = plan_digest(raw.get("plan", "")) == raw.get("plan_sha256")
    for key, value in raw.items():
        if key in PLAIN:
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as e:
            changed = (
                " (its digest does not match)" if key == "plan" and not out["digest_ok"] else ""
            )
            raise MetadataError(
                f"{path}: metadata {PREFIX}{key} is not valid JSON{changed}: {e.msg}"
            ) from e
    rank = {k: i for i, k in enumerate(ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _removed_line(e: dict) -> str:
    if "units_before" in e:
        return f"{e['groups']} groups, {e['units_before']} -> {e['units_kept']} units"
    if "removed" in e:
        shown = ", ".join(e["removed"][:6]) + (" ..." if len(e["removed"]) > 6 else "")
        return f"{len(e['removed'])} of {e.get('blocks_before', '?')} blocks: {shown or '-'}"
    if "n" in e and "m" in e:
        return f"{e['n']}:{e['m']} ({e.get('method', '?')}) on {e.get('layers', '?')} layers"
    return ", ".join(f"{k} {v}" for k, v in e.items())


def describe(meta: dict, path: str | Path = "") -> str:
    """:func:`read_metadata`'s dict as text for a terminal (markdown tables)."""
    name = f"{path}: " if path else ""
    if not meta:
        return (
            f"{name}no fxprune metadata (not exported by fxprune, or by a version before the "
            "hand-off metadata)"
        )
    lines = [f"{name}exported by fxprune {meta.get('version', '?')}"]
    if "digest_ok" in meta:
        digest = str(meta.get("plan_sha256", "missing"))
        lines.append(
            f"plan sha256 {digest[:16]}...: "
            + (
                "matches the stored plan"
                if meta["digest_ok"]
                else "MISMATCH: the plan was changed after the export (or its digest is missing)"
            )
        )
    plan = meta.get("plan")
    if isinstance(plan, dict):
        shapes = "; ".join(
            "None" if i.get("none") else f"{i.get('shape')} {i.get('dtype')}"
            for i in plan.get("inputs", [])
        )
        passes = ", ".join(p.get("name", "?") for p in plan.get("passes", [])) or "none"
        lines.append(f"plan: {plan.get('mode')} capture, passes: {passes}; inputs: {shapes}")
    if meta.get("removed"):
        lines += ["", "| pass | removed |", "|---|---|"]
        lines += [f"| {k} | {_removed_line(e)} |" for k, e in meta["removed"].items()]
    if "plan" not in meta:
        lines.append("no plan: exported without a compile result")
    eq = meta.get("equivalence")
    if eq:
        where = f" in {eq['worst_output']}" if eq.get("worst_output") else ""
        lines += [
            "",
            f"equivalence: {'ok' if eq.get('ok') else 'FAILED'}, max rel err "
            f"{_num(eq.get('max_rel_err'))}{where} (tolerance {_num(eq.get('tolerance'))}), "
            f"{eq.get('dtype')}, {eq.get('inputs_checked')} inputs",
        ]
    au = meta.get("nm_audit")
    if au:
        lines.append(
            f"N:M audit ({au.get('n')}:{au.get('m')}): {'ok' if au.get('ok') else 'FAILED'}, "
            f"{au.get('masked')} masked weights, {au.get('violations')} violations; "
            f"{au.get('nm_layers')}/{au.get('layers_checked')} weights checked keep the pattern"
        )
    lat = meta.get("latency")
    if lat:
        lines += [
            "",
            f"latency: {lat.get('backend')}, threads {lat.get('threads')}; {lat.get('machine')}"
            + (" (noisy: the machine was not quiet)" if lat.get("noisy") else ""),
            "| batch | dense ms | pruned ms | speedup |"
            if lat.get("mode") != "decode"
            else f"| batch | dense ms / step | pruned ms / step | decode speedup "
            f"({lat.get('prompt_len')} prompt + {lat.get('new_tokens')} new tokens) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r.get('batch')} | {_num(r.get('dense_ms'), '.3f')} "
            f"| {_num(r.get('pruned_ms'), '.3f')} | {_num(r.get('speedup'), '.2f')}x |"
            for r in lat.get("batches", [])
        ]
    return "\n".join(lines)


def _num(v, fmt: str = ".2e") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
