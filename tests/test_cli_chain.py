"""The command-line chain ``prune --save`` -> ``export`` -> ``verify`` (issue #24): the proof
``prune`` ran is stored in the checkpoint, covered by its digests, and reused by ``export`` /
``verify`` only where it proved the very model they rebuild; ``--reprove`` runs it again; a
stored failing proof stays a failure; the checkpoint is read once per command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.checkpoint import DIGESTS, seal
from fxprune.cli import main
from fxprune.errors import CheckpointError
from tests.test_cli import NET

VERIFY = ["--backend", "torch", "--repeats", "2", "--warmup", "0"]  # the example's batch kept


@pytest.fixture
def net(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET)
    return "net.py:build"


@pytest.fixture
def proofs(monkeypatch):
    """Every equivalence proof the CLI runs, counted (the real proof still runs)."""
    real, calls = fxprune.verify.equivalence, []

    def counted(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(fxprune.verify, "equivalence", counted)
    return calls


@pytest.fixture
def saved(net, capsys):
    """``ck.pt``, pruned from the factory file with the proof stored."""
    assert main(["prune", net, "--trust", "--ignore", "fc", "--save", "ck.pt"]) == 0
    capsys.readouterr()
    return "ck.pt"


def _resave(path, edit, reseal: bool = False) -> None:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    if reseal:  # a writer that recomputes the digests
        ckpt[DIGESTS] = seal(ckpt)
    torch.save(ckpt, path)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fxprune: error: "), err
    return err[-1]


def test_export_and_verify_reuse_the_stored_proof(saved, proofs, capsys):
    stored = torch.load(saved, weights_only=True)["proof"]
    assert stored["report"]["ok"] and stored["source"]["model"].endswith("net.py:build")

    assert main(["export", saved, "--trust", "-o", "m.onnx"]) == 0
    out = capsys.readouterr()
    assert not proofs and Path("m.onnx").exists()
    assert "equivalence check (the proof stored in ck.pt, reused): equivalent" in out.out
    assert "reusing the equivalence proof stored in ck.pt (max_rel_err" in out.err

    assert main(["verify", saved, "--trust", *VERIFY, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert not proofs and doc["proof_reused_from"] == "ck.pt"
    assert doc["equivalence"] == stored["report"] and not doc["failed"]

    assert main(["verify", saved, "--trust", *VERIFY]) == 0
    out = capsys.readouterr()
    assert not proofs and "the proof stored in ck.pt, reused" in out.out
    assert f"max_rel_err {stored['report']['max_rel_err']:.2e}" in out.err


def test_reprove_runs_the_proof_again(saved, proofs, capsys):
    assert main(["export", saved, "--trust", "-o", "m.onnx", "--reprove", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(proofs) == 1 and doc["proof_reused_from"] is None and doc["equivalence"]["ok"]
    assert main(["verify", saved, "--trust", *VERIFY, "--reprove"]) == 0
    out = capsys.readouterr().out
    assert len(proofs) == 2 and "reused" not in out and "equivalence check: equivalent" in out


def test_reprove_without_a_checkpoint_is_refused(net, proofs, capsys):
    """A source that is not a checkpoint has no stored proof: --reprove would change nothing."""
    rc = main(["export", net, "--trust", "--ignore", "fc", "-o", "m.onnx", "--reprove"])
    assert rc == 2 and "--reprove: there is no stored proof" in _error(capsys)
    assert not Path("m.onnx").exists()


def test_an_edited_stored_proof_is_a_checkpoint_error(saved, proofs, capsys):
    from fxprune.models import load_model

    def passing(ckpt):
        ckpt["proof"]["report"]["max_rel_err"] = 0.0

    _resave(saved, passing)
    assert main(["export", saved, "--trust", "-o", "m.onnx"]) == 2
    assert "ck.pt: the proof does not match its sha256 digest" in _error(capsys)
    model, _ = load_model(f"{Path('net.py').resolve()}:build", trust=True)
    with pytest.raises(CheckpointError, match="the proof does not match its sha256 digest"):
        fxprune.load(saved, model)

    # a proof slipped into a file whose digest record has no entry for one
    def unsealed(ckpt):
        ckpt["proof"]["report"]["max_rel_err"] = 0.0
        del ckpt[DIGESTS]["proof"]

    assert main(["prune", "net.py:build", "--trust", "--ignore", "fc", "--save", "b.pt"]) == 0
    _resave("b.pt", unsealed)
    assert main(["verify", "b.pt", "--trust", *VERIFY]) == 2
    assert "b.pt: the proof does not match its sha256 digest" in _error(capsys)
    assert len(proofs) == 1 and not Path("m.onnx").exists()  # the prune's proof only


def test_a_stored_proof_that_claims_more_than_its_numbers_is_refused(saved, proofs, capsys):
    def claims(ckpt):  # resealed: the digests hold, the record contradicts itself
        ckpt["proof"]["report"].update(ok=True, max_rel_err=0.5)

    _resave(saved, claims, reseal=True)
    assert main(["export", saved, "--trust", "-o", "m.onnx"]) == 2
    assert "says equivalent with max_rel_err 5.00e-01, over its tolerance" in _error(capsys)

    def malformed(ckpt):
        ckpt["proof"]["report"]["ok"] = "yes"

    _resave(saved, malformed, reseal=True)
    assert main(["verify", saved, "--trust", *VERIFY]) == 2
    assert "its stored proof's report is malformed (ok is 'yes', not bool)" in _error(capsys)
    assert not proofs and not Path("m.onnx").exists()


def test_a_stored_failing_proof_is_never_reported_as_passing(net, monkeypatch, capsys):
    real = fxprune.verify.equivalence

    def failing(*args, **kw):
        rep = real(*args, **kw)
        return dataclasses.replace(rep, ok=False, message="NOT equivalent: (made to fail)")

    monkeypatch.setattr(fxprune.verify, "equivalence", failing)
    assert main(["prune", net, "--trust", "--ignore", "fc", "--save", "ck.pt"]) == 1
    assert torch.load("ck.pt", weights_only=True)["proof"]["report"]["ok"] is False
    monkeypatch.setattr(fxprune.verify, "equivalence", real)  # a new proof would pass
    capsys.readouterr()

    assert main(["export", "ck.pt", "--trust", "-o", "m.onnx"]) == 1
    out = capsys.readouterr().out
    assert "reused): NOT equivalent: (made to fail)" in out and "not exported" in out
    assert not Path("m.onnx").exists()
    assert main(["verify", "ck.pt", "--trust", *VERIFY, "--export", "v.onnx"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: the equivalence proof failed" in out and not Path("v.onnx").exists()
    assert main(["verify", "ck.pt", "--trust", *VERIFY, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["equivalence"]["ok"] is False and doc["failed"]
    # proving again is what the user asks for with --reprove
    assert main(["export", "ck.pt", "--trust", "-o", "m.onnx", "--reprove"]) == 0


def test_changed_source_weights_are_proved_again(saved, proofs, capsys):
    # the same factory, one weight changed (the example input drawn as before)
    Path("net.py").write_text(
        NET.replace("return Net().eval(), torch.randn(2, 3, 16, 16)", "m = Net().eval()\n")
        + "    x = torch.randn(2, 3, 16, 16)\n"
        + "    m.fc.bias.data.add_(1.0)\n"
        + "    return m, x\n"
    )
    assert main(["export", saved, "--trust", "-o", "m.onnx"]) == 1
    out = capsys.readouterr()
    why = [ln for ln in out.err.splitlines() if "proving again" in ln]
    assert why == [
        f"fxprune: ck.pt: proving again: the dense weights {Path('net.py').resolve()}:build "
        "(seed 0) builds differ from those it was proved against"
    ]
    assert len(proofs) == 1 and "NOT equivalent" in out.out and not Path("m.onnx").exists()


def test_another_source_or_example_is_proved_again(saved, proofs, capsys):
    Path("net2.py").write_text(NET)  # the same model under another name: another source
    args = ["export", "net2.py:build", "--trust", "--load", saved, "-o", "m.onnx"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert len(proofs) == 1 and "ck.pt: proving again: it was proved against" in err
    assert f"not {Path('net2.py').resolve()}:build (seed 0)" in err

    assert main(["export", "net.py:build", "--trust", "--load", saved, "-o", "m.onnx"]) == 0
    assert len(proofs) == 1 and "reusing" in capsys.readouterr().err  # the source it proved

    assert main(["verify", saved, "--trust", *VERIFY, "--batch", "3"]) == 0
    err = capsys.readouterr().err
    assert len(proofs) == 2
    assert "the example input differs from the one it proved (of shape [3, 3, 16, 16]" in err


def test_a_checkpoint_without_a_stored_proof_is_proved_as_before(saved, proofs, capsys):
    def before(ckpt):  # as an fxprune before stored proofs wrote it
        del ckpt["proof"], ckpt[DIGESTS]["proof"]

    _resave(saved, before)
    assert main(["export", saved, "--trust", "-o", "m.onnx"]) == 0
    out = capsys.readouterr()
    assert len(proofs) == 1 and "equivalence check: equivalent" in out.out
    assert "ck.pt: proving again: it stores no equivalence proof" in out.err


def test_each_command_reads_the_checkpoint_once(saved, monkeypatch, capsys):
    import fxprune.checkpoint as checkpoint

    real, reads = checkpoint.read_checkpoint, []

    def counted(path, *args, **kw):
        reads.append(str(path))
        return real(path, *args, **kw)

    for mod in ("fxprune.checkpoint", "fxprune.plan", "fxprune.replay", "fxprune.cli_inputs"):
        if hasattr(__import__(mod, fromlist=["_"]), "read_checkpoint"):
            monkeypatch.setattr(f"{mod}.read_checkpoint", counted)
    assert main(["export", saved, "--trust", "-o", "m.onnx"]) == 0
    assert reads == ["ck.pt"]


def test_verify_export_copies_the_onnx_file_it_timed(saved, monkeypatch, capsys):
    import fxprune.exporters.onnx as onnx_exporter

    real, writes = onnx_exporter.write_onnx, []

    def counted(module, args, dest, *rest, **kw):
        writes.append(Path(dest).name)
        return real(module, args, dest, *rest, **kw)

    monkeypatch.setattr(onnx_exporter, "write_onnx", counted)
    timing = ["--backend", "onnxruntime", "--repeats", "2", "--warmup", "0"]
    assert main(["verify", saved, "--trust", *timing, "--export", "v.onnx"]) == 0
    assert sorted(writes) == ["dense.onnx", "pruned.onnx"]  # no third capture for --export
    assert "ONNX Runtime parity" in capsys.readouterr().out  # the copy is checked as before
    assert main(["inspect", "v.onnx"]) == 0
    assert "equivalence: ok" in capsys.readouterr().out

    # an example unlike the plan's (which the export traces on): exported on its own
    writes.clear()
    assert main(["verify", saved, "--trust", *timing, "--batch", "3", "--export", "w.onnx"]) == 0
    assert sorted(writes) == ["dense.onnx", "pruned.onnx", "w.onnx"]
