"""Smoke test of benchmarks/families_breadth.py: two cheap families (a Hugging Face causal LM and
a timm CNN) through the fxprune side, in this process; the table and the counts are written."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("timm")


def test_two_families_are_exact_on_the_users_class():
    from benchmarks import families_breadth as fb

    rows = [fb.row(name, tools=("fxprune",), timeout=60) for name in ("qwen2", "timm_resnet18")]
    for r in rows:
        fx = r["fxprune"]
        assert fx["outcome"] == "exact", (r["family"], fx)
        assert fx["users_class"] and fx["params_after"] < fx["params_before"]
        assert all(p["ok"] for p in fx["proof"].values()) and set(fx["proof"]) == {
            "module",
            "model",
        }
    assert rows[0]["fxprune"]["request"]["heads"] == 0.5
    assert rows[1]["fxprune"]["request"] == {"channels": 0.5}
    table = fb.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| qwen2 | transformers | exact |" in table
    assert "fxprune: exact 2 of 2" in fb.summary(rows)


def test_a_missing_class_is_reported_not_raised(monkeypatch):
    from benchmarks import families_breadth as fb

    monkeypatch.setitem(fb.HF, "nope", ("lm", "NopeConfig", "NopeForCausalLM", fb.LM))
    r = fb.row("nope", tools=("fxprune",))
    assert r["missing"].startswith("not in this transformers")
    assert "not in this transformers" in fb.markdown([r])
