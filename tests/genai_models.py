"""A tiny Llama in a Hugging Face folder with a real tokenizer, which ONNX Runtime GenAI's model
builder needs (it loads ``AutoTokenizer`` from the folder): a byte-level BPE trained here with
the ``tokenizers`` package on CPython's own library sources (real text that ships everywhere).
Used by the genai exporter's, the decode backend's and the command line's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

VOCAB = 512
PROMPT = 16  # example / calibration sequence length

# stdlib sources: plain text that every Python installation carries
TEXTS = ("os.py", "json/encoder.py", "argparse.py", "textwrap.py")


def tokenizer(vocab: int = VOCAB):
    """A byte-level BPE of ``vocab`` tokens as a transformers fast tokenizer (``<s>`` = 0,
    ``</s>`` = 1, as the model config below says)."""
    tk = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    lib = Path(os.__file__).parent
    text = [(lib / name).read_text(encoding="utf-8") for name in TEXTS]
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(text, trainer)
    assert bpe.get_vocab_size() == vocab and bpe.token_to_id("</s>") == 1
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def llama(seed: int = 0):
    """A 2-layer random Llama: hidden 64, 4 heads over 2 key/value heads (GQA), FFN 128."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def llama_folder(path: Path, seed: int = 0) -> Path:
    """:func:`llama` and :func:`tokenizer` saved in ``path`` (safetensors weights)."""
    llama(seed).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def pruned_llama(folder: Path):
    """(dense model loaded from ``folder``, example ids, result): heads 4/2 -> 2/1, FFN 128 ->
    96, uniform across layers (what a Hugging Face config holds)."""
    import fxprune

    transformers = pytest.importorskip("transformers")
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(2, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    return dense, ids, fxprune.compile(dense, ids, heads=0.5, ffn=0.25, uniform=True)
