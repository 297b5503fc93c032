"""Checkpoints that detect corruption: every stored tensor (plain, bitmask, CSR), the plan and the
source carry a sha256 digest that ``fxprune.load`` checks; a compressed entry cannot make a small
file allocate more than the model's own weight; killed saves' temporary files are cleaned up; and
``load`` returns the model in eval mode."""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.checkpoint import DIGESTS, expand, seal
from fxprune.errors import CheckpointError

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@pytest.fixture(scope="module")
def sparse():
    """A small MLP with 80 % of each weight zeroed (every weight compresses)."""
    model = _mlp()
    return model, fxprune.compile(model, X, unstructured=0.8)


def _payloads(path) -> list[tuple[int, int]]:
    """(file offset, size) of each tensor storage record in a ``torch.save`` zip archive."""
    out = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if not re.search(r"/data/\d+$", info.filename):
                continue
            assert info.compress_type == zipfile.ZIP_STORED
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
            out.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    return out


def _resave(ckpt: dict, path, reseal: bool = True) -> None:
    """Write an edited checkpoint, its digests recomputed (a forger's file) unless not asked."""
    if reseal:
        ckpt[DIGESTS] = seal(ckpt)
    torch.save(ckpt, path)


# ---- digests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", [None, "bitmask", "csr"])
def test_every_flipped_byte_that_changes_a_weight_is_caught(sparse, how, tmp_path):
    model, res = sparse
    path = tmp_path / "c.pt"
    res.save(path, compress=how)
    ckpt = torch.load(path, weights_only=True)
    assert bool(ckpt.get("compressed")) == (how is not None)  # the form under test is stored
    data, records = path.read_bytes(), _payloads(path)
    want = res.module.state_dict()
    rng = random.Random(0)
    caught = 0
    for trial in range(45):
        offset, size = records[trial % len(records)]  # every record, the small ones too
        pos = offset + rng.randrange(size)
        bad = bytearray(data)
        bad[pos] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(bad))
        try:
            got = fxprune.load(path, model).module.state_dict()
        except CheckpointError as e:
            assert "does not match its sha256 digest" in str(e) or "corrupt" in str(e)
            caught += 1
            continue
        changed = [k for k in want if not torch.equal(want[k], got[k])]
        assert not changed, f"byte {pos} flipped: {changed} changed and load accepted it"
    assert caught >= 40  # nearly every flip lands on a weight's bytes


def test_a_bitmask_byte_inverted_with_the_same_bit_count_is_caught(tmp_path):
    model = _mlp()
    res = fxprune.compile(model, X, unstructured=0.5)
    path = tmp_path / "c.pt"
    res.save(path, compress="bitmask")
    name, entry = next(iter(torch.load(path, weights_only=True)["compressed"].items()))
    bits = entry["bitmask"].numpy().tobytes()
    j = next(i for i, b in enumerate(bits) if bin(b).count("1") == 4)  # ~b has 4 set bits too
    data = bytearray(path.read_bytes())
    offset = next(o for o, n in _payloads(path) if bytes(data[o : o + n]) == bits)
    data[offset + j] ^= 0xFF
    path.write_bytes(bytes(data))
    edited = torch.load(path, weights_only=True)["compressed"][name]
    assert int(np.unpackbits(edited["bitmask"].numpy()).sum()) == len(edited["values"])
    with pytest.raises(CheckpointError, match=rf"compressed weight '{name}' does not match"):
        fxprune.load(path, model)


def test_an_edited_plan_or_source_is_named(sparse, tmp_path):
    model, res = sparse
    path = tmp_path / "c.pt"
    res.save(path, source={"model": "factory.py:build", "seed": 0})
    ckpt = torch.load(path, weights_only=True)
    ckpt["plan"]["config"]["allow_approximate"] = True
    _resave(ckpt, tmp_path / "plan.pt", reseal=False)
    with pytest.raises(CheckpointError, match="plan.pt: the plan does not match its sha256"):
        fxprune.load(tmp_path / "plan.pt", model)
    ckpt = torch.load(path, weights_only=True)
    ckpt["source"]["model"] = "other.py:build"
    _resave(ckpt, tmp_path / "source.pt", reseal=False)
    with pytest.raises(CheckpointError, match="the source does not match its sha256"):
        fxprune.load(tmp_path / "source.pt", model)


