"""A small Llama-style causal LM trained here, on a CPU, on real text: the Python standard
library's own source files. Nothing is downloaded.

- data: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` except test suites and
  ``site-packages``, read as UTF-8, sorted by relative path; every 20th file (positions 0, 20,
  40, ... of the sorted list) is held out, the other 95 % train. Files are joined with an
  ``<|endoftext|>`` token.
- tokenizer: byte-level BPE (the ``tokenizers`` package), 4096 tokens, trained on the training
  files only.
- model: ``LlamaForCausalLM``, hidden 256, 8 layers, 8 query heads over 4 key/value heads (GQA),
  SwiGLU MLP 1024, untied embeddings, ``use_cache=False``:
  about 10 M parameters.
- training: AdamW, next-token loss on random 128-token windows of the training stream, batch 16,
  one thread, fixed seed.

The trained model, the tokenizer and the token streams are cached in
``~/.cache/fxprune/tinylm-<hash>/`` (the hash covers the whole spec and the file list), and
rebuilt when missing. ``python benchmarks/_tinylm.py`` trains (or loads) it and prints the
numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

CACHE = Path(os.environ.get("FXPRUNE_CACHE", Path.home() / ".cache" / "fxprune"))
EOS = "<|endoftext|>"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class Spec:
    """Everything that decides the trained model; its hash names the cache directory."""

    vocab: int = 4096
    hidden: int = 256
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 1024
    seq: int = 128
    batch: int = 16
    steps: int = 400
    lr: float = 2e-3
    warmup: int = 40
    weight_decay: float = 0.1
    seed: int = 0
    heldout_every: int = 20
    data: str = "python-stdlib *.py minus test suites, utf-8"
    version: int = 1  # bump when the training code changes meaning


@dataclass
class Data:
    """Token streams (1-D int64) of the training and held-out files."""

    train: torch.Tensor
    heldout: torch.Tensor
    eos: int
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------- data


def stdlib_files() -> tuple[Path, list[str]]:
    """(stdlib root, sorted relative paths of its non-test ``*.py`` files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = []
    for p in root.rglob("*.py"):
        r = p.relative_to(root)
        if SKIP_DIRS.isdisjoint(r.parts[:-1]) and p.is_file():
            rel.append(r.as_posix())
    return root, sorted(rel)


def split(rel: list[str], every: int) -> tuple[list[str], list[str]]:
    """(train, held-out): every ``every``-th file of the sorted list is held out."""
    held = [r for i, r in enumerate(rel) if i % every == 0]
    train = [r for i, r in enumerate(rel) if i % every != 0]
    return train, held


def read(root: Path, rel: list[str]) -> list[str]:
    return [(root / r).read_bytes().decode("utf-8", errors="replace") for r in rel]


def spec_hash(spec: Spec) -> str:
    root, rel = stdlib_files()
    sizes = [(r, (root / r).stat().st_size) for r in rel]
    blob = json.dumps(
        {"spec": asdict(spec), "python": sys.version.split()[0], "files": sizes}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_dir(spec: Spec) -> Path:
    return CACHE / f"tinylm-{spec_hash(spec)}"


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok, texts: list[str]) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    for t in texts:
        out += tok.encode(t).ids
        out.append(eos)
    return torch.tensor(out, dtype=torch.int64)


def build_data(spec: Spec, d: Path):
    """Train the tokenizer on the training files and encode both splits into ``d``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core stays free
    from tokenizers import Tokenizer

    root, rel = stdlib_files()
    tr, ho = split(rel, spec.heldout_every)
    if (d / "tokenizer.json").exists() and (d / "tokens.pt").exists():
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        blob = torch.load(d / "tokens.pt", weights_only=True)
        return tok, Data(blob["train"].long(), blob["heldout"].long(), tok.token_to_id(EOS))
    t0 = time.perf_counter()
    train_texts = read(root, tr)
    tok = train_tokenizer(train_texts, spec.vocab)
    train_ids, held_ids = encode(tok, train_texts), encode(tok, read(root, ho))
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    torch.save(
        {"train": train_ids.to(torch.int16), "heldout": held_ids.to(torch.int16)}, d / "tokens.pt"
    )
    print(
        f"tokenizer + encoding: {time.perf_counter() - t0:.0f} s; {len(tr)} train files "
        f"({train_ids.numel()} tokens), {len(ho)} held-out files ({held_ids.numel()} tokens)",
        flush=True,
    )
    return tok, Data(train_ids, held_ids, tok.token_to_id(EOS))


# ---------------------------------------------------------------- model, loss, training


def make_model(spec: Spec, eos: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=2 * spec.seq,
        tie_word_embeddings=False,
        use_cache=False,  # as measured; compile now turns the cache off for its capture itself
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(cfg)


def logits_of(out) -> torch.Tensor:
    """The logits of what a (dense or pruned) causal LM returns: a ModelOutput or a tuple."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


def lm_loss(module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the window (position t predicts token t + 1)."""
    logits = logits_of(module(ids))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def sample(stream: torch.Tensor, gen: torch.Generator, batch: int, seq: int) -> torch.Tensor:
    """``batch`` random windows of ``seq`` tokens from ``stream``."""
    starts = torch.randint(0, stream.numel() - seq, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq] for s in starts.tolist()])


def windows(stream: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """``n`` evenly spaced, non-overlapping windows of ``seq`` tokens: the evaluation set."""
    if n * seq > stream.numel():
        raise ValueError(f"{n} windows of {seq} tokens need more than {stream.numel()} tokens")
    step = (stream.numel() - seq) // max(n - 1, 1)
    return torch.stack([stream[i * step : i * step + seq] for i in range(n)])


@torch.no_grad()
def perplexity(module, wins: torch.Tensor, batch: int = 16) -> float:
    """exp of the mean next-token NLL over every predicted token of ``wins``."""
    tot, cnt = 0.0, 0
    for i in range(0, len(wins), batch):
        x = wins[i : i + batch]
        logits = logits_of(module(x)).float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        tot, cnt = tot + nll.item(), cnt + x[:, 1:].numel()
    return math.exp(tot / cnt)


def train(
    module,
    stream: torch.Tensor,
    steps: int,
    *,
    batch: int,
    seq: int,
    lr: float,
    warmup: int,
    weight_decay: float = 0.1,
    seed: int = 0,
    log_every: int = 50,
    label: str = "train",
) -> float:
    """AdamW next-token training with linear warm-up and cosine decay to 10 % of ``lr``; works on
    an ``nn.Module`` or a pruned GraphModule (it never calls ``.train()``: Llama has no dropout,
    so eval mode trains the same). Returns the mean loss of the last 20 steps."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def factor(s):
        if s < warmup:
            return (s + 1) / warmup
        t = (s - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for s in range(steps):
        x = sample(stream, gen, batch, seq)
        loss = lm_loss(module, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and ((s + 1) % log_every == 0 or s + 1 == steps):
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(
                f"  [{label}] step {s + 1}/{steps}: loss {recent:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    opt.zero_grad(set_to_none=True)
    tail = losses[-20:]
    return sum(tail) / len(tail) if tail else float("nan")


def load(spec: Spec = Spec(), retrain: bool = False, eval_windows: int = 128):
    """(model in eval mode, tokenizer, Data): from the cache, or trained now and cached.

    ``Data.info`` holds the training record (time, final train loss, held-out perplexity)."""
    from transformers import LlamaForCausalLM

    d = cache_dir(spec)
    tok, data = build_data(spec, d)
    info_path = d / "train_info.json"
    if info_path.exists() and (d / "model" / "config.json").exists() and not retrain:
        model = LlamaForCausalLM.from_pretrained(d / "model", dtype=torch.float32).eval()
        data.info = json.loads(info_path.read_text())
        data.info["cache"] = str(d)
        return model, tok, data
    model = make_model(spec, data.eos)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"training tiny Llama ({n / 1e6:.2f} M params) for {spec.steps} steps of "
        f"{spec.batch}x{spec.seq} tokens on {torch.get_num_threads()} thread(s)...",
        flush=True,
    )
    t0 = time.perf_counter()
    loss = train(
        model,
        data.train,
        spec.steps,
        batch=spec.batch,
        seq=spec.seq,
        lr=spec.lr,
        warmup=spec.warmup,
        weight_decay=spec.weight_decay,
        seed=spec.seed,
    )
    secs = time.perf_counter() - t0
    model.eval()
    ppl = perplexity(model, windows(data.heldout, eval_windows, spec.seq))
    model.save_pretrained(d / "model")
    _, rel = stdlib_files()
    tr, ho = split(rel, spec.heldout_every)
    data.info = {
        "spec": asdict(spec),
        "params": n,
        "train_seconds": round(secs, 1),
        "threads": torch.get_num_threads(),
        "final_train_loss": round(loss, 4),
        "heldout_ppl": round(ppl, 3),
        "heldout_windows": eval_windows,
        "train_files": len(tr),
        "heldout_files": len(ho),
        "train_tokens": int(data.train.numel()),
        "heldout_tokens": int(data.heldout.numel()),
        "stdlib": sysconfig.get_paths()["stdlib"],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    info_path.write_text(json.dumps(data.info, indent=1))
    data.info["cache"] = str(d)
    return model, tok, data


def describe(info: dict) -> str:
    s = info["spec"]
    return (
        f"tiny Llama: {info['params'] / 1e6:.2f} M params (hidden {s['hidden']}, {s['layers']} "
        f"layers, {s['heads']} heads / {s['kv_heads']} KV heads, MLP {s['intermediate']}, "
        f"vocab {s['vocab']} byte-level BPE); trained {s['steps']} steps x {s['batch']}x"
        f"{s['seq']} tokens on {info['train_files']} stdlib files ({info['train_tokens']} "
        f"tokens) in {info['train_seconds']:.0f} s ({info['threads']} thread); final train loss "
        f"{info['final_train_loss']:.3f}; held-out ppl {info['heldout_ppl']:.2f} "
        f"({info['heldout_files']} held-out files, {info['heldout_tokens']} tokens)"
    )


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=Spec.steps)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, _, data = load(Spec(steps=a.steps), retrain=a.retrain)
    print(describe(data.info))
    print("cache:", data.info["cache"])


if __name__ == "__main__":
    main()
