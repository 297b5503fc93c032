"""The hand-off record an export carries (the ``fxprune.*`` metadata of an ONNX file, the
``fxprune_handoff.json`` of a genai folder) as stored strings and back, and what makes it
trustworthy: a sha256 of every field, JSON type checks, and the failures it records.

Every field is stored as a string (``version`` and the digests as they are, the others as
compact strict JSON). ``sha256`` (:func:`seal`) is a JSON object: field name -> sha256 (hex) of
the UTF-8 bytes of that field's stored string, for every other field. Reading
(:func:`decode_metadata`) recomputes them and names each field that was **changed** (its digest
differs), **deleted** (its digest is there, the field is not) or is **not covered** (no digest
for it: a record written before every field had one keeps only ``plan_sha256``, which still
covers the plan, or a record whose ``sha256`` was removed). ``digest_ok`` is True only when no
field is any of these.

``failures`` lists, one line each, what a reader must not trust: the digest's findings, and a
record that says the equivalence proof or the N:M audit did not pass, or (genai) that the tokens
differed. ``fxprune inspect`` exits 1 when it is not empty. A field of the wrong JSON type (an
array where an object belongs, a number where a string does) is a :class:`MetadataError` naming
the field: the record cannot be read, whatever its digest says.
"""

from __future__ import annotations

import hashlib
import json
import math

from fxprune.errors import ExportError

PREFIX = "fxprune."
PLAIN = ("version", "plan_sha256")  # stored as plain strings; every other key is JSON
DIGESTS = "sha256"  # the field holding every other field's digest
JUDGEMENTS = ("digest_ok", "unverified", "failures")  # made when reading, never stored
# the order decode_metadata returns the keys in (any other key after them, by name)
ORDER = (
    "version",
    "digest_ok",
    "failures",
    "unverified",
    "plan",
    "plan_sha256",
    "removed",
    "equivalence",
    "nm_audit",
    "latency",
    "io",
    "genai",
    DIGESTS,
)
# JSON types the reader relies on: field -> its type, and (field, member) -> the member's type
# ("object*": an object whose every value is an object, "array*": an array of objects)
TYPES = {
    "plan": "object",
    "removed": "object*",
    "equivalence": "object",
    "nm_audit": "object",
    "latency": "object",
    "io": "object",
    "genai": "object",
    DIGESTS: "object",
}
MEMBERS = {
    ("plan", "inputs"): "array*",
    ("plan", "passes"): "array*",
    ("latency", "batches"): "array*",
    ("io", "inputs"): "array*",
    ("io", "outputs"): "array*",
    ("genai", "parity"): "object",
}


class MetadataError(ExportError):
    """An ``.onnx`` file is not an ONNX model, or its fxprune metadata (a genai folder's hand-off
    record) is not valid JSON or holds a field of the wrong JSON type; the message names the
    file and the field."""


def digest(stored: str) -> str:
    """sha256 (hex) of the UTF-8 bytes of a stored field string."""
    return hashlib.sha256(stored.encode("utf-8")).hexdigest()


def strict(v):
    """``v`` with non-finite floats as strings and numpy scalars as numbers (strict JSON)."""
    if isinstance(v, dict):
        return {str(k): strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict(x) for x in v]
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        return strict(v.tolist())  # numpy / torch scalars and arrays
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def compact(v) -> str:
    """``v`` as the compact strict JSON a field is stored as."""
    return json.dumps(strict(v), separators=(",", ":"), allow_nan=False)


def seal(raw: dict[str, str]) -> dict[str, str]:
    """``raw`` (field -> stored string, no prefix) with :data:`DIGESTS` added (or replaced)."""
    fields = {k: v for k, v in raw.items() if k != DIGESTS}
    return {**fields, DIGESTS: compact({k: digest(v) for k, v in fields.items()})}


def encode_metadata(decoded: dict, path="") -> dict[str, str]:
    """The stored strings (keys without the prefix) of a decoded record: what
    :func:`decode_metadata` reads back. The judgements (``digest_ok``, ...) are not stored; a
    plain field that is not a string is a :class:`MetadataError`."""
    out = {}
    for k, v in decoded.items():
        if k in JUDGEMENTS:
            continue
        if k in PLAIN and not isinstance(v, str):
            raise MetadataError(f"{path}: field {k} is a JSON {_kind(v)}, expected a string")
        out[k] = v if k in PLAIN else compact(v)
    return out


