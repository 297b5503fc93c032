"""Decode timing for the latency verifier (``backend="onnxruntime-genai"``): how fast the pruned
causal LM generates where it is served, beside the dense one.

Both models become ONNX Runtime GenAI folders (``fxprune.exporters.genai_build``: the dense
model's ``save_pretrained``, the compile result's; the model builder; tokenizer files from
the folder the model was loaded from or the backend's ``tokenizer_from``). Per batch size, each
timed call is one greedy generation: ``prompt_len`` random token ids per row (drawn from the
vocabulary, seeded by the batch size), then ``new_tokens`` new tokens. It yields two numbers:
the **time to the first token** (the prefill of the prompt and the first token) and the
**milliseconds per decode step** over the remaining ``new_tokens - 1`` tokens (each step one
token per row, reading every weight once: decode is bound by memory bandwidth, so the row's
``efficiency`` is the decode speedup times the pruned / dense bytes of the built decoders'
initializers). Calls alternate dense / pruned in rounds (``fxprune.verify.forward.rounds``),
other processes' CPU use is read around them, and the verifier judges the noise as for every
backend; a row's spread is that of the per-round medians of the decode step.

``parity`` is checked on each batch: the pruned decoder's tokens against ``generate`` of the
pruned PyTorch model (greedy, KV cache on), as the fraction of new tokens from the first one
that differs (0: identical).
"""

from __future__ import annotations

import statistics

import numpy as np

from fxprune.errors import ConfigError
from fxprune.exporters.genai_build import (
    GenaiDecoder,
    build_genai,
    causal_lm_of,
    context_length,
    hf_folder,
    hf_greedy,
    random_prompts,
    weight_bytes,
)
from fxprune.verify.forward import rounds
from fxprune.verify.latency_report import LatencyRow, median_p10_p90, spread, verdict
from fxprune.verify.latency_runners import RunContext

DECODE_NOTE = (
    "decode: ms per step (dense_ms / pruned_ms) and tokens/s after the first token, one new "
    "token per row a step; TTFT: prefill + the first token; efficiency = decode speedup x "
    "pruned/dense weight bytes"
)


class GenaiRunner:
    """One model (a Hugging Face causal LM, or a compile result) as a built ONNX Runtime GenAI
    folder in the run's workdir; ``run((prompts, new_tokens))`` generates once and returns
    ``(tokens, seconds to the first token, seconds of the rest)``."""

    def __init__(self, obj, ctx: RunContext, precision: str = "fp32", tokenizer_from=None):
        what = "the onnxruntime-genai backend"
        hf = hf_folder(obj, ctx.workdir / f"{ctx.tag}-hf", tokenizer_from, what)
        folder = ctx.workdir / f"{ctx.tag}-genai"
        build_genai(hf, folder, precision, ctx.workdir / "genai-cache")
        self.decoder = GenaiDecoder(folder, ctx.threads)
        self.weight_bytes = weight_bytes(folder)
        self.step_bytes = weight_bytes(folder, per_step=True)  # the embedding table: one row a step
        self.notes = (
            f"{ctx.tag}: ONNX Runtime GenAI {precision} decoder, "
            f"{self.weight_bytes / 1e6:.2f} MB of weights ({self.step_bytes / 1e6:.2f} MB read "
            "each decode step: the embedding table only gathered)",
        )

    def prepare(self, args):
        return args

    def run(self, prepared):
        prompts, new_tokens = prepared
        return self.decoder.generate(prompts, new_tokens)


def _timer(call, prepared, n: int) -> list[tuple[float, float]]:
    """``n`` generations: (ms to the first token, ms per decode step after it)."""
    steps = prepared[1] - 1
    out = []
    for _ in range(n):
        _, first, rest = call(prepared)
        out.append((first * 1e3, rest * 1e3 / steps))
    return out


def _check_context(models: dict, prompt_len: int, new_tokens: int) -> None:
    for name, m in models.items():
        limit = context_length(m)
        if limit is not None and prompt_len + new_tokens > limit:
            raise ConfigError(
                f"prompt_len {prompt_len} + new_tokens {new_tokens} exceed the {name} model's "
                f"context ({limit} positions, max_position_embeddings)"
            )


