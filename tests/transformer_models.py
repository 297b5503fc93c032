"""Tiny transformer families built from configs with random weights (nothing is downloaded).

Each factory returns ``(model, example_inputs, info)``; ``info`` has the head count per layer
(``heads``; key/value heads under GQA, the unit the head pass removes) and the MLP width.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import randomize

HIDDEN, LAYERS, FFN = 64, 2, 128


def _hf():
    return pytest.importorskip("transformers")


def _ids(vocab=100, low=0, seq=8):
    return (torch.randint(low, vocab, (2, seq), generator=torch.Generator().manual_seed(0)),)


def tiny_llama_lm(layers: int = 2, seed: int = 0):
    """A LlamaForCausalLM of hidden 32, 4 heads over 2 KV heads, vocab 100, in eval mode."""
    T = _hf()
    cfg = T.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(cfg).eval()


def encoder_config(name: str = "Bert", hidden=HIDDEN, ffn=FFN, positions=32, **extra):
    """A tiny config of a BERT-style Hugging Face family: vocab 100, 2 layers, 4 heads."""
    return getattr(_hf(), f"{name}Config")(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=ffn,
        max_position_embeddings=positions,
        **extra,
    )


def _encoder(name: str, positions: int, low: int = 0):
    """A BERT-style encoder (no pooler) of the Hugging Face class ``<name>Model``."""
    T = _hf()
    c = encoder_config(name, positions=positions)
    info = {"heads": 4, "ffn": FFN, "load_kw": {"add_pooling_layer": False}}
    return getattr(T, f"{name}Model")(c, add_pooling_layer=False), _ids(low=low), info


def bert():
    return _encoder("Bert", 32)


def roberta():
    return _encoder("Roberta", 40, low=3)  # ids 0-2 are special tokens with padding positions


def gpt2():
    T = _hf()
    c = T.GPT2Config(
        vocab_size=100,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=4,
        n_positions=32,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return T.GPT2Model(c), _ids(), {"heads": 4, "ffn": 4 * HIDDEN}


def _decoder(cls_name, cfg_name, heads=8, kv=2, **extra):
    T = _hf()
    c = getattr(T, cfg_name)(
        vocab_size=100,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=FFN,
        max_position_embeddings=32,
        use_cache=False,
        **extra,
    )
    return getattr(T, cls_name)(c), _ids(), {"heads": kv, "ffn": FFN}


def llama():
    return _decoder("LlamaModel", "LlamaConfig")


def mistral():
    return _decoder("MistralModel", "MistralConfig", kv=4, sliding_window=None)


def qwen2():
    return _decoder("Qwen2Model", "Qwen2Config")


def hf_vit():
    T = _hf()
    c = T.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=FFN,
    )
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    info = {"heads": 4, "ffn": FFN, "load_kw": {"add_pooling_layer": False}}
    return T.ViTModel(c, add_pooling_layer=False), (x,), info


def tv_vit():
    tv = pytest.importorskip("torchvision")
    m = tv.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=LAYERS, num_heads=4, hidden_dim=HIDDEN, mlp_dim=FFN
    )
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return m, (x,), {"heads": 4, "ffn": FFN}


def tv_swin_t():
    tv = pytest.importorskip("torchvision")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return tv.models.swin_t(), (x,), {"heads": 3, "ffn": 384}  # first stage


def timm_vit_tiny():
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=LAYERS)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return m, (x,), {"heads": 3, "ffn": 768}


HF = {
    "bert": bert,
    "roberta": roberta,
    "gpt2": gpt2,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "hf_vit": hf_vit,
}
FAMILIES = {**HF, "tv_vit": tv_vit, "tv_swin_t": tv_swin_t, "timm_vit_tiny": timm_vit_tiny}


def build(name: str):
    torch.manual_seed(0)
    model, x, info = FAMILIES[name]()
    return randomize(model), x, info