def decode_metadata(raw: dict[str, str], path="", label: str = "metadata " + PREFIX) -> dict:
    """Stored entries (key without the prefix -> string) decoded, with the judgements
    ``digest_ok``, ``unverified`` (only when the digest fails: the ``changed`` / ``deleted`` /
    ``not_covered`` fields) and ``failures`` (see the module docstring); ``{}`` for no entries.

    Raises:
        MetadataError: a field is not valid JSON or has the wrong JSON type; ``path`` names the
            source, ``label`` + the key the field (``metadata fxprune.plan``, ``field plan``).
    """
    if not raw:
        return {}
    unverified = _verify(raw, path, label)
    out: dict = {}
    for key, value in raw.items():
        if key in PLAIN:
            out[key] = value
            continue
        changed = " (its digest does not match)" if key in unverified.get("changed", ()) else ""
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as e:
            raise MetadataError(f"{path}: {label}{key} is not valid JSON{changed}: {e.msg}") from e
        _check_types(key, out[key], f"{path}: {label}", changed)
    out["digest_ok"] = not unverified
    if unverified:
        out["unverified"] = unverified
    out["failures"] = _digest_failures(unverified, out.get("version")) + recorded_failures(out)
    rank = {k: i for i, k in enumerate(ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _verify(raw: dict[str, str], path, label: str) -> dict[str, list[str]]:
    """The fields changed, deleted or not covered (only the non-empty lists)."""
    fields = [k for k in raw if k != DIGESTS]
    if DIGESTS in raw:
        try:
            sums = json.loads(raw[DIGESTS])
        except json.JSONDecodeError as e:
            raise MetadataError(f"{path}: {label}{DIGESTS} is not valid JSON: {e.msg}") from e
        _check_types(DIGESTS, sums, f"{path}: {label}", "")
        for k, v in sums.items():
            if not isinstance(v, str):
                raise MetadataError(
                    f"{path}: {label}{DIGESTS}.{k} is a JSON {_kind(v)}, expected a string"
                )
    else:  # a record older than the per-field digests: plan_sha256 covers the plan alone
        sums = {k: digest(raw[k]) for k in ("plan_sha256",) if k in raw}
        if "plan_sha256" in raw:
            sums["plan"] = raw["plan_sha256"]
    found = {
        "changed": [k for k in fields if k in sums and digest(raw[k]) != sums[k]],
        "deleted": [k for k in sums if k not in raw],
        "not_covered": [k for k in fields if k not in sums],
    }
    if "plan" in raw and "plan_sha256" in raw and digest(raw["plan"]) != raw["plan_sha256"]:
        found["changed"] += [] if "plan" in found["changed"] else ["plan"]
    if "plan_sha256" in raw and "plan" not in raw and "plan" not in found["deleted"]:
        found["deleted"].append("plan")
    return {k: v for k, v in found.items() if v}


def _digest_failures(unverified: dict[str, list[str]], version) -> list[str]:
    out = []
    if unverified.get("changed"):
        out.append(
            f"changed after the export (digest mismatch): {', '.join(unverified['changed'])}"
        )
    if unverified.get("deleted"):
        out.append(f"deleted after the export: {', '.join(unverified['deleted'])}")
    if unverified.get("not_covered"):
        out.append(
            f"not covered by a digest: {', '.join(unverified['not_covered'])} (written by "
            f"fxprune {version or '?'} before every field had a digest, or the digest was "
            "removed: re-export to cover them)"
        )
    return out


def recorded_failures(meta: dict) -> list[str]:
    """What the record itself says did not pass: the equivalence proof, the N:M audit, the
    genai token parity (a check whose ``ok`` is anything but true counts as failed)."""
    out = []
    eq = meta.get("equivalence")
    if eq is not None and eq.get("ok") is not True:
        out.append(
            f"the recorded equivalence proof FAILED: max rel err {eq.get('max_rel_err')} "
            f"(tolerance {eq.get('tolerance')})"
        )
    au = meta.get("nm_audit")
    if au is not None and au.get("ok") is not True:
        out.append(
            f"the recorded N:M audit FAILED: {au.get('violations')} masked weights lost the "
            f"{au.get('n')}:{au.get('m')} pattern"
        )
    parity = (meta.get("genai") or {}).get("parity")
    if parity is not None and parity.get("tokens_equal") is not True:
        out.append("the recorded greedy-token parity FAILED: the decoder's tokens differed")
    return out


def _check_types(key: str, value, source: str, changed: str) -> None:
    """``source``: the path and label that prefix the field in a message."""
    want = TYPES.get(key)
    if want is not None:
        _expect(value, want, f"{source}{key}", changed)
    if isinstance(value, dict):
        for (field, member), kind in MEMBERS.items():
            if field == key and member in value:
                _expect(value[member], kind, f"{source}{key}.{member}", changed)


def _expect(value, kind: str, where: str, changed: str) -> None:
    base = kind.rstrip("*")
    if not isinstance(value, dict if base == "object" else list):
        raise _wrong_type(where, value, base, changed)
    if kind.endswith("*"):  # every member an object
        for k, v in value.items() if base == "object" else enumerate(value):
            if not isinstance(v, dict):
                raise _wrong_type(f"{where}.{k}", v, "object", changed)


def _wrong_type(where: str, value, want: str, changed: str) -> MetadataError:
    return MetadataError(f"{where} is a JSON {_kind(value)}, expected an {want}{changed}")


def _kind(v) -> str:
    if isinstance(v, bool):
        return "boolean"
    if v is None:
        return "null"
    return {dict: "object", list: "array", str: "string"}.get(type(v), "number")
