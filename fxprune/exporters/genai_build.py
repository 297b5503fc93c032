"""What an ONNX Runtime GenAI folder is made and run with, shared by the genai exporter
(``fxprune.exporters.genai``) and the decode latency backend (``fxprune.verify.decode``).

- :func:`hf_folder`: a Hugging Face causal LM (a ``CompileResult``'s rebuilt model, or a model)
  written with ``save_pretrained`` plus its tokenizer files: the builder's input. Models that
  are not causal LMs with a Hugging Face config are refused (:func:`check_causal_lm`).
- :func:`build_genai`: ONNX Runtime GenAI's model builder, ``python -m
  onnxruntime_genai.models.builder -i HF -o OUT -p PRECISION -e cpu``, run in a process of its
  own (``sys.executable``, offline). Its Python entry points are not stable (0.18 needs
  ``parse_extra_options`` before ``create_model``, earlier releases did not), it prints its
  progress to stdout, appends its own folder to ``sys.path`` (top-level modules named
  ``builders``, ``quantization``, ``loaders``) and loads the model once more: a subprocess keeps
  all of that away from the caller, and its command line is the documented interface.
- :class:`GenaiDecoder`: a built folder opened for greedy generation, timing the first token
  (prefill) and the rest (decode); :func:`hf_greedy` is the Hugging Face side of the parity.
- :func:`weight_bytes`: the bytes of a built decoder's initializers (``per_step``: what each
  decode step reads whole, the embedding table left out).

fp16 is refused on the CPU execution provider: the builder lists fp16 for CUDA, DirectML and
TensorRT-RTX only, and ONNX Runtime GenAI 0.18 fails at the second decode step of an fp16 CPU
build of a 2-layer Llama ("Shape mismatch attempting to re-use buffer. {1,1,32} != {1,9,32}" in
a Cast node; measured).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fxprune._util import eval_mode
from fxprune.errors import ConfigError, ExportError, MissingExtraError, UnsupportedModelError
from fxprune.hf import copy_tokenizer, source_folder

PRECISIONS = ("fp32", "int4")  # what the builder makes for, and GenAI runs on, the CPU
PROVIDER = "cpu"
# files a tokenizer is read from (the builder loads AutoTokenizer from the folder)
TOKENIZER_MODELS = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)


def import_genai(purpose: str = "the genai export"):
    """The ``onnxruntime_genai`` module, or MissingExtraError naming the ``genai`` extra."""
    try:
        import onnxruntime_genai
    except ImportError as e:
        raise MissingExtraError("onnxruntime-genai", "genai", purpose) from e
    return onnxruntime_genai


def check_precision(precision: str) -> None:
    """Refuse a precision the CPU build cannot run, naming the reason."""
    if precision == "fp16":
        raise ConfigError(
            "precision='fp16': ONNX Runtime GenAI's CPU execution provider does not run fp16 "
            "decoders (the model builder lists fp16 for CUDA / DirectML only; a CPU build fails "
            "at its second decode step); choose 'fp32' or 'int4'"
        )
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: choose one of {PRECISIONS}")


def check_causal_lm(model, what: str) -> None:
    """Refuse a model the builder cannot read: not a Hugging Face model with a config, or not a
    decoder-only language model that generates."""
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict") or not hasattr(model, "save_pretrained"):
        raise UnsupportedModelError(
            f"{what}: {name} is not a Hugging Face model (it has no config): ONNX Runtime "
            "GenAI builds decoders from a Hugging Face causal-LM folder; export ONNX instead "
            "(a path ending in .onnx)"
        )
    can = getattr(model, "can_generate", None)
    if getattr(cfg, "is_encoder_decoder", False) or not (callable(can) and can()):
        kind = "an encoder-decoder" if getattr(cfg, "is_encoder_decoder", False) else "not"
        raise UnsupportedModelError(
            f"{what}: {name} is {kind} a causal language model (ONNX Runtime GenAI runs "
            "decoder-only LMs that generate: LlamaForCausalLM, Qwen2ForCausalLM, ...); export "
            "ONNX instead (a path ending in .onnx)"
        )


def causal_lm_of(obj, what: str):
    """The Hugging Face causal LM ``obj`` is, or a compile result rebuilt (``result.model``);
    UnsupportedModelError when there is none."""
    if not hasattr(obj, "plan"):
        check_causal_lm(obj, what)
        return obj
    if obj.model is obj.module:
        raise UnsupportedModelError(
            f"{what}: result.model is the graph module ({obj.model_note}); ONNX Runtime GenAI "
            "builds decoders from the model's own Hugging Face class"
        )
    check_causal_lm(obj.model, what)
    return obj.model


def hf_folder(obj, dest: Path, tokenizer_from=None, what: str = "the genai export") -> Path:
    """Write ``obj`` (a ``CompileResult``: its ``save_pretrained``; or a Hugging Face causal LM)
    as a Hugging Face folder at ``dest`` with its tokenizer files (from ``tokenizer_from``, else
    the folder the model was loaded from); ConfigError when no tokenizer ends up there."""
    model = causal_lm_of(obj, what)
    if tokenizer_from is not None and not Path(tokenizer_from).is_dir():
        raise ConfigError(f"{what}: tokenizer_from={str(tokenizer_from)!r} is not a folder")
    if hasattr(obj, "plan"):
        obj.save_pretrained(dest, tokenizer_from=tokenizer_from)
    else:
        model.save_pretrained(str(dest))
        src = Path(tokenizer_from) if tokenizer_from is not None else source_folder(model)
        copy_tokenizer(src, dest)
    if not any((dest / n).is_file() for n in TOKENIZER_MODELS):
        raise ConfigError(
            f"{what}: no tokenizer for {type(model).__name__} ({' / '.join(TOKENIZER_MODELS)} "
            "in the folder it was loaded from), and ONNX Runtime GenAI's builder needs one: "
            "pass tokenizer_from=DIR (--tokenizer-from DIR), a folder with the tokenizer files"
        )
    return dest


def build_genai(hf_dir: Path, out_dir: Path, precision: str, cache_dir: Path) -> None:
    """Run the model builder on ``hf_dir`` into ``out_dir`` (see the module docstring);
    ExportError with the builder's last line when it fails."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir)]
    cmd += ["-o", str(out_dir), "-p", precision, "-e", PROVIDER, "-c", str(cache_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln.split(":")[0] or ln.startswith("Exception")]
        why = (errors or lines or [f"exit status {done.returncode}"])[-1]
        raise ExportError(
            f"ONNX Runtime GenAI's model builder failed ({precision}, {PROVIDER}): {why}"
        )


def decoder_file(folder: Path) -> Path:
    """The decoder ONNX file a built folder's ``genai_config.json`` names."""
    cfg = json.loads((Path(folder) / "genai_config.json").read_text())
    return Path(folder) / cfg["model"]["decoder"]["filename"]


def weight_bytes(folder: Path, per_step: bool = False) -> int:
    """Bytes of the built decoder's initializers (4-bit types packed two to a byte); the
    external data file is not read, only the shapes. ``per_step``: only what a decode step
    reads whole, so a table used only by ``Gather`` (the token embedding: a step reads one row
    of it) is left out."""
    import onnx

    model = onnx.load(str(decoder_file(folder)), load_external_data=False)
    nibble = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    nibble |= {getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}
    gathered = set()
    if per_step:
        uses: dict[str, set] = {}
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                uses.setdefault(name, set()).add((node.op_type, i))
        gathered = {k for k, v in uses.items() if v and all(u == ("Gather", 0) for u in v)}
    total = 0
    for t in model.graph.initializer:
        if t.name in gathered:
            continue
        n = math.prod(t.dims)
        if t.data_type in nibble:
            total += (n + 1) // 2
        else:
            total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def random_prompts(vocab: int, batch: int, length: int, seed: int) -> np.ndarray:
    """``[batch, length]`` token ids drawn uniformly from the vocabulary (int64)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).numpy()


class GenaiDecoder:
    """A built ONNX Runtime GenAI folder opened for greedy generation on the CPU
    (``threads``: its intra-op threads; None: ONNX Runtime's default)."""

    def __init__(self, folder: Path, threads: int | None = None):
        og = import_genai("ONNX Runtime GenAI decoding")
        cfg = og.Config(str(folder))
        if threads:
            opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
        self.og, self.folder, self.model = og, Path(folder), og.Model(cfg)

    def generate(
        self, prompts: np.ndarray, new_tokens: int
    ) -> tuple[list[list[int]], float, float]:
        """Greedy ``new_tokens`` after each row of ``prompts`` (``[batch, length]`` ids):
        (the new tokens per row, seconds to the first new token, seconds for the rest)."""
        b, n = prompts.shape
        params = self.og.GeneratorParams(self.model)
        total = n + new_tokens  # min_length = max_length: exactly new_tokens, as hf_greedy
        params.set_search_options(
            max_length=total,
            min_length=total,
            do_sample=False,
            num_beams=1,
            batch_size=b,
            repetition_penalty=1.0,
        )
        try:
            gen = self.og.Generator(self.model, params)
            t0 = time.perf_counter()
            gen.append_tokens(np.ascontiguousarray(prompts, dtype=np.int32))
            gen.generate_next_token()
            t1 = time.perf_counter()
            while not gen.is_done():
                gen.generate_next_token()
            t2 = time.perf_counter()
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"ONNX Runtime GenAI failed on {self.folder.name}: {first}") from e
        rows = [[int(t) for t in gen.get_sequence(i)[n:]] for i in range(b)]
        return rows, t1 - t0, t2 - t1


def hf_greedy(model, prompts: np.ndarray, new_tokens: int) -> list[list[int]]:
    """``model.generate`` greedy (KV cache on), exactly ``new_tokens`` after each prompt row."""
    import torch
    import transformers

    cfg = model.config
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else getattr(cfg, "eos_token_id", None)
    pad = getattr(cfg, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    gc = transformers.GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if any(p.dtype != torch.float32 for p in model.parameters()):
        # the builder reads the weights into an fp32 decoder: compare against the same numbers
        # (a bf16 model's greedy tokens flip on near-ties that fp32 resolves otherwise)
        import copy

        model = copy.deepcopy(model).float()
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    with torch.no_grad(), eval_mode(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return out[:, ids.shape[1] :].tolist()


def context_length(model) -> int | None:
    """The positions the model's config allows (``max_position_embeddings``), if it says."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) else None
