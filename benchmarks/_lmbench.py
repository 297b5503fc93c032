"""What benchmarks/llm_quality.py measures each model on (a :class:`Bench`): the model, its
example, calibration windows, held-out windows per text, the chat prompt and how to decode it.
``tinylm``: the tiny Llama trained here on its own split; ``smollm2``: SmolLM2-135M-Instruct on
real text (python3-doc prose, stdlib code, split by file)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks import _lmeval as ev
from benchmarks import _tinylm as tl


@dataclass
class Bench:
    """A model with everything its rows are measured on."""

    name: str
    model: torch.nn.Module
    example: torch.Tensor
    calib: list[torch.Tensor]
    evals: dict[str, torch.Tensor]
    prompt: torch.Tensor | None = None
    decode: object = None  # token ids -> str
    stop: frozenset[int] = frozenset()
    uniform: bool = False
    train_stream: torch.Tensor | None = None  # tinylm: what healing trains on
    model_dir: object = None  # smollm2: the cached HF folder the peer loads
    describe: str = ""


def tinylm_bench(model, data: tl.Data, args, tok=None) -> Bench:
    """The tiny Llama on its own split (``data``); ``tok``: its tokenizer, for the prompt."""
    gen = torch.Generator().manual_seed(2)  # calibration windows: training split only
    calib = [tl.sample(data.train, gen, 1, args.seq) for _ in range(args.calib_batches)]
    prompt = decode = None
    if tok is not None:
        prompt = torch.tensor([tok.encode("def main():\n    ").ids])
        decode = tok.decode
    return Bench(
        "tinylm",
        model,
        data.train[: args.seq].unsqueeze(0).clone(),
        calib,
        {"code": tl.windows(data.heldout, args.eval_windows, args.seq)},
        prompt,
        decode,
        frozenset({data.eos}),
        uniform=False,
        train_stream=data.train,
        describe=tl.describe(data.info) if data.info else "",
    )


def smollm2_bench(args, log=print) -> Bench:
    from benchmarks import _realtext as rt
    from benchmarks import _smollm2 as sm

    model, tok = sm.load()
    model.config.use_cache = False
    texts = rt.load(tok, log=log)
    calib = rt.calibration(texts, args.calib_batches, args.seq)
    stop = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if i is not None}
    n = ev.n_params(model)
    c = model.config
    info = "; ".join(
        f"{k}: {t.info['calib_files']} calibration files ({t.info['calib_tokens']} tokens), "
        f"{t.info['heldout_files']} held-out files ({t.info['heldout_tokens']} tokens)"
        for k, t in texts.items()
    )
    return Bench(
        "smollm2",
        model,
        calib[0].clone(),
        calib,
        rt.evaluation(texts, args.eval_windows, args.seq),
        sm.chat_ids(tok),
        tok.decode,
        frozenset(stop),
        uniform=True,
        model_dir=sm.model_dir(),
        describe=(
            f"SmolLM2-135M-Instruct ({sm.WHEEL}, Q4_1 de-quantized to float32): {n / 1e6:.1f} M "
            f"params, hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
            f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV heads, MLP "
            f"{c.intermediate_size}, vocab {c.vocab_size}, tied lm_head\ntext: {info}"
        ),
    )


def load_bench(args, log=print) -> Bench:
    if args.model == "smollm2":
        return smollm2_bench(args, log)
    spec = tl.Spec(steps=args.steps, seq=args.seq)
    model, tok, data = tl.load(spec, retrain=args.retrain, eval_windows=args.eval_windows)
    model.config.use_cache = False  # as the table was measured (compile would turn it off itself)
    return tinylm_bench(model, data, args, tok)