def decode_rows(be, dense, pruned, rep, batch_sizes, wd, mac_ratio, monitor, bar) -> None:
    """Fill ``rep.rows`` with one decode row per batch size (see the module docstring);
    ``rep`` carries threads, warm-up, repeats, ``prompt_len`` and ``new_tokens``."""
    what = f"the {be.name} backend"
    models = {"dense": causal_lm_of(dense, what), "pruned": causal_lm_of(pruned, what)}
    _check_context(models, rep.prompt_len, rep.new_tokens)
    top = max(batch_sizes)
    runners = {
        "dense": be.runner(dense, (), RunContext(rep.threads, wd, "dense", {}, top)),
        "pruned": be.runner(pruned, (), RunContext(rep.threads, wd, "pruned", {}, top)),
    }
    rep.notes.append(DECODE_NOTE)
    for r in runners.values():
        rep.notes += r.notes
    bytes_ratio = runners["pruned"].step_bytes / max(runners["dense"].step_bytes, 1)
    vocab = models["dense"].config.vocab_size
    for b in batch_sizes:
        prompts = random_prompts(vocab, b, rep.prompt_len, seed=b)
        ready = {name: (prompts, rep.new_tokens) for name in runners}
        for name, r in runners.items():
            for _ in range(rep.warmup):
                r.run(ready[name])
                bar.update()
        monitor.start()
        timed = rounds(runners, ready, rep.repeats, bar, timer=_timer)
        other, secs = monitor.stop()
        got = runners["pruned"].run(ready["pruned"])[0]
        want = hf_greedy(models["pruned"], prompts, rep.new_tokens)
        parity = _differing(want, got, rep.new_tokens)
        rep.rows.append(_row(b, timed, mac_ratio, bytes_ratio, parity, other, secs))


def _differing(want: list[list[int]], got: list[list[int]], new_tokens: int) -> float:
    """The fraction of new tokens from each row's first difference on (0: all equal)."""
    lost = 0
    for w, g in zip(want, got, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(w, g, strict=False)) if x != y), None)
        k = k if k is not None else min(len(w), len(g), new_tokens)
        lost += new_tokens - k
    return lost / (new_tokens * max(len(want), 1))


def _row(b, timed, mac_ratio, bytes_ratio, parity, other, secs) -> LatencyRow:
    """A decode row: ``dense_ms`` / ``pruned_ms`` are ms per decode step, the decode fields
    the medians of the time to the first token and the tokens/s of the batch."""
    step = {k: [[s for _, s in r] for r in v] for k, v in timed.items()}
    first = {k: [f for r in v for f, _ in r] for k, v in timed.items()}
    d = median_p10_p90([x for r in step["dense"] for x in r])
    p = median_p10_p90([x for r in step["pruned"] for x in r])
    speedup = d[0] / p[0] if p[0] else float("inf")
    eff = speedup * bytes_ratio
    med = {k: [statistics.median(r) for r in v] for k, v in step.items()}
    per_round = [a / z for a, z in zip(med["dense"], med["pruned"], strict=True) if z]
    lo, hi = np.percentile(per_round, [10, 90]) if per_round else (speedup, speedup)
    row = LatencyRow(
        b, *d, *p, speedup, mac_ratio, eff, parity, verdict(speedup, eff, "weight bytes")
    )
    row.speedup_p10, row.speedup_p90 = float(lo), float(hi)
    row.round_spread = max(spread(med["dense"]), spread(med["pruned"]))
    row.other_cpu, row.timed_s = other, secs
    row.ttft_dense_ms = statistics.median(first["dense"])
    row.ttft_pruned_ms = statistics.median(first["pruned"])
    row.dense_tokens_s = b * 1e3 / d[0] if d[0] else float("inf")
    row.pruned_tokens_s = b * 1e3 / p[0] if p[0] else float("inf")
    row.bytes_ratio = bytes_ratio
    return row
