"""Breadth table (issue #22): fxprune vs torch-pruning on ~50 current model families.

Each family is built from a tiny config with random weights (hidden 64, 2 layers, vocab 100,
4 attention heads over 2 key/value heads where the family has grouped-query attention; timm
models at small depth / image size), every 1-D parameter (biases, norm gains) set to random
non-trivial values so a leaked or dropped one changes the output. Nothing is downloaded.

The request: transformers ``heads=0.5, ffn=0.25, channels=0.0, uniform=True`` (one key/value
group of two removed per layer, a quarter of the MLP / expert neurons); CNNs ``channels=0.5``.
A typed refusal that names ``uniform=True`` or ``allow_approximate`` is retried without / with
it, and the outcome says so.

- fxprune: ``fxprune.compile`` then ``fxprune.verify.equivalence`` on the graph module and, when
  ``result.model`` is the user's class rebuilt, on it too (``target="model"``). Outcomes:
  ``exact`` (both proofs hold and the parameter count fell), ``approximate`` (only with
  ``allow_approximate=True``, after a refusal that names it), ``refused: ...`` (a typed
  ``fxprune.errors.FxPruneError``), ``NOT EXACT`` / ``FAILED: ...`` (a proof that fails, or any
  untyped exception: bugs).
- torch-pruning: ``tp.pruner.MetaPruner`` with ``MagnitudeImportance(p=1)``; transformers get
  ``pruning_ratio=0.25`` (FFN), ``num_heads`` for the q/k/v projections it can name with
  ``prune_num_heads=True, head_pruning_ratio=0.5``, and the output head plus every layer writing
  the residual width ignored (the hidden size is kept, as fxprune keeps it); CNNs
  ``pruning_ratio=0.5`` with the classifier ignored. torch-pruning proves nothing: its outcome
  is whether it ran and whether the pruned model then runs on another batch / length too.

Each family runs in its own process (both tools, each under ``--timeout`` seconds, default
120, via SIGALRM). The command of the published table, and a subset:

    python benchmarks/families_breadth.py --json-out breadth.json > breadth.md
    python benchmarks/families_breadth.py --families llama timm_resnet18 --timeout 60
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # this checkout's fxprune and tests, also in the child processes

TRANSFORMER = dict(heads=0.5, ffn=0.25, channels=0.0, uniform=True)
CNN = dict(channels=0.5)

LM = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
ENC = {k: v for k, v in LM.items() if k != "num_key_value_heads"}
MOE = dict(LM, intermediate_size=96, num_experts_per_tok=2)


# name: (kind, config class, model class, config kwargs). kind: "lm" (token ids, causal LM),
# "enc" (token ids, sequence classifier), "s2s" (ids, mask, decoder ids), "img" (32 x 32 images)
HF = {
    "llama": ("lm", "LlamaConfig", "LlamaForCausalLM", LM),
    "mistral": ("lm", "MistralConfig", "MistralForCausalLM", LM),
    "qwen2": ("lm", "Qwen2Config", "Qwen2ForCausalLM", LM),
    "qwen3": ("lm", "Qwen3Config", "Qwen3ForCausalLM", dict(LM, head_dim=16)),
    "gemma": ("lm", "GemmaConfig", "GemmaForCausalLM", dict(LM, head_dim=16)),
    "gemma2": ("lm", "Gemma2Config", "Gemma2ForCausalLM", dict(LM, head_dim=16)),
    "gemma3": ("lm", "Gemma3TextConfig", "Gemma3ForCausalLM", dict(LM, head_dim=16)),
    "phi": ("lm", "PhiConfig", "PhiForCausalLM", LM),
    "phi3": ("lm", "Phi3Config", "Phi3ForCausalLM", dict(LM, pad_token_id=0)),
    "stablelm": ("lm", "StableLmConfig", "StableLmForCausalLM", LM),
    "gpt_neox": ("lm", "GPTNeoXConfig", "GPTNeoXForCausalLM", ENC),  # no GQA
    "gpt2": ("lm", "GPT2Config", "GPT2LMHeadModel", dict(vocab_size=100, n_embd=64, n_layer=2,
                                                         n_head=4, n_positions=64)),
    "gptj": ("lm", "GPTJConfig", "GPTJForCausalLM", dict(vocab_size=100, n_embd=64, n_layer=2,
                                                         n_head=4, rotary_dim=8, n_positions=64)),
    "codegen": ("lm", "CodeGenConfig", "CodeGenForCausalLM", dict(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, n_ctx=64)),
    "cohere": ("lm", "CohereConfig", "CohereForCausalLM", LM),
    "falcon": ("lm", "FalconConfig", "FalconForCausalLM", dict(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_kv_heads=2, new_decoder_architecture=True)),
    "bloom": ("lm", "BloomConfig", "BloomForCausalLM", dict(vocab_size=100, hidden_size=64,
                                                            n_layer=2, n_head=4)),
    "olmo": ("lm", "OlmoConfig", "OlmoForCausalLM", LM),
    "olmo2": ("lm", "Olmo2Config", "Olmo2ForCausalLM", LM),
    "granite": ("lm", "GraniteConfig", "GraniteForCausalLM", LM),
    "mixtral": ("lm", "MixtralConfig", "MixtralForCausalLM", dict(MOE, num_local_experts=4)),
    "qwen3_moe": ("lm", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        MOE, moe_intermediate_size=48, num_experts=4, head_dim=16)),
    "qwen2_moe": ("lm", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        MOE, moe_intermediate_size=48, shared_expert_intermediate_size=80, num_experts=4)),
    "olmoe": ("lm", "OlmoeConfig", "OlmoeForCausalLM", dict(
        MOE, intermediate_size=48, num_experts=4, eos_token_id=1, pad_token_id=0)),
    # further current families
    "cohere2": ("lm", "Cohere2Config", "Cohere2ForCausalLM", LM),
    "olmo3": ("lm", "Olmo3Config", "Olmo3ForCausalLM", LM),
    "opt": ("lm", "OPTConfig", "OPTForCausalLM", dict(
        vocab_size=100, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64)),
    "gpt_neo": ("lm", "GPTNeoConfig", "GPTNeoForCausalLM", dict(
        vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=64)),
    "starcoder2": ("lm", "Starcoder2Config", "Starcoder2ForCausalLM", LM),
    "nemotron": ("lm", "NemotronConfig", "NemotronForCausalLM", LM),
    "glm4": ("lm", "Glm4Config", "Glm4ForCausalLM", dict(LM, head_dim=16, pad_token_id=0)),
    "smollm3": ("lm", "SmolLM3Config", "SmolLM3ForCausalLM", dict(
        LM, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "ernie4_5": ("lm", "Ernie4_5Config", "Ernie4_5ForCausalLM", dict(LM, head_dim=16)),
    "granitemoe": ("lm", "GraniteMoeConfig", "GraniteMoeForCausalLM", dict(
        MOE, num_local_experts=4)),
    "deepseek_v3": ("lm", "DeepseekV3Config", "DeepseekV3ForCausalLM", dict(  # KV heads = heads,
        MOE, num_key_value_heads=4, moe_intermediate_size=48,  # as released (MLA) n_routed_experts=4, n_shared_experts=1, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    "gpt_oss": ("lm", "GptOssConfig", "GptOssForCausalLM", dict(
        MOE, num_local_experts=4, head_dim=16,
        layer_types=["sliding_attention", "full_attention"])),
    # encoders and seq2seq
    "bert": ("enc", "BertConfig", "BertForSequenceClassification", ENC),
    "roberta": ("enc", "RobertaConfig", "RobertaForSequenceClassification", ENC),
    "distilbert": ("enc", "DistilBertConfig", "DistilBertForSequenceClassification", dict(
        vocab_size=100, dim=64, hidden_dim=128, n_layers=2, n_heads=4,
        max_position_embeddings=64)),
    "electra": ("enc", "ElectraConfig", "ElectraForSequenceClassification", dict(
        ENC, embedding_size=64)),
    "deberta_v2": ("enc", "DebertaV2Config", "DebertaV2ForSequenceClassification", ENC),
    "modernbert": ("enc", "ModernBertConfig", "ModernBertForSequenceClassification", dict(
        ENC, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
    "t5": ("s2s", "T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4)),
    "bart": ("s2s", "BartConfig", "BartForConditionalGeneration", dict(
        vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_position_embeddings=64)),
    # vision
    "hf_vit": ("img", "ViTConfig", "ViTForImageClassification", dict(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10)),
    "hf_swin": ("img", "SwinConfig", "SwinForImageClassification", dict(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
        num_labels=10)),
    "beit": ("img", "BeitConfig", "BeitForImageClassification", dict(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, use_relative_position_bias=True, num_labels=10)),
    "dinov2": ("img", "Dinov2Config", "Dinov2Model", dict(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        mlp_ratio=2)),
    "hf_convnext": ("cnn", "ConvNextConfig", "ConvNextForImageClassification", dict(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)),
}  # fmt: skip

# timm: name -> (model name, create kwargs, image size, kind)
TIMM = {
    "efficientformerv2_s0": ("efficientformerv2_s0", {}, 224, "img"),
    "vit_pe_core_tiny": ("vit_pe_core_tiny_patch16_384", {"depth": 2, "img_size": 64}, 64, "img"),
    "eva02_tiny": ("eva02_tiny_patch14_224", {"depth": 2, "img_size": 56}, 56, "img"),
    "levit_128s": ("levit_128s", {}, 224, "img"),
    "timm_resnet18": ("resnet18", {}, 64, "cnn"),
}
FAMILIES = [*HF, *TIMM]


def nontrivial(model):
    """Random biases and norm gains, so a leaked or dropped one changes the output; BatchNorm
    statistics away from 0 / 1 and near-zero weights (layer scales) given real values."""
    import torch

    from tests.conftest import randomize

    model = randomize(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            for pname, p in m.named_parameters(recurse=False):
                if p.ndim == 1:  # norm gains around 1, biases and the rest around 0
                    gain = float(pname == "weight" and "norm" in type(m).__name__.lower())
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + gain)
    return model.eval()


def inputs(kind: str, batch: int, seq: int, size: int = 32, seed: int = 0):
    """The example (``batch``, ``seq``) for a family's kind: a tensor or a dict of keywords."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind in ("img", "cnn"):
        return torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(3, 100, (batch, seq), generator=g)  # 0-2: pad / special tokens
    if kind == "s2s":
        dec = torch.randint(3, 100, (batch, max(seq - 3, 2)), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": dec}
    return ids


class NotInstalled(Exception):
    """The family's class is missing from the installed transformers / timm."""


def build(name: str):
    """(model, example, kind, image size) for a family, seeded, random non-trivial weights."""
    import torch

    torch.manual_seed(0)
    if name in TIMM:
        import timm

        model_name, kw, size, kind = TIMM[name]
        if model_name not in timm.list_models():
            raise NotInstalled(f"not in this timm ({timm.__version__})")
        model = timm.create_model(model_name, pretrained=False, num_classes=10, **kw)
    else:
        import transformers

        kind, cfg_name, cls_name, kw = HF[name]
        cfg_cls, cls = getattr(transformers, cfg_name, None), getattr(transformers, cls_name, None)
        if cfg_cls is None or cls is None:
            raise NotInstalled(f"not in this transformers ({transformers.__version__})")
        cfg = cfg_cls(**kw, **({"num_labels": 3} if kind == "enc" else {}))
        if hasattr(cfg, "use_cache"):
            cfg.use_cache = False
        model, size = cls(cfg), 32
    return nontrivial(model), inputs(kind, 2, 8, size), kind, size


def first_tensor(out):
    """The first floating tensor of a model output (logits, last hidden state)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    for v in out.values() if isinstance(out, dict) else out:
        t = first_tensor(v) if isinstance(v, (torch.Tensor, tuple, list, dict)) else None
        if t is not None:
            return t
    return None


def call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class Timeout(BaseException):  # not an Exception: no library's ``except Exception`` eats it
    @staticmethod
    def alarm(signum, frame):
        raise Timeout()


def with_limit(seconds: int, fn, *args):
    """``fn(*args)`` under SIGALRM; a Timeout after ``seconds``."""
    old = signal.signal(signal.SIGALRM, Timeout.alarm)
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def short(e: BaseException, n: int = 80) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"


def tail(limit: int = 6) -> str:
    return "".join(traceback.format_exc().strip().splitlines(keepends=True)[-limit:])


def run_fxprune(model, x, kind: str, size: int) -> dict:
    import fxprune
    from fxprune.errors import FxPruneError

    request = dict(CNN if kind == "cnn" else TRANSFORMER)
    row: dict = {"request": dict(request), "params_before": n_params(model)}
    t0, retries = time.perf_counter(), []
    try:
        for _ in range(3):  # a refusal naming uniform / allow_approximate: retry without it
            try:
                res = fxprune.compile(model, x, **request)
                break
            except FxPruneError as e:
                msg = " ".join(str(e).split())
                if "uniform=True:" in msg and request.get("uniform"):
                    request["uniform"] = False
                    counts = re.search(r"different counts \((.*?)\);", msg)
                    retries.append(f"uniform=False (uniform=True: {counts and counts[1]})")
                elif "allow_approximate" in msg and not request.get("allow_approximate"):
                    request["allow_approximate"] = True
                    where = re.search(r" in ([\w.]+ \(\w+\)): inexact", msg)
                    retries.append(f"allow_approximate=True ({where and where[1]} inexact)")
                else:
                    raise
                row.setdefault("refusals", []).append(short(e, 400))
                row["request"] = dict(request)
        row["compile_s"] = time.perf_counter() - t0
        row["params_after"] = n_params(res.model)  # unique tensors: a tied lm_head once
        row["summary_params"] = [res.summary.params_before, res.summary.params_after]
        row["users_class"] = type(res.model) is type(model)
        row["model_note"] = res.model_note
        rep = fxprune.verify.equivalence(model, res, x)
        reps = {"module": rep}
        if res.materialized:
            reps["model"] = fxprune.verify.equivalence(model, res, x, target="model")
        row["proof"] = {k: {"ok": r.ok, "max_rel_err": r.max_rel_err, "approximate": r.approximate,
                            "pruning_effect": r.pruning_effect, "message": r.message}
                        for k, r in reps.items()}  # fmt: skip
        worst = max(r.max_rel_err for r in reps.values())
        smaller = res.summary.params_after < res.summary.params_before
        if res.approximate and all(r.approximate for r in reps.values()):
            row["outcome"] = f"approximate (max rel err {worst:.1e})"
        elif all(r.ok for r in reps.values()) and smaller:
            row["outcome"] = "exact"
        elif not smaller:
            row["outcome"] = "NOT SMALLER: the parameter count did not fall"
        else:
            bad = next(k for k, r in reps.items() if not r.ok)
            row["outcome"] = f"NOT EXACT ({bad}): {' '.join(reps[bad].message.split())[:80]}"
        if retries and not row["outcome"].startswith(("NOT", "FAILED")):
            row["outcome"] += " with " + "; ".join(retries)
    except Timeout:
        row["outcome"] = "timeout"
    except FxPruneError as e:
        after = ", ".join(r.split(" (")[0] for r in retries)  # the retries made
        row["outcome"] = f"refused: {short(e)}" + (f" (with {after})" if after else "")
        row["error"] = short(e, 400)
    except Exception as e:  # noqa: BLE001 - an untyped error is the finding
        row["outcome"] = f"FAILED: {short(e)}"
        row["traceback"] = tail()
    row["seconds"] = time.perf_counter() - t0
    return row


QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"),
       ("q", "k", "v"), ("query_proj", "key_proj", "value_proj"))  # fmt: skip
HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")


def tp_heads(model) -> dict:
    """torch-pruning's ``num_heads``: separate q/k/v Linears with a head size attribute, and
    fused ``qkv`` Linears of modules with a ``num_heads`` (timm). Fused layouts it cannot
    express (GPT-2's Conv1D, Falcon / Bloom / GPT-NeoX ``query_key_value``) are left out."""
    import torch.nn as nn

    heads = {}
    for m in model.modules():
        hd = next((getattr(m, a) for a in HEAD_DIM if isinstance(getattr(m, a, None), int)), 0)
        for names in QKV:
            lins = [getattr(m, n, None) for n in names]
            if hd > 0 and all(isinstance(lin, nn.Linear) for lin in lins):
                for lin in lins:
                    heads[lin] = lin.out_features // hd
        qkv, h = getattr(m, "qkv", None), getattr(m, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(h, int):
            heads[qkv] = h
    return heads


def residual_widths(model) -> set:
    """Widths of the residual stream (kept, as fxprune's ``channels=0`` keeps them)."""
    cfg = getattr(model, "config", None)
    widths = set()
    if cfg is not None:
        for a in ("hidden_size", "d_model", "n_embd", "dim"):
            v = getattr(cfg, a, None)
            if isinstance(v, int):
                widths.add(v)
        if isinstance(getattr(cfg, "depths", None), list) and isinstance(cfg.embed_dim, int):
            widths.update(cfg.embed_dim * 2**i for i in range(len(cfg.depths)))
    for a in ("embed_dim", "num_features"):
        v = getattr(model, a, None)
        widths.update(v if isinstance(v, (list, tuple)) else [v] if isinstance(v, int) else [])
    return widths


def output_head(model):
    """The layer that writes the logits (lm_head / classifier / head), or None."""
    import torch.nn as nn

    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return model.get_output_embeddings()
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and any(k in n for k in ("classifier", "score", "head")):
            last = m
    return last


def run_tp(model, x, kind: str, size: int) -> dict:
    import torch
    import torch.nn as nn
    import torch_pruning as tp

    head = output_head(model)
    ignored = [head] if head is not None else []
    kw: dict = {"pruning_ratio": 0.5}
    if kind != "cnn":
        heads, widths = tp_heads(model), residual_widths(model)
        for m in model.modules():
            if m in heads or m is head:
                continue
            out = getattr(m, "out_features", None) or getattr(m, "out_channels", None)
            if isinstance(m, nn.Embedding) or (isinstance(m, (nn.Linear, nn.Conv2d))
                                               and out in widths):  # fmt: skip
                ignored.append(m)
        kw = {"pruning_ratio": 0.25}
        if heads:
            kw.update(num_heads=heads, prune_num_heads=True, prune_head_dims=False,
                      head_pruning_ratio=0.5)  # fmt: skip
    row: dict = {"request": {k: v for k, v in kw.items() if k != "num_heads"},
                 "heads_named": len(kw.get("num_heads", {})),
                 "params_before": n_params(model)}  # fmt: skip
    t0 = time.perf_counter()
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=1),
            ignored_layers=ignored,
            output_transform=lambda out: first_tensor(out).sum(),
            **kw,
        )
        pruner.step()
        row["params_after"] = n_params(model)
        row["compile_s"] = time.perf_counter() - t0
        try:
            with torch.no_grad():
                call(model, x)
                call(model, inputs(kind, 3, 5, size, seed=1))
            row["outcome"] = "ran, runs"
        except Exception as e:  # noqa: BLE001
            row["outcome"] = f"ran, fails to run: {short(e)}"
        if row["params_after"] >= row["params_before"]:
            row["outcome"] += " (nothing removed)"
    except Timeout:
        row["outcome"] = "timeout"
    except Exception as e:  # noqa: BLE001
        row["outcome"] = f"FAILED: {short(e)}"
        row["traceback"] = tail()
    row["seconds"] = time.perf_counter() - t0
    return row


def row(name: str, tools=("fxprune", "torch-pruning"), timeout: int = 120, emit=None) -> dict:
    """One family: build, then each tool on a fresh build; ``emit`` gets each tool's result."""
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out: dict = {"family": name, "source": "timm" if name in TIMM else "transformers"}
    for tool in tools:
        try:
            model, x, kind, size = build(name)
        except NotInstalled as e:
            out["missing"] = str(e)
            break
        except Exception as e:  # noqa: BLE001 - a config this script got wrong
            out["build_error"] = short(e, 200)
            break
        out["kind"] = kind
        run = run_fxprune if tool == "fxprune" else run_tp
        out[tool] = res = with_limit(timeout, run, model, x, kind, size)
        if emit:
            emit(tool, res)
    return out


def child(name: str, timeout: int) -> None:
    """Print each tool's result, then the row's other fields, one JSON line each."""

    def emit(tool, res):
        print("@@" + json.dumps({tool: res}, default=str), flush=True)

    got = row(name, timeout=timeout, emit=emit)
    emit("row", {k: v for k, v in got.items() if k not in ("fxprune", "torch-pruning")})


def run_in_child(name: str, timeout: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--timeout", str(timeout)]
    out: dict = {"family": name, "source": "timm" if name in TIMM else "transformers"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=2 * timeout + 120)
        stdout, err = p.stdout, (p.stderr.strip().splitlines() or ["?"])[-1] if p.returncode else ""
    except subprocess.TimeoutExpired as e:
        stdout, err = e.stdout.decode() if isinstance(e.stdout, bytes) else "", "timeout"
    for line in stdout.splitlines():
        if line.startswith("@@"):
            for k, v in json.loads(line[2:]).items():
                out.update(v if k == "row" else {k: v})
    for tool in ("fxprune", "torch-pruning"):
        if tool not in out and "missing" not in out and "build_error" not in out:
            out[tool] = {"outcome": "timeout" if err == "timeout" else f"FAILED: process: {err}"}
    return out


def cell(r: dict | None) -> str:
    return (r or {}).get("outcome", "").replace("|", "/")


def params(r: dict | None) -> str:
    if not r or "params_after" not in r:
        return ""
    return f"{r['params_before']:,} -> {r['params_after']:,}"


def markdown(rows: list) -> str:
    lines = [
        "| family | source | fxprune | fxprune params | result.model user's class "
        "| torch-pruning (proves nothing) | tp params | seconds fxprune / tp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "missing" in r or "build_error" in r:
            why = r.get("missing") or f"did not build: {r['build_error']}"
            lines.append(f"| {r['family']} | {r['source']} | {why} | | | | | |")
            continue
        fx, t = r.get("fxprune"), r.get("torch-pruning")
        note = " ".join((fx or {}).get("model_note", "").split())[:60]
        cls = {True: "yes", False: f"no (graph module: {note})"}.get(
            (fx or {}).get("users_class"), ""
        )
        secs = " / ".join(f"{x['seconds']:.1f}" if x and "seconds" in x else "-" for x in (fx, t))
        lines.append(
            f"| {r['family']} | {r['source']} | {cell(fx)} | {params(fx)} | {cls} | {cell(t)} "
            f"| {params(t)} | {secs} |"
        )
    return "\n".join(lines)


def summary(rows: list) -> str:
    built = [r for r in rows if "missing" not in r and "build_error" not in r]
    fx = [cell(r.get("fxprune")) for r in built]
    tp_ = [cell(r.get("torch-pruning")) for r in built]
    n = lambda xs, p: sum(x.startswith(p) for x in xs)  # noqa: E731
    bad = [r["family"] for r, x in zip(built, fx, strict=True) if x.startswith(("FAILED", "NOT"))]
    return "\n".join([
        f"- families: {len(rows)}; built: {len(built)}; not installed / did not build: "
        f"{len(rows) - len(built)}",
        f"- fxprune: exact {n(fx, 'exact')} of {len(built)} ({n(fx, 'exact with')} of them only "
        f"after a retry the refusal named), approximate {n(fx, 'approximate')}, refused "
        f"{n(fx, 'refused')}, timeout {n(fx, 'timeout')}, failed (untyped error or failed proof) "
        f"{len(bad)}" + (f": {', '.join(bad)}" if bad else ""),
        f"- torch-pruning: ran and runs {sum(x == 'ran, runs' for x in tp_)} of {len(built)}, ran "
        f"but removed nothing {sum(x.endswith('(nothing removed)') for x in tp_)}, ran but "
        f"fails to run {n(tp_, 'ran, fails')}, failed {n(tp_, 'FAILED')}, timeout "
        f"{n(tp_, 'timeout')}",
    ])  # fmt: skip


def header(timeout: int) -> str:
    v = importlib.metadata.version
    return (
        f"{datetime.date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} cpus, "
        f"torch {v('torch')}, transformers {v('transformers')}, timm {v('timm')}, torch-pruning "
        f"{v('torch-pruning')}; limit {timeout} s per tool. "
        "fxprune: heads=0.5, ffn=0.25, channels=0, uniform=True (CNNs channels=0.5), proved on "
        "the graph and on result.model; "
        "a refusal naming uniform=True / allow_approximate retried without / with it. Params: "
        "unique tensors (a tied lm_head once). torch-pruning: MetaPruner, MagnitudeImportance(p=1)"
        ", pruning_ratio 0.25 (CNNs 0.5), num_heads + prune_num_heads (head ratio 0.5) where it "
        "can name q/k/v, output head and residual stream ignored; it proves nothing: 'runs' "
        "means the pruned model ran on the example and on another batch / length."
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="*", default=FAMILIES, choices=FAMILIES, metavar="NAME")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per tool and family")
    ap.add_argument("--json-out", help="write every row (and tracebacks) here as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.timeout)
        return
    rows = []
    for name in a.families:
        t0 = time.perf_counter()
        rows.append(run_in_child(name, a.timeout))
        r = rows[-1]
        print(f"{name}: fxprune {cell(r.get('fxprune')) or r.get('missing', '')}; tp "
              f"{cell(r.get('torch-pruning'))} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    print(f"{header(a.timeout)}\n\n{markdown(rows)}\n\n{summary(rows)}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"header": header(a.timeout), "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
