"""The hand-off record is trusted only as far as it was checked: every fxprune field of an ONNX
file (and of a genai folder's ``fxprune_handoff.json``) has its sha256; ``fxprune inspect``
exits 1 (plain and ``--json`` alike) when a field was changed, deleted or is not covered, and
when the record says the proof, the N:M audit or the token parity failed; a field of the wrong
JSON type is a one-line error, exit 2."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.cli import main
from fxprune.exporters.genai import HANDOFF, handoff_record, read_handoff
from fxprune.exporters.metadata import (
    MetadataError,
    decode_metadata,
    describe,
    encode_metadata,
    read_metadata,
    write_metadata,
)
from fxprune.exporters.record import JUDGEMENTS, seal

LATENCY = {
    "backend": "onnxruntime",
    "threads": 1,
    "warmup": 1,
    "repeats": 2,
    "machine": "x86_64",
    "rows": [{"batch": 1, "dense_ms": 2.0, "pruned_ms": 1.0, "speedup": 2.0, "verdict": "faster"}],
}
GENAI = {
    "precision": "fp32",
    "execution_provider": "cpu",
    "onnxruntime_genai": "0.18.0",
    "parity": {"prompts": 3, "prompt_len": 12, "new_tokens": 16, "tokens_equal": True},
}
FIELDS = ("version", "plan", "plan_sha256", "removed", "equivalence", "nm_audit", "latency", "io")


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(2, 16)
    res = fxprune.compile(net, x, channels=0.5, sparsity="2:4")
    return res, fxprune.verify.equivalence(net, res, x)


@pytest.fixture(scope="module")
def exported(compiled, tmp_path_factory):
    """A file with every field: plan, removed, the proof, the N:M audit, latency, io."""
    res, eq = compiled
    path = tmp_path_factory.mktemp("trust") / "m.onnx"
    res.export(path, equivalence=eq, latency=LATENCY)
    return path


def _raw(path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key[8:]: p.value for p in model.metadata_props if p.key.startswith("fxprune.")}


def _rewrite(src, dst, edit, reseal=False):
    """A copy of ``src`` whose fxprune fields (no prefix -> stored string) ``edit`` changed;
    ``reseal``: with digests made anew, as if the writer had stored it so."""
    shutil.copy(src, dst)
    raw = _raw(src)
    edit(raw)
    write_metadata(dst, {f"fxprune.{k}": v for k, v in (seal(raw) if reseal else raw).items()})
    return dst


def _json_field(key, change):
    def edit(raw):
        value = json.loads(raw[key])
        change(value)
        raw[key] = json.dumps(value, separators=(",", ":"))

    return edit


def _inspect(path, capsys) -> tuple[int, str, int, dict]:
    """Exit status and text of ``inspect`` and of ``inspect --json``."""
    code = main(["inspect", str(path)])
    text = capsys.readouterr().out
    code_json = main(["inspect", str(path), "--json"])
    return code, text, code_json, json.loads(capsys.readouterr().out)


def test_an_untouched_export_passes_every_check(exported, capsys):
    code, text, code_json, meta = _inspect(exported, capsys)
    assert code == code_json == 0 and meta["digest_ok"] and meta["failures"] == []
    assert set(meta["sha256"]) == set(FIELDS)
    assert "record: each of its 8 fields matches its sha256" in text and "check failed" not in text
    assert "equivalence: ok" in text and "N:M audit (2:4): ok" in text


EDITS = {
    "version": lambda raw: raw.update(version="0.0.1"),
    "plan": _json_field("plan", lambda p: p["passes"][0]["kept"].clear()),
    "plan_sha256": lambda raw: raw.update(plan_sha256="0" * 64),
    "removed": _json_field("removed", lambda r: r["channels"].update(units_kept=1)),
    "equivalence": _json_field("equivalence", lambda e: e.update(inputs_checked=99)),
    "nm_audit": _json_field("nm_audit", lambda a: a.update(masked=a["masked"] + 1)),
    "latency": _json_field("latency", lambda lat: lat["batches"][0].update(speedup=9.9)),
    "io": _json_field("io", lambda io: io["outputs"][0].update(name="logits")),
}


@pytest.mark.parametrize("field", FIELDS)
def test_each_edited_field_fails_the_digest(exported, tmp_path, capsys, field):
    path = _rewrite(exported, tmp_path / "edited.onnx", EDITS[field])
    code, text, code_json, meta = _inspect(path, capsys)
    assert code == code_json == 1 and meta["digest_ok"] is False
    assert field in meta["unverified"]["changed"]
    assert f"check failed: changed after the export (digest mismatch): {field}" in text


def test_an_edited_digest_names_its_field(exported, tmp_path, capsys):
    path = _rewrite(
        exported,
        tmp_path / "d.onnx",
        _json_field("sha256", lambda d: d.update(equivalence="0" * 64)),
    )
    code, _, code_json, meta = _inspect(path, capsys)
    assert code == code_json == 1 and meta["unverified"] == {"changed": ["equivalence"]}


@pytest.mark.parametrize(
    "gone, unverified",
    [
        (["plan", "plan_sha256"], {"deleted": ["plan", "plan_sha256"]}),
        (["equivalence"], {"deleted": ["equivalence"]}),
        (
            ["sha256"],
            {"not_covered": ["version", "removed", "equivalence", "nm_audit", "latency", "io"]},
        ),
        (
            ["plan", "plan_sha256", "sha256"],
            {"not_covered": ["version", "removed", "equivalence", "nm_audit", "latency", "io"]},
        ),
    ],
)
def test_deleted_fields_and_digests_fail(exported, tmp_path, capsys, gone, unverified):
    path = _rewrite(exported, tmp_path / "deleted.onnx", lambda raw: [raw.pop(k) for k in gone])
    code, text, code_json, meta = _inspect(path, capsys)
    assert code == code_json == 1 and meta["unverified"] == unverified
    assert "check failed: " in text


def test_an_added_field_is_not_covered(exported, tmp_path, capsys):
    path = _rewrite(exported, tmp_path / "added.onnx", lambda raw: raw.update(note='"trust me"'))
    code, text, code_json, meta = _inspect(path, capsys)
    assert code == code_json == 1 and meta["unverified"] == {"not_covered": ["note"]}
    assert "not covered by a digest: note" in text


def test_a_record_that_says_the_proof_failed_exits_1(compiled, tmp_path, capsys):
    res, eq = compiled
    failed = {**vars(eq), "ok": False, "max_rel_err": 0.5}
    path = res.export(tmp_path / "failed.onnx", equivalence=failed).path
    code, text, code_json, meta = _inspect(path, capsys)
    assert code == code_json == 1 and meta["digest_ok"]  # intact, and it says FAILED
    assert meta["failures"] == [
        f"the recorded equivalence proof FAILED: max rel err 0.5 (tolerance {eq.tolerance})"
    ]
    assert "equivalence: FAILED" in text


def test_a_record_that_says_the_audit_failed_exits_1(exported, tmp_path, capsys):
    bad = _json_field("nm_audit", lambda a: a.update(violations=2, ok=False))
    path = _rewrite(exported, tmp_path / "audit.onnx", bad, reseal=True)
    code, text, code_json, meta = _inspect(path, capsys)
    assert code == code_json == 1 and meta["digest_ok"]
    assert meta["failures"] == [
        "the recorded N:M audit FAILED: 2 masked weights lost the 2:4 pattern"
    ]
    assert "N:M audit (2:4): FAILED" in text


def test_a_file_from_before_the_per_field_digests_is_read(exported, tmp_path, capsys):
    """Only ``plan_sha256``: the plan still checks, every other field is named uncovered."""
    old = ("version", "plan", "plan_sha256", "removed", "equivalence")
    path = _rewrite(
        exported, tmp_path / "old.onnx", lambda raw: [raw.pop(k) for k in list(raw) if k not in old]
    )
    code, text, code_json, meta = _inspect(path, capsys)
    assert meta["unverified"] == {"not_covered": ["version", "removed", "equivalence"]}
    assert code == code_json == 1 and meta["plan"]["passes"]
    assert "matches the stored plan" in text and "not covered by a digest: version, removed" in text
    edited = _rewrite(path, tmp_path / "old-edited.onnx", EDITS["plan"])
    assert read_metadata(edited)["unverified"]["changed"] == ["plan"]


WRONG_TYPES = [
    ("equivalence", "[1, 2]", "fxprune.equivalence is a JSON array, expected an object"),
    ("removed", '"channels"', "fxprune.removed is a JSON string, expected an object"),
    ("removed", '{"channels": 3}', "fxprune.removed.channels is a JSON number, expected an obj"),
    ("latency", '{"batches": 5}', "fxprune.latency.batches is a JSON number, expected an array"),
    ("latency", '{"batches": [1]}', "fxprune.latency.batches.0 is a JSON number, expected an"),
    ("plan", "[]", "fxprune.plan is a JSON array, expected an object"),
    ("plan", '{"passes": "nm"}', "fxprune.plan.passes is a JSON string, expected an array"),
    ("nm_audit", "true", "fxprune.nm_audit is a JSON boolean, expected an object"),
    ("io", '{"inputs": [null]}', "fxprune.io.inputs.0 is a JSON null, expected an object"),
    ("sha256", "[]", "fxprune.sha256 is a JSON array, expected an object"),
    ("sha256", '{"plan": 5}', "fxprune.sha256.plan is a JSON number, expected a string"),
]


@pytest.mark.parametrize(
    "field, value, words, reseal",
    # resealed: the digest matches, the type is still wrong (sealing sha256 itself rewrites it)
    [
        (*case, reseal)
        for case in WRONG_TYPES
        for reseal in (False, True)
        if not (reseal and case[0] == "sha256")
    ],
)
def test_a_field_of_the_wrong_json_type_is_one_line_exit_2(
    exported, tmp_path, capsys, field, value, words, reseal
):
    path = _rewrite(
        exported, tmp_path / "typed.onnx", lambda raw: raw.update({field: value}), reseal
    )
    with pytest.raises(MetadataError, match=words.replace(".", r"\.")):
        read_metadata(path)
    for flags in ([], ["--json"]):
        assert main(["inspect", str(path), *flags]) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1 and lines[0].startswith("fxprune: error: ")
        assert "typed.onnx: metadata " + words in lines[0]


def test_describe_prints_any_value_inside_the_checked_types():
    meta = decode_metadata(
        seal(
            {
                "version": "x",
                "plan": '{"inputs":[{"shape":7}],"passes":[{"name":[1]}]}',
                "removed": '{"a":{"units_before":1},"b":{"removed":5},"c":{"n":1,"m":2},"d":{}}',
                "equivalence": '{"ok":"yes","max_rel_err":[1]}',
                "latency": '{"batches":[{"batch":{}}]}',
                "io": '{"inputs":[{"shape":3}],"outputs":[{}]}',
                "genai": '{"parity":{"tokens_equal":false}}',
            }
        )
    )
    text = describe(meta)
    assert "equivalence: FAILED" in text and "greedy-token parity: FAILED" in text
    assert len(meta["failures"]) == 2


# --- the genai folder's hand-off record ----------------------------------------------------


@pytest.fixture
def genai_dir(compiled, tmp_path):
    res, eq = compiled
    folder = tmp_path / "genai"
    folder.mkdir()
    record = handoff_record(res, eq, LATENCY, GENAI)
    (folder / HANDOFF).write_text(json.dumps(record, indent=1) + "\n")  # as the exporter does
    return folder


def _record_edit(folder, edit, reseal=False):
    record = json.loads((folder / HANDOFF).read_text())
    edit(record)
    if reseal:
        raw = seal(encode_metadata(record))
        record = {k: v for k, v in decode_metadata(raw).items() if k not in JUDGEMENTS}
    (folder / HANDOFF).write_text(json.dumps(record, indent=1))


def test_the_genai_record_covers_every_field(genai_dir, capsys):
    rec = read_handoff(genai_dir)
    assert rec["digest_ok"] and rec["failures"] == [] and rec["genai"] == GENAI
    assert set(rec["sha256"]) == {
        "version",
        "plan",
        "plan_sha256",
        "removed",
        "equivalence",
        "latency",
        "genai",
    }
    code, text, code_json, _ = _inspect(genai_dir, capsys)
    assert code == code_json == 0 and "greedy-token parity: ok" in text


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r.update(version="0.0.1"), "version"),
        (lambda r: r["removed"]["channels"].update(units_kept=1), "removed"),
        (lambda r: r["equivalence"].update(inputs_checked=99), "equivalence"),
        (lambda r: r["latency"]["batches"][0].update(speedup=9.9), "latency"),
        (lambda r: r["genai"].update(precision="int4"), "genai"),
        (lambda r: r["genai"]["parity"].update(prompts=30), "genai"),
    ],
)
def test_an_edited_genai_record_fails(genai_dir, capsys, edit, field):
    _record_edit(genai_dir, edit)
    code, text, code_json, meta = _inspect(genai_dir, capsys)
    assert code == code_json == 1 and meta["unverified"] == {"changed": [field]}


def test_genai_record_deletions_failures_and_types(genai_dir, capsys):
    _record_edit(genai_dir, lambda r: [r.pop(k) for k in ("plan", "plan_sha256")])
    assert read_handoff(genai_dir)["unverified"] == {"deleted": ["plan", "plan_sha256"]}
    assert main(["inspect", str(genai_dir), "--json"]) == 1
    _record_edit(genai_dir, lambda r: r.pop("sha256"))
    assert read_handoff(genai_dir)["unverified"]["not_covered"] == [
        "version",
        "removed",
        "equivalence",
        "latency",
        "genai",
    ]
    capsys.readouterr()


def test_genai_record_that_says_parity_failed_or_has_wrong_types(genai_dir, capsys):
    _record_edit(genai_dir, lambda r: r["genai"]["parity"].update(tokens_equal=False), True)
    rec = read_handoff(genai_dir)
    assert rec["digest_ok"] and rec["failures"] == [
        "the recorded greedy-token parity FAILED: the decoder's tokens differed"
    ]
    assert main(["inspect", str(genai_dir)]) == main(["inspect", str(genai_dir), "--json"]) == 1
    capsys.readouterr()
    good = (genai_dir / HANDOFF).read_text()
    for edit, words in (
        (lambda r: r.update(version=5), "field version is a JSON number, expected a string"),
        (lambda r: r.update(genai=[]), "field genai is a JSON array, expected an object"),
        (lambda r: r["genai"].update(parity="ok"), "field genai.parity is a JSON string"),
        (lambda r: r["removed"].update(ffn=[]), "field removed.ffn is a JSON array"),
    ):
        (genai_dir / HANDOFF).write_text(good)
        _record_edit(genai_dir, edit)
        for flags in ([], ["--json"]):
            assert main(["inspect", str(genai_dir), *flags]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and HANDOFF in err[0] and words in err[0], err
