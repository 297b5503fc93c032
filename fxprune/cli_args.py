"""The ``fxprune`` command line's arguments: every subcommand's flags, spelled once, and the
examples ``--help`` prints. ``fxprune.cli`` parses them and ``fxprune.cli_commands`` runs what
they ask for."""

from __future__ import annotations

import argparse

EXAMPLES = """model sources:
  torchvision:NAME | timm:NAME        random weights, nothing downloaded
  hf:CONFIG_OR_LOCAL_DIR              a Hugging Face folder (its safetensors weights when present,
                                      else random weights from config.json), a config.json, or a
                                      model type such as hf:bert (that family's default config,
                                      full size: hf:llama would be 6.7B parameters)
  path/to/file.py:factory             factory() returns (model, example_input); runs the
                                      file, so it needs --trust
  checkpoint.pt                       written by `fxprune prune --save`: plan, state_dict and the
                                      proof it ran, which export / verify reuse (--reprove: prove
                                      again) when its source rebuilds the weights it proved

examples:
  fxprune prune torchvision:resnet50 --channels 0.5 --ignore fc
  fxprune prune torchvision:resnet50 --channels 0.3 --round-to 4 --sparsity 2:4 --save r50.pt
  fxprune prune torchvision:resnet50 --channels 0.3 --ignore fc --print-recipe > r.json
  fxprune prune torchvision:resnet50 --recipe r.json --save r50.pt
  fxprune prune hf:./llama-dir --heads 0.25 --ffn 0.25 --save-pretrained ./llama-pruned
  fxprune prune hf:./llama-7b --heads 0.25 --ffn 0.25 --stream --save-pretrained ./out
  fxprune export r50.pt -o r50.onnx
  fxprune export hf:./llama-dir --heads 0.25 --ffn 0.25 --format genai -o ./llama-genai
  fxprune verify r50.pt --batch 1 8 --threads 2 --fail-if-slower --report r50.html
  fxprune estimate torchvision:resnet50 --unstructured 0.9 --channels 0.5 --ignore fc --measure
  fxprune inspect torchvision:mobilenet_v3_small
  fxprune inspect r50.onnx
  fxprune prune hf:bert --heads 0.25 --ffn 0.3 --json
  fxprune prune my_model.py:build --trust --channels 0.5 --importance l2
  fxprune verify torchvision:resnet50 --channels 0.5 --round-to 8 --ignore fc --batch 1 8
  fxprune verify hf:./llama-dir --heads 0.25 --backend onnxruntime-genai --batch 1 \
      --prompt-len 128 --new-tokens 64
"""


class Parser(argparse.ArgumentParser):
    """Flags are spelled in kebab-case (``--round-to``); the snake_case spelling
    (``--round_to``, what earlier releases used for most flags) still parses, as a hidden alias
    of the same option."""

    def add_argument(self, *names, **kw):
        if names and all(n.startswith("-") for n in names):
            kebab = [n.replace("_", "-") if n.startswith("--") else n for n in names]
            snake = ["--" + n[2:].replace("-", "_") for n in kebab if n.startswith("--")]
            names = tuple(dict.fromkeys(kebab + snake))
        return super().add_argument(*names, **kw)


class HelpFormatter(argparse.RawTextHelpFormatter):
    """``--help`` shows each flag's kebab-case spelling only."""

    def _format_action_invocation(self, action):
        shown = [o for o in action.option_strings if not (o.startswith("--") and "_" in o)]
        if not action.option_strings or shown == action.option_strings:
            return super()._format_action_invocation(action)
        hidden = argparse.Action(shown, action.dest, nargs=action.nargs, metavar=action.metavar)
        hidden.default, hidden.choices = action.default, action.choices
        return super()._format_action_invocation(hidden)


def _round_to(s: str):
    """``--round-to 8`` or ``--round-to auto``."""
    if s == "auto":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: an integer or 'auto'") from None


def _number(s: str):
    """``"2"`` -> 2 (a count), ``"0.25"`` -> 0.25 (a fraction)."""
    return int(s) if s.isdigit() else float(s)


