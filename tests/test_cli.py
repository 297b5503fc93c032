"""The command line end to end, in process: prune -> save -> export -> verify -> estimate ->
inspect, model sources (factory file, checkpoint, hf:), the HTML report, and errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.cli import main
from tests.transformer_models import encoder_config

NET = """
import torch, torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.b(torch.relu(self.bn(self.a(x))))
        return self.fc(x.mean((2, 3)))

def build():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 3, 16, 16)
"""


@pytest.fixture
def net(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET)
    return "net.py:build"


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_prune_save_export_verify_estimate_inspect(net, tmp_path, capsys):
    args = ["prune", net, "--trust", "--ignore", "fc", "--save", "ck.pt", "--report", "p.html"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "equivalent" in out and "report: p.html" in out
    ck = torch.load("ck.pt", weights_only=True)
    assert ck["source"] == {"model": f"{tmp_path / 'net.py'}:build", "seed": 0}

    # the checkpoint names its source: every command opens it without the model; a factory
    # file source runs Python, so it needs --trust
    assert main(["export", "ck.pt", "-o", "out/m.onnx"]) == 2
    assert "pass --trust" in capsys.readouterr().err
    assert main(["export", "ck.pt", "-o", "out/m.onnx", "--json", "--trust"]) == 0
    exp = _json(capsys)
    assert exp["equivalence"]["ok"] and Path("out/m.onnx").exists()
    assert exp["export"]["ort_max_rel_err"] < 1e-4

    args = ["verify", "ck.pt", "--trust", "--backend", "torch", "--batch", "1", "--repeats", "4"]
    assert main(args + ["--json", "--report", "v.html"]) == 0
    ver = _json(capsys)
    assert ver["equivalence"]["ok"] and ver["rows"][0]["mac_ratio"] < 0.6
    page = Path("v.html").read_text()
    for part in ("<svg", "Latency, torch", "Estimated vs measured", "Kept channels"):
        assert part in page, part

    assert main(["estimate", "ck.pt", "--trust", "--hardware", "H100", "cpu", "--json"]) == 0
    est = _json(capsys)
    names = [s["name"] for s in est["scenarios"]]
    assert names[:3] == ["dense", "unstructured 90%", "2:4"] and names[3].startswith("structured")
    assert est["scenarios"][1]["speedup"]["H100"]["8"] == 1.0

    assert main(["inspect", net, "--trust", "--json"]) == 0
    ins = _json(capsys)
    residual = [g for g in ins["groups"] if {"stem", "b"} <= set(g["layers"])]
    assert residual and residual[0]["prunable"] == 16
    assert any(b["node"] == "output" for b in ins["barriers"])
    assert main(["inspect", net, "--trust"]) == 0
    assert "| group | kind |" in capsys.readouterr().out


def test_estimate_with_measurement_prints_both(net, capsys):
    args = ["estimate", net, "--trust", "--ignore", "fc", "--measure", "--backend", "torch"]
    assert main(args + ["--batch", "1", "--repeats", "4", "--hardware", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| estimated | measured |" in out and "remaining = P x (1 - s)" in out


def test_checkpoint_errors(net, tmp_path, capsys):
    from fxprune.models import load_model

    model, x = load_model(f"{tmp_path / 'net.py'}:build", trust=True)
    fxprune.compile(model, x, channels=0.5, ignore=["fc"]).save("api.pt")  # no source recorded
    assert main(["verify", "api.pt"]) == 2
    assert "does not name the model" in capsys.readouterr().err
    torch.save({"plan": {}, "evil": object()}, "pickle.pt")
    assert main(["export", "pickle.pt", "-o", "x.onnx"]) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint pickle.pt" in err and "--trust" in err
    assert main(["prune", "nosuch:thing"]) == 2
    assert "hf:CONFIG_OR_DIR" in capsys.readouterr().err


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxprune: error: "), err
    return lines[0]


def test_every_subcommand_reports_its_errors_in_one_line(net, capsys):
    Path("bad.pt").write_bytes(b"not a checkpoint at all")
    cases = [
        (["prune", "gone.pt"], "checkpoint gone.pt does not exist"),
        (["export", "bad.pt", "-o", "m.onnx"], "cannot read checkpoint bad.pt"),
        (["verify", net, "--trust", "--load", "gone.pt"], "gone.pt does not exist"),
        (["estimate", net, "--trust", "--hardware", "TPU"], "hardware 'TPU'"),
        (["inspect", "bad.pt"], "truncated or corrupt"),
    ]
    for argv, words in cases:
        assert main([*argv, "--quiet"]) == 2, argv
        line = _one_error_line(capsys)
        assert words in line and "trust" not in line, line
        with pytest.raises(fxprune.errors.FxPruneError):
            main(["--debug", *argv, "--quiet"])  # --debug: the exception and its traceback


def test_factory_file_needs_trust(net, capsys):
    assert main(["prune", net, "--quiet"]) == 2
    assert "runs the Python file net.py; pass --trust" in _one_error_line(capsys)


def test_wrong_example_shape_is_blamed_on_the_inputs(net, capsys):
    Path("wide.py").write_text(
        NET.replace("torch.randn(2, 3, 16, 16)", "torch.randn(2, 5, 16, 16)")
    )
    for cmd in ("prune", "inspect"):
        assert main([cmd, "wide.py:build", "--trust", "--quiet"]) == 2
        line = _one_error_line(capsys)
        assert "Net rejected the example inputs (shape [2, 5, 16, 16] float32)" in line, line
        assert "leaf_modules" not in line


def test_unknown_timm_model_is_one_line(capsys):
    pytest.importorskip("timm")
    assert main(["inspect", "timm:not_a_model", "--quiet"]) == 2
    assert "unknown timm model 'not_a_model'" in _one_error_line(capsys)


def test_unwritable_outputs_are_one_line(net, monkeypatch, capsys):
    Path("folder").mkdir()
    for argv in (["prune", net, "--save", "folder"], ["export", net, "-o", "folder"]):
        assert main([*argv, "--trust", "--quiet"]) == 2
        assert "folder is a directory" in _one_error_line(capsys)
    assert main(["prune", net, "--trust", "--quiet", "--save", "net.py/ck.pt"]) == 2
    assert "net.py is a file, not a folder" in _one_error_line(capsys)

    def read_only(self, path, source=None, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fxprune.CompileResult, "save", read_only)
    assert main(["prune", net, "--trust", "--quiet", "--save", "ro/ck.pt"]) == 2
    assert "cannot write --save ro/ck.pt: Permission denied" in _one_error_line(capsys)


def test_hf_sources(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = encoder_config(hidden=32, ffn=64, positions=16)
    cfg.save_pretrained(tmp_path / "cfg")  # config only: random weights
    assert main(["prune", f"hf:{tmp_path / 'cfg'}", "--heads", "0.5", "--json"]) == 0
    assert _json(capsys)["equivalence"]["ok"]

    torch.manual_seed(1)
    m = transformers.BertModel(cfg)
    m.save_pretrained(tmp_path / "full")  # safetensors: the real weights are used
    from fxprune.models import load_model

    loaded, (ids, *_) = load_model(f"hf:{tmp_path / 'full'}")
    assert torch.equal(
        loaded.encoder.layer[0].attention.self.query.weight,
        m.encoder.layer[0].attention.self.query.weight,
    )
    assert ids.shape == (1, 16) and int(ids.max()) < 100

    m.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")  # several safetensors
    sharded, _ = load_model(f"hf:{tmp_path / 'sharded'}")
    assert torch.equal(sharded.pooler.dense.weight, m.pooler.dense.weight)

    m.save_pretrained(tmp_path / "bin", safe_serialization=False)
    if (tmp_path / "bin" / "pytorch_model.bin").exists():
        assert main(["inspect", f"hf:{tmp_path / 'bin'}"]) == 2
        assert "pass --trust" in capsys.readouterr().err
    assert main(["inspect", "hf:no-such-model-type"]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err


def test_save_pretrained_writes_a_folder_transformers_opens(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )  # fmt: skip  (use_cache left at True, as users load it)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer.json").write_text("{}")
    src, out = f"hf:{tmp_path / 'dense'}", tmp_path / "pruned"
    argv = ["prune", src, "--heads", "0.5", "--ffn", "0.25", "--save-pretrained", str(out)]
    assert main([*argv, "--seq-len", "8"]) == 0
    assert "saved a Hugging Face folder" in capsys.readouterr().out
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert again.config.num_key_value_heads == 1 and again.config.intermediate_size == 48
    assert again.config.use_cache is True and (out / "tokenizer.json").exists()
    capsys.readouterr()  # transformers' own loading progress
    (tmp_path / "afile").write_text("")
    assert main([*argv[:-1], str(tmp_path / "afile"), "--quiet"]) == 2
    assert "is a file: give a folder" in _one_error_line(capsys)
    assert main(["prune", "torchvision:resnet18", "--save-pretrained", str(out), "--quiet"]) == 2
    assert "not a Hugging Face model" in _one_error_line(capsys)
    # over the folder the model came from: refused without --overwrite (#25), done with it
    dense = str(tmp_path / "dense")
    onto_source = [*argv[:-1], dense, "--seq-len", "8", "--quiet"]
    assert main(onto_source) == 2
    err = capsys.readouterr().err.strip().splitlines()  # after the source's loading lines
    assert (
        err[-1].startswith("fxprune: error: ") and "the folder the model was loaded from" in err[-1]
    )
    assert transformers.AutoConfig.from_pretrained(dense).num_key_value_heads == 2
    assert main([*onto_source, "--overwrite"]) == 0
    assert transformers.AutoConfig.from_pretrained(dense).num_key_value_heads == 1
    capsys.readouterr()
    assert main(["prune", src, "--heads", "0.5", "--overwrite", "--quiet"]) == 2
    assert "--overwrite applies to --save-pretrained" in _one_error_line(capsys)


def test_help_shows_real_examples(capsys):
    for cmd in ([], ["estimate"], ["inspect"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        out = capsys.readouterr().out
        assert "fxprune estimate torchvision:resnet50" in out and "hf:CONFIG_OR_LOCAL_DIR" in out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(net, tmp_path, capsys):
    from PIL import Image

    args = ["verify", net, "--trust", "--ignore", "fc", "--backend", "torch", "--batch", "1", "2"]
    assert main(args + ["--repeats", "4", "--report", "r.html", "--quiet"]) == 0
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = (tmp_path / "r.html").as_uri()
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert "fxprune verify: net.py:build" in dom.stdout and dom.stdout.count("<rect") >= 8
    shot = tmp_path / "r.png"
    subprocess.run(
        [CHROMIUM, *flags, "--window-size=1100,1400", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
    )
    img = Image.open(shot).convert("RGB")
    blue = sum(1 for p in img.getdata() if p == (0x2F, 0x6F, 0xDF))  # the "after" bars
    assert img.size == (1100, 1400) and blue > 500


def _long_options(p):
    import argparse

    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {o}", o) for _, o in _long_options(sub))
        else:
            yield from (("", o) for o in action.option_strings if o.startswith("--"))


def test_flags_are_kebab_case_and_old_spellings_still_parse(capsys):
    from fxprune.cli_args import parser

    p = parser()
    options = [o for _, o in _long_options(p)]
    snake = [o for o in options if "_" in o]
    assert snake and all(o.replace("_", "-") in options for o in snake)  # each has its kebab
    new = p.parse_args(["prune", "m", "--round-to", "8", "--global-ranking", "--allow-approximate"])
    old = p.parse_args(["prune", "m", "--round_to", "8", "--global_ranking", "--allow_approximate"])
    assert vars(new) == vars(old) and new.round_to == 8 and new.global_ranking
    for cmd in ("prune", "verify", "estimate", "inspect", "export"):
        with pytest.raises(SystemExit):
            p.parse_args([cmd, "--help"])
        shown = capsys.readouterr().out
        assert "--" in shown and not [w for w in shown.split() if w.startswith("--") and "_" in w]


def test_prune_nm_says_what_it_masked_and_why_the_rest_stayed_dense(net, capsys):
    """``prune --sparsity 2:4`` lists how many layers became 2:4 and each dense one with its
    reason, in the table (``report()``) and in ``--json`` (the stem conv reduces over 3 input
    channels, not a multiple of 4)."""
    assert main(["prune", net, "--trust", "--channels", "0", "--sparsity", "2:4"]) == 0
    out = capsys.readouterr().out
    assert "2:4 (magnitude): 3 layers masked, 1 left dense:" in out
    assert "  stem: reduction size 3 is not divisible by M=4" in out
    assert main(["prune", net, "--trust", "--channels", "0", "--sparsity", "2:4", "--json"]) == 0
    (nm,) = _json(capsys)["masked"]
    assert nm["pass"] == "nm" and nm["masked"] == 3 and list(nm["dense"]) == ["stem"]


def test_semi_structured_flag_needs_torch_cuda_timings(net, capsys):
    """--semi-structured chooses the torch-cuda runner's mode: on another backend, or on
    estimate without --measure, nothing would use it, so it is refused before any work."""
    cases = [
        (["verify", net, "--trust", "--semi-structured", "all"], "not on --backend onnxruntime"),
        (
            ["estimate", net, "--trust", "--backend", "torch-cuda", "--semi-structured", "off"],
            "not without --measure",
        ),
        (
            [
                "verify",
                net,
                "--trust",
                "--backend",
                "onnxruntime-genai",
                "--precision",
                "int4",
                "--semi-structured",
                "all",
            ],
            "not onnxruntime-genai",
        ),
        (
            ["estimate", net, "--trust", "--backend", "onnxruntime-genai", "--prompt-len", "16"],
            "only with --measure",
        ),
    ]
    for argv, words in cases:
        assert main([*argv, "--quiet"]) == 2, argv
        assert words in _one_error_line(capsys)
    from fxprune.cli import _timing
    from fxprune.cli_args import parser
    from fxprune.verify.latency import TorchCuda

    a = parser().parse_args(["verify", net, "--backend", "torch-cuda", "--semi-structured", "all"])
    got = _timing(a)
    assert isinstance(got, TorchCuda) and got.options == ("all", None)
    assert _timing(parser().parse_args(["verify", net])) is None


@pytest.mark.slow
def test_export_format_genai_writes_a_checked_folder(tmp_path, capsys):
    """``--format genai -o DIR``: an ONNX Runtime GenAI folder whose greedy tokens were checked
    against the pruned model's generate; ``inspect DIR`` reads its hand-off record."""
    pytest.importorskip("onnxruntime_genai")
    from tests.genai_models import llama_folder

    src = f"hf:{llama_folder(tmp_path / 'llama')}"
    argv = ["export", src, "--heads", "0.5", "--ffn", "0.25", "--seq-len", "16", "--format"]
    out = tmp_path / "llama-genai"
    assert main([*argv, "genai", "-o", str(out), "--json", "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["equivalence"]["ok"] and got["export"]["precision"] == "fp32"
    assert got["export"]["parity"]["tokens_equal"] and (out / "genai_config.json").is_file()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "exported by fxprune" in shown and "matches the stored plan" in shown


def test_genai_flags_are_refused_in_one_line_before_any_work(tmp_path, capsys):
    src = "hf:no-such-folder"  # never opened: each flag is refused first
    base = ["export", src, "--heads", "0.5"]
    (tmp_path / "afile").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.onnx").write_text("")
    full = str(tmp_path / "full")
    cases = [
        ([*base, "--format", "nope", "-o", "x"], "format='nope': no such exporter"),
        ([*base, "--format", "genai", "--precision", "fp16", "-o", "x"], "'fp16': ONNX Runtime"),
        ([*base, "--precision", "int4", "-o", "m.onnx"], "--precision: options of --format genai"),
        ([*base, "--overwrite", "-o", "m.onnx"], "--overwrite: options of --format genai"),
        ([*base, "--format", "genai", "-o", full], "not empty: pass --overwrite"),
        ([*base, "--format", "genai", "-o", str(tmp_path / "afile")], "is a file: give a folder"),
        (["verify", src, "--precision", "int4"], "options of --backend onnxruntime-genai"),
        (["verify", src, "--new-tokens", "8", "--backend", "torch"], "--new-tokens: decode"),
        (["verify", src, "--backend", "onnxruntime-genai", "--precision", "int8"], "'int8'"),
    ]
    for argv, words in cases:
        assert main([*argv, "--quiet"]) == 2, argv
        assert words in _one_error_line(capsys), argv
    assert not (tmp_path / "x").exists() and not Path("x").exists()


def test_export_format_genai_refuses_a_model_that_is_not_an_llm(net, capsys):
    argv = ["export", net, "--trust", "--format", "genai", "-o", "out", "--quiet"]
    assert main(argv) == 2
    assert "--format genai: net.py:build is a Net, not a Hugging Face model" in _one_error_line(
        capsys
    )
    assert not Path("out").exists()


@pytest.mark.slow
def test_verify_times_decode_on_onnxruntime_genai(tmp_path, capsys):
    pytest.importorskip("onnxruntime_genai")
    from tests.genai_models import llama_folder

    src = f"hf:{llama_folder(tmp_path / 'llama')}"
    argv = ["verify", src, "--heads", "0.5", "--ffn", "0.25", "--seq-len", "16"]
    argv += ["--backend", "onnxruntime-genai", "--batch", "1", "--repeats", "4", "--warmup", "1"]
    assert main([*argv, "--prompt-len", "16", "--new-tokens", "8", "--json", "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["mode"] == "decode" and got["new_tokens"] == 8 and got["equivalence"]["ok"]
    (row,) = got["rows"]
    assert row["ttft_pruned_ms"] > 0 and row["pruned_tokens_s"] > 0 and row["parity"] == 0.0
    assert row["efficiency"] == pytest.approx(row["speedup"] * row["bytes_ratio"])
    assert main([*argv, "--precision", "int4", "--repeats", "2", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| batch | TTFT ms dense / pruned |" in table and "int4 decoder" in table


def test_export_to_a_path_under_a_file_or_onto_a_folder_is_one_line(net, capsys):
    """A destination the export could not write: one line naming what is in the way, exit 2,
    nothing written (issue #25)."""
    Path("afile").write_text("")
    Path("adir.onnx").mkdir()
    cases = [
        ("afile/m.onnx", "afile is a file, not a folder"),
        ("afile/sub/m.onnx", "afile is a file, not a folder"),
        ("adir.onnx", "adir.onnx is a directory"),
    ]
    for out, words in cases:
        assert main(["export", net, "--trust", "-o", out, "--quiet"]) == 2, out
        assert words in _one_error_line(capsys), out
    assert Path("afile").read_text() == "" and list(Path("adir.onnx").iterdir()) == []


def test_inspect_exits_alike_with_and_without_json(net, capsys):
    """``inspect m.onnx`` and ``inspect m.onnx --json``: 0 on an intact record, 1 on an edited
    field, 2 (one line) on a field of the wrong JSON type."""
    import onnx

    assert main(["export", net, "--trust", "-o", "m.onnx", "--quiet"]) == 0
    capsys.readouterr()
    for flags in ([], ["--json"]):
        assert main(["inspect", "m.onnx", *flags]) == 0
    model = onnx.load("m.onnx")
    entry = next(p for p in model.metadata_props if p.key == "fxprune.equivalence")
    eq = json.loads(entry.value)
    entry.value = json.dumps({**eq, "max_rel_err": 1e-9})
    onnx.save(model, "edited.onnx")
    entry.value = json.dumps([eq])
    onnx.save(model, "typed.onnx")
    capsys.readouterr()
    for flags in ([], ["--json"]):
        assert main(["inspect", "edited.onnx", *flags]) == 1
        assert "equivalence" in capsys.readouterr().out
        assert main(["inspect", "typed.onnx", *flags]) == 2
        assert "fxprune.equivalence is a JSON array, expected an object" in _one_error_line(capsys)