def test_a_tensor_added_or_removed_after_the_save_is_named(sparse, tmp_path):
    model, res = sparse
    path = tmp_path / "c.pt"
    res.save(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["extra"] = torch.zeros(2)
    _resave(ckpt, path, reseal=False)
    with pytest.raises(CheckpointError, match="tensor 'extra' has no digest in 'state_dict'"):
        fxprune.load(path, model)
    del ckpt["state_dict"]["extra"], ckpt["state_dict"]["0.bias"]
    _resave(ckpt, path, reseal=False)
    with pytest.raises(CheckpointError, match="tensor '0.bias' is missing in 'state_dict'"):
        fxprune.load(path, model)
    ckpt[DIGESTS] = "0" * 64
    _resave(ckpt, path, reseal=False)
    with pytest.raises(CheckpointError, match="digest record .* is malformed"):
        fxprune.load(path, model)


def test_a_checkpoint_from_before_digests_loads_with_a_warning(sparse, tmp_path):
    model, res = sparse
    path = tmp_path / "old.pt"
    res.save(path, compress="csr")
    ckpt = torch.load(path, weights_only=True)
    del ckpt[DIGESTS]
    torch.save(ckpt, path)
    with pytest.warns(UserWarning, match=r"old.pt holds no digests .* save it again"):
        loaded = fxprune.load(path, model)
    want, got = res.module.state_dict(), loaded.module.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_digests_cover_dtype_shape_and_every_byte():
    from fxprune.checkpoint import sha256_of

    t = torch.arange(12, dtype=torch.float32)
    assert sha256_of(t) == sha256_of(t.clone())
    assert sha256_of(t) != sha256_of(t.reshape(3, 4))  # same bytes, another shape
    assert sha256_of(t) != sha256_of(t.view(torch.int32))  # same bytes, another dtype
    u = t.clone()
    u.view(torch.uint8)[-1] ^= 1
    assert sha256_of(t) != sha256_of(u)
    assert sha256_of(t.to(torch.bfloat16)) != sha256_of(t.to(torch.float16))
    assert sha256_of(t[::2]) == sha256_of(t[::2].contiguous())  # a view hashes its values
    assert sha256_of({"a": 1}) != sha256_of({"a": "1"}) != sha256_of({"a": [1]})


# ---- compressed entries a file declares --------------------------------------------------------


@pytest.fixture
def no_big_allocations(monkeypatch):
    """Fail the test if anything asks for a dense buffer of more than 10M elements."""
    limit = 10_000_000
    zeros, unpack, csr = torch.zeros, np.unpackbits, torch.sparse_csr_tensor

    def guarded_zeros(*size, **kw):
        n = int(np.prod(size[0] if len(size) == 1 and not isinstance(size[0], int) else size))
        assert n <= limit, f"torch.zeros of {n} elements"
        return zeros(*size, **kw)

    def guarded_unpack(a, *args, count=None, **kw):
        assert count is None or count <= limit, f"unpackbits of {count} bits"
        return unpack(a, *args, count=count, **kw)

    def guarded_csr(crow, col, values, size, **kw):
        assert int(np.prod(size)) <= limit, f"a sparse CSR tensor of size {size}"
        return csr(crow, col, values, size, **kw)

    monkeypatch.setattr(torch, "zeros", guarded_zeros)
    monkeypatch.setattr(np, "unpackbits", guarded_unpack)
    monkeypatch.setattr(torch, "sparse_csr_tensor", guarded_csr)


@pytest.mark.parametrize("how", ["bitmask", "csr"])
def test_a_small_file_declaring_a_huge_shape_is_refused_before_allocating(
    sparse, how, tmp_path, no_big_allocations
):
    model, res = sparse
    path = tmp_path / "c.pt"
    res.save(path, compress=how)
    ckpt = torch.load(path, weights_only=True)
    ckpt["compressed"]["0.weight"]["shape"] = [40000, 20000]
    _resave(ckpt, path)  # digests recomputed: only the size check stands in the way
    assert path.stat().st_size < 16_000
    with pytest.raises(
        CheckpointError,
        match=r"'0.weight' is corrupt \(it declares a float32 \[40000, 20000\] weight, "
        r"the model's is float32 \[32, 16\]\)",
    ):
        fxprune.load(path, model)
    entry = ckpt["compressed"]["0.weight"]  # without the model: the bytes present bound it
    with pytest.raises(ValueError, match="bitmask|row pointers"):
        expand(entry)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda c: torch.zeros(3), "is a Tensor, not a compressed entry"),
        (lambda c: {**c, "shape": "32x16"}, "its shape is '32x16', not a list of sizes"),
        (lambda c: {**c, "bitmask": c["bitmask"][:-1]}, "holds a 63-byte bitmask"),
        (lambda c: {**c, "bitmask": c["bitmask"].float()}, "'bitmask' is not a 1-D uint8"),
        (lambda c: {**c, "values": c["values"][:-1]}, r"marks \d+ non-zeros but it holds"),
        (lambda c: {"values": c["values"], "shape": c["shape"]}, "neither a bitmask nor CSR"),
    ],
)
def test_a_malformed_compressed_entry_is_a_checkpoint_error(sparse, tmp_path, damage, words):
    model, res = sparse
    path = tmp_path / "c.pt"
    res.save(path, compress="bitmask")
    ckpt = torch.load(path, weights_only=True)
    ckpt["compressed"]["0.weight"] = damage(ckpt["compressed"]["0.weight"])
    _resave(ckpt, path)
    with pytest.raises(
        CheckpointError, match=rf"compressed weight '0.weight' is corrupt .*{words}"
    ):
        fxprune.load(path, model)