class _BatchSizes(argparse.Action):
    """``--batch`` of verify / estimate: the batch sizes timed; given, the first is also the
    example's batch (the default list leaves the source's example as it is)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.batch_given = True


def _add_source(pr) -> None:
    pr.add_argument(
        "model",
        help="torchvision:NAME, timm:NAME, hf:CONFIG_OR_DIR, path/file.py:factory or a "
        "checkpoint.pt from `fxprune prune --save`",
    )
    pr.add_argument(
        "--trust",
        action="store_true",
        help="allow pickled code in checkpoints, a file.py:factory source, and the code an hf: "
        "folder's config.json auto_map names (transformers' trust_remote_code)",
    )
    pr.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs")
    shape = "example input shape, e.g. 1 3 224 224 (default: the source's)"
    pr.add_argument("--input-shape", type=int, nargs="+", metavar="N", help=shape)
    seq = "example sequence length of token-id / attention-mask inputs (default: hf: 128)"
    pr.add_argument("--seq-len", type=int, help=seq)
    pr.add_argument("--mode", default="auto", choices=["auto", "fx", "export"])
    pr.add_argument("--json", action="store_true", help="one JSON object on stdout")
    pr.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _add_pruning(pr, unstructured: bool = True) -> None:
    _add_source(pr)
    if unstructured:  # estimate's --unstructured is the sparsity it prices, not one it applies
        _add_unstructured(pr)
    pr.add_argument(
        "--channels",
        type=float,
        default=None,
        help="fraction removed per group (default 0.5; 0 with --heads/--ffn/--blocks/--unstructured)",
    )
    pr.add_argument(
        "--heads",
        type=_number,
        default=0,
        help="fraction (or number) of heads per layer, counted in key/value groups: with 2 KV heads\n"
        "(grouped-query attention) 0.25 removes nothing, 0.5 removes one group",
    )
    pr.add_argument(
        "--heads-round",
        choices=["config"],
        default=None,
        help="with --save-pretrained: round a head count the Hugging Face config class refuses\n"
        "(LlamaConfig: hidden_size a multiple of the heads) to the nearest it accepts",
    )
    pr.add_argument("--ffn", type=float, default=0.0, help="fraction of MLP neurons per layer")
    pr.add_argument(
        "--blocks", nargs="*", default=[], help="a number of blocks to remove, or their names"
    )
    pr.add_argument("--block-importance", default="cosine", choices=["cosine", "l2"])
    pr.add_argument(
        "--experts",
        type=_number,
        default=0,
        help="fraction (or number) of each mixture-of-experts layer's routed experts to remove",
    )
    pr.add_argument("--expert-importance", default="weight", choices=["weight", "frequency"])
    pr.add_argument(
        "--importance",
        default="auto",
        help="auto (activation with calibration data, else l1), l1, l2, bn_scale, fpgm, lamp,"
        " random, taylor, activation, entropy or confidence (learned needs a train_fn: Python only)",
    )
    pr.add_argument("--ignore", nargs="*", default=[], help="module names whose outputs stay")
    pr.add_argument(
        "--round-to",
        type=_round_to,
        default=None,
        help="an integer (default 1, M with --sparsity)"
        " or auto: the count the layers run fastest at on --round-backend",
    )
    pr.add_argument("--round-backend", default="torch", choices=["torch", "onnxruntime"])
    pr.add_argument("--global-ranking", action="store_true")
    pr.add_argument("--allow-approximate", action="store_true")
    _add_nm(pr)
    pr.add_argument("--load", help="apply this checkpoint to the model instead of pruning")
    pr.add_argument(
        "--recipe",
        metavar="FILE",
        help="prune by this recipe (JSON, fxprune.Recipe) instead of the pruning flags",
    )


def _add_unstructured(pr) -> None:
    pr.add_argument("--unstructured", type=float, default=0.0, help="fraction of weights zeroed")
    pr.add_argument("--unstructured-scope", default="layer", choices=["layer", "global"])
    pr.add_argument("--unstructured-method", default="magnitude", choices=["magnitude", "wanda"])
    pr.add_argument("--unstructured-exclude", nargs="*", default=[], help="kept dense")


def _add_nm(pr) -> None:
    pr.add_argument("--sparsity", help="N:M pattern after channel pruning, e.g. 2:4")
    pr.add_argument("--sparsity-exclude", nargs="*", default=[], help="modules kept dense")
    pr.add_argument(
        "--sparsity-method",
        default="magnitude",
        choices=["magnitude", "wanda", "sparsegpt"],
        help="how N:M picks weights (wanda / sparsegpt use the example input as calibration)",
    )
    pr.add_argument(
        "--sparsity-permute",
        action="store_true",
        help="reorder channels first so the N:M mask keeps more weight magnitude",
    )


def _add_example_batch(pr) -> None:
    pr.add_argument(
        "--batch", type=int, default=None, help="example batch size (default: the source's)"
    )


def _add_genai(pr) -> None:
    pr.add_argument(
        "--precision",
        default=None,
        help="ONNX Runtime GenAI decoder weights: fp32 (default) or int4 (fp16 does not run on "
        "its CPU provider)",
    )
    pr.add_argument(
        "--tokenizer-from",
        metavar="DIR",
        default=None,
        help="ONNX Runtime GenAI: copy the tokenizer files from DIR (default: the model's folder)",
    )


def _add_timing(pr, batch_default) -> None:
    pr.add_argument(
        "--backend",
        default="onnxruntime",
        help="onnxruntime, torch, torch-compile, torch-cuda (GPU, 2:4 sparse), tensorrt (GPU) "
        "or onnxruntime-genai (decode of a Hugging Face causal LM: TTFT and tokens/s)",
    )
    pr.add_argument(
        "--prompt-len",
        type=int,
        default=None,
        help="decode backends: prompt tokens per row (default 128)",
    )
    pr.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="decode backends: greedy tokens generated after the prompt (default 64)",
    )
    pr.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=batch_default,
        action=_BatchSizes,
        help="batch sizes timed (default 1 8); when given, the first is the example's batch",
    )
    pr.add_argument("--warmup", type=int, default=5, help="untimed calls per model and batch")
    pr.add_argument("--repeats", type=int, default=30, help="timed calls per model and batch")
    pr.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all)")
    pr.add_argument(
        "--semi-structured",
        dest="semi_structured",
        choices=("measured", "all", "off"),
        default=None,
        help="torch-cuda: which 2:4 weights become semi-structured sparse tensors (default "
        "measured: those whose Linear timed faster sparse; all; off)",
    )


def _add_verify(ve) -> None:
    _add_pruning(ve)
    ve.add_argument("--reprove", action="store_true", help="prove again, not reuse a stored proof")
    _add_timing(ve, [1, 8])
    _add_genai(ve)
    ve.add_argument(
        "--fail-if-slower", dest="fail_if_slower", action="store_true", help="exit 1 if slower"
    )
    ve.add_argument(
        "--min-speedup", dest="min_speedup", type=float, default=None, help="exit 1 below this"
    )
    ve.add_argument(
        "--fail-if-noisy",
        dest="fail_if_noisy",
        action="store_true",
        help="exit 1 when the timing was noisy (other processes' CPU use, spread between rounds)",
    )
    ve.add_argument("--report", help="write a self-contained HTML report here")
    ve.add_argument(
        "--export",
        help="when every check passed, export the pruned model (.onnx or .engine) with the "
        "proof and the latency measured in its metadata",
    )


def _add_export(ex) -> None:
    _add_pruning(ex)
    ex.add_argument("--reprove", action="store_true", help="prove again, not reuse a stored proof")
    ex.add_argument(
        "-o",
        "--out",
        required=True,
        help="model.onnx, model.engine (TensorRT), or a folder with --format genai",
    )
    ex.add_argument(
        "--format",
        default=None,
        help="onnx, tensorrt or genai (an ONNX Runtime GenAI decoder folder with its KV cache, "
        "checked token for token against generate); default: by the -o suffix",
    )
    ex.add_argument("--fp32", action="store_true", help="TensorRT: build an fp32 engine")
    _add_genai(ex)
    ex.add_argument(
        "--overwrite", action="store_true", help="--format genai: replace a non-empty -o folder"
    )
    _add_example_batch(ex)


def _add_estimate(es) -> None:
    _add_pruning(es, unstructured=False)
    _add_timing(es, [1, 8])
    es.add_argument("--unstructured", type=float, default=0.9, help="sparsity s (0: skip)")
    es.add_argument("--nm", default="2:4", help="'2:4' or 'none'")
    es.add_argument("--hardware", nargs="+", default=["A100", "H100", "L4", "cpu"], help="profiles")
    es.add_argument("--dtype", choices=["fp32", "fp16", "int8"], default=None)
    es.add_argument("--exclude", nargs="*", default=[], help="modules kept dense by 2:4/unstr.")
    es.add_argument("--roofline-top", type=int, default=5, help="layers per roofline table")
    es.add_argument(
        "--measure", action="store_true", help="also time the structured model and compare"
    )
    es.add_argument("--compare-with", help="profile the measurement is compared to")
    es.add_argument("--report", help="write a self-contained HTML report here")


def parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    p = Parser(
        prog="fxprune",
        description="Structural pruning with proof, honest speed numbers and estimates.",
        epilog=EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, help_):
        return sub.add_parser(
            name, help=help_, description=help_, epilog=EXAMPLES, formatter_class=fmt
        )

    pr = add("prune", "prune channels, heads, FFN neurons, blocks (+ N:M); prove equivalence")
    _add_pruning(pr)
    pr.add_argument("--save", help="write plan + state_dict, the model source and the proof here")
    pr.add_argument(
        "--compress",
        choices=["bitmask", "csr"],
        help="--save stores the masked (unstructured / N:M) weights compactly",
    )
    pr.add_argument(
        "--print-recipe",
        action="store_true",
        help="print the recipe the pruning flags build (JSON, for --recipe) and stop",
    )
    pr.add_argument(
        "--save-pretrained",
        metavar="DIR",
        help="Hugging Face models: write a folder from_pretrained opens without fxprune "
        "(config with the new counts, safetensors, tokenizer files); implies uniform counts",
    )
    pr.add_argument(
        "--overwrite",
        action="store_true",
        help="--save-pretrained may replace the folder the model was loaded from (refused "
        "otherwise; any other folder is replaced atomically, keeping files a save does not own)",
    )
    pr.add_argument(
        "--stream",
        action="store_true",
        help="hf:DIR decoder LMs (Llama, Mistral, Qwen2/3) with --save-pretrained: prune block "
        "by block from the safetensors shards, holding about one block in memory (wanda / "
        "sparsegpt / activation calibrate on --batch random token batches of --seq-len); chosen\n"
        "without the flag when the whole model would not fit in the memory available",
    )
    pr.add_argument("--no-stream", action="store_true", help="never stream (see --stream)")
    pr.add_argument("--export", help="export the pruned model (.onnx or .engine), checked")
    _add_example_batch(pr)
    pr.add_argument("--report", help="write a self-contained HTML report here")

    _add_export(
        add(
            "export",
            "prune (or open a checkpoint), prove, export ONNX, a TensorRT engine or an ONNX "
            "Runtime GenAI folder",
        )
    )

    _add_verify(add("verify", "measure pruned vs dense latency on a backend, side by side"))

    _add_estimate(add("estimate", "price unstructured vs 2:4 vs structured pruning per hardware"))

    ins = add(
        "inspect",
        "show the dependency groups and the barriers that keep channels; for FILE.onnx, the "
        "hand-off metadata fxprune wrote into it (exit 1: its plan was changed)",
    )
    _add_source(ins)
    ins.add_argument("--allow-approximate", action="store_true")
    ins.add_argument("--top", type=int, default=30, help="groups and barriers shown")
    ins.add_argument("--all", action="store_true", help="show every group and barrier")
    _add_example_batch(ins)
    return p