def test_a_csr_entry_with_the_wrong_row_count_is_refused(sparse, tmp_path):
    model, res = sparse
    path = tmp_path / "c.pt"
    res.save(path, compress="csr")
    ckpt = torch.load(path, weights_only=True)
    entry = ckpt["compressed"]["2.weight"]
    entry["crow"] = entry["crow"][:-2]
    _resave(ckpt, path)
    with pytest.raises(CheckpointError, match=r"'2.weight' is corrupt .*declares 8 rows"):
        fxprune.load(path, model)


# ---- what killed saves leave -------------------------------------------------------------------


def test_temporary_files_of_killed_saves_are_removed(sparse, tmp_path):
    _, res = sparse
    path = tmp_path / "c.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = {
        "dead": tmp_path / f".c.pt.{dead.pid}.0123abcd.tmp",  # its process is gone
        "old": tmp_path / f".c.pt.{os.getppid()}.89abcdef.tmp",  # alive, untouched for a day
        "live": tmp_path / f".c.pt.{os.getpid()}.deadbeef.tmp",  # a save running now
        "other": tmp_path / f".d.pt.{dead.pid}.0123abcd.tmp",  # another checkpoint's
        "user": tmp_path / ".c.pt.notes",
    }
    for f in left.values():
        f.write_bytes(b"half a checkpoint")
    day_ago = time.time() - 24 * 3600
    os.utime(left["old"], (day_ago, day_ago))
    res.save(path)
    assert {k for k, f in left.items() if f.exists()} == {"live", "other", "user"}
    assert fxprune.load(path, _mlp()).plan.passes


# ---- the mode load returns ---------------------------------------------------------------------


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


def test_load_returns_eval_mode_whatever_mode_the_model_is_in(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    res = fxprune.compile(BNNet().eval(), x, channels=0.5)
    res.save(tmp_path / "c.pt")
    fresh = BNNet()  # a freshly built model is in train mode
    assert fresh.training
    loaded = fxprune.load(tmp_path / "c.pt", fresh)
    for m in (loaded.module, loaded.model):
        assert not any(sub.training for sub in m.modules())
    stats = loaded.model.bn.running_mean.clone()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), res.model(x), rtol=0, atol=0)
    assert torch.equal(loaded.model.bn.running_mean, stats)  # BN statistics did not move
