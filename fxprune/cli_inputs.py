"""The command line's inputs: the model a source names (built, or opened from a checkpoint that
names its source), pruned by the flags, by ``--recipe`` or by ``--load``'s checkpoint, and its
example reshaped by ``--input-shape``, ``--seq-len`` and ``--batch``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def fit(t, dim: int, n: int):
    """``t`` with ``n`` entries along ``dim``: its own repeated, or cut (ids stay ids, a mask a
    mask)."""
    from fxprune.errors import ConfigError

    if n < 1 or t.shape[dim] == 0:
        raise ConfigError(f"cannot make an example input of size {n} along dim {dim}")
    reps = [1] * t.ndim
    reps[dim] = -(-n // t.shape[dim])
    return t.repeat(*reps).narrow(dim, 0, n).contiguous()


def shaped(a, model, x):
    """The source's example input with ``--input-shape`` (every input of the first input's
    shape; a float input is drawn anew), ``--seq-len`` (dim 1 of integer 2-D inputs: token ids,
    masks) and ``--batch`` (dim 0 of every input) applied, in that order."""
    import torch

    from fxprune.errors import ConfigError

    shape, seq, batch = getattr(a, "input_shape", None), getattr(a, "seq_len", None), a.batch
    if isinstance(batch, list):  # verify / estimate: the first batch size timed, when given
        batch = batch[0] if getattr(a, "batch_given", False) else None
    if not (shape or seq or batch):
        return x
    single = isinstance(x, torch.Tensor)
    args = [x] if single else list(x)
    tensors = [i for i, t in enumerate(args) if isinstance(t, torch.Tensor) and t.ndim]
    if shape:
        first = args[tensors[0]].shape if tensors else None
        g = torch.Generator().manual_seed(a.seed)
        for i in (i for i in tensors if args[i].shape == first):
            t = args[i]
            if t.is_floating_point():
                args[i] = torch.randn(shape, generator=g, dtype=t.dtype)
            elif len(shape) == t.ndim:
                for d, n in enumerate(shape):
                    t = fit(t, d, n)
                args[i] = t
            else:
                raise ConfigError(
                    f"--input-shape {' '.join(map(str, shape))}: the example input is a "
                    f"{t.ndim}-D integer tensor (token ids): give {t.ndim} sizes, or use "
                    "--batch and --seq-len"
                )
    if seq:
        text = [i for i in tensors if args[i].ndim == 2 and not args[i].is_floating_point()]
        if not text:
            raise ConfigError(
                "--seq-len: the example has no token-id input (an integer (batch, sequence) "
                "tensor); use --input-shape"
            )
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and seq > limit:
            raise ConfigError(f"--seq-len {seq} exceeds max_position_embeddings ({limit})")
        for i in text:
            args[i] = fit(args[i], 1, seq)
    for i in tensors if batch else ():
        args[i] = fit(args[i], 0, batch)
    return args[0] if single else tuple(args)


def _blocks(values: list[str]):
    if len(values) == 1 and values[0].isdigit():
        return int(values[0])  # a count
    return [int(v) if v.lstrip("-").isdigit() else v for v in values]


def is_checkpoint(spec: str) -> bool:
    """A ``.pt`` / ``.pth`` path (a missing one too, so that it is reported as missing)."""
    p = Path(spec)
    return p.suffix in (".pt", ".pth") and (p.exists() or ":" not in spec)


def portable(spec: str) -> str:
    """The source as a checkpoint should record it: a factory file by its absolute path."""
    kind, sep, name = spec.partition(":")
    if sep and kind.endswith(".py"):
        return f"{Path(kind).resolve()}:{name}"
    if kind == "hf" and Path(name).exists():
        return f"hf:{Path(name).resolve()}"
    return spec


@dataclass
class Opened:
    """A checkpoint a command opened: its path, what it holds (read once, digests checked) and
    the source the dense model was built from (what a proof it stores must have proved, see
    ``fxprune.stored_proof``)."""

    path: str
    ckpt: dict
    source: dict


def open_checkpoint(path: str, trust: bool):
    """(dense model, example input, CompileResult, :class:`Opened`) from a checkpoint that names
    its source; the file is read and its digests checked once."""
    import torch

    from fxprune.errors import CheckpointError, ConfigError
    from fxprune.models import load_model
    from fxprune.plan import read_checkpoint
    from fxprune.replay import restore

    ckpt = read_checkpoint(path, trust)
    src = ckpt.get("source")
    if src and not (isinstance(src, dict) and isinstance(src.get("model"), str)):
        raise CheckpointError(f"{path}: its 'source' entry is malformed: {src!r:.80}")
    if not src:
        raise ConfigError(
            f"{path} does not name the model it was pruned from (saved by the Python API); "
            f"give the dense model and the checkpoint: fxprune verify SOURCE --load {path}"
        )
    kind = src["model"].partition(":")[0]
    if kind.endswith(".py") and not trust:
        raise ConfigError(
            f"{path} names the factory {src['model']!r}: opening it runs that Python file; "
            "pass --trust if you trust it"
        )
    torch.manual_seed(src.get("seed", 0))
    model, x = load_model(src["model"], trust=trust)
    return model, x, restore(ckpt, path, model), Opened(path, ckpt, src)


@contextlib.contextmanager
def blame_inputs(model, x):
    """A TraceError from a model whose own forward rejects the example inputs is about the
    inputs, not about tracing: say so (with their shapes) rather than suggest leaf_modules."""
    from fxprune.errors import TraceError
    from fxprune.models import check_example

    try:
        yield
    except TraceError:
        check_example(model, x)
        raise


def compile_source(a, log: Callable[[str | None], None]):
    """(dense model, example input, CompileResult, the :class:`Opened` checkpoint or None) from
    a checkpoint, ``--load`` or the flags."""
    import torch

    from fxprune.models import load_model

    if is_checkpoint(a.model):
        log(f"opening {a.model}")
        model, x, res, opened = open_checkpoint(a.model, a.trust)
        return model, shaped(a, model, x), res, opened
    log(f"building {a.model}")
    torch.manual_seed(a.seed)
    model, x = load_model(a.model, trust=a.trust)
    flag = hf_folder_flag(a)
    if flag and not hasattr(model, "save_pretrained"):
        from fxprune.errors import ConfigError

        raise ConfigError(
            f"{flag}: {a.model} is a {type(model).__name__}, not a Hugging Face model; "
            + (
                "use --save for an fxprune checkpoint"
                if flag == "--save-pretrained"
                else "ONNX Runtime GenAI builds decoders from Hugging Face causal LMs"
            )
        )
    x = shaped(a, model, x)
    if getattr(a, "load", None):
        from fxprune.plan import read_checkpoint
        from fxprune.replay import restore

        log(f"applying {a.load}")
        ckpt = read_checkpoint(a.load, a.trust)
        opened = Opened(a.load, ckpt, {"model": portable(a.model), "seed": a.seed})
        return model, x, restore(ckpt, a.load, model), opened
    structural = a.heads or a.ffn or a.blocks or a.experts or getattr(a, "recipe", None)
    structural = structural or unstructured_flags(a).get("unstructured")  # a target too
    channels = a.channels if a.channels is not None else (0.0 if structural else 0.5)
    log("tracing and pruning")
    with blame_inputs(model, x):
        res = _prune_flags(a, model, x, channels)
    return model, x, res, None


def timing_folder(a, model, res, x):
    """``verify --export FILE.onnx`` timed on onnxruntime: a temporary folder for the timing's
    ONNX files, whose ``pruned.onnx`` the export then copies (``written=``) rather than capture
    the module again; None where that file is not the one the export would write (another
    backend or format, or an example unlike the plan's, which the export traces on)."""
    import tempfile

    from fxprune.exporters import exporter_for
    from fxprune.graph.trace import as_args

    if not getattr(a, "export", None) or a.timing is not None or a.backend != "onnxruntime":
        return None
    if exporter_for(a.export, None).format != "onnx":
        return None

    def spec(args):
        return [(tuple(t.shape), t.dtype) if hasattr(t, "shape") else t for t in args]

    if spec(as_args(x, model)) != spec(res.plan.example_inputs()):
        return None
    return tempfile.TemporaryDirectory(prefix="fxprune-verify-")


def unstructured_flags(a) -> dict:
    """``--unstructured*`` (not on ``estimate``, whose ``--unstructured`` is a priced sparsity)."""
    if not hasattr(a, "unstructured_scope"):
        return {}
    keys = ("unstructured", "unstructured_scope", "unstructured_method", "unstructured_exclude")
    return {k: getattr(a, k) for k in keys}


def flag_options(a, channels: float) -> dict:
    """The compile options the pruning flags spell (what a recipe holds)."""
    return {
        "channels": channels,
        "heads": a.heads,
        "ffn": a.ffn,
        "blocks": _blocks(a.blocks) if a.blocks else 0,
        "block_importance": a.block_importance,
        "experts": a.experts,
        "expert_importance": a.expert_importance,
        "importance": a.importance,
        "ignore": a.ignore,
        "round_to": a.round_to,
        "round_backend": a.round_backend,
        "global_ranking": a.global_ranking,
        "allow_approximate": a.allow_approximate,
        "mode": a.mode,
        "seed": a.seed,
        "sparsity": a.sparsity,
        "sparsity_exclude": a.sparsity_exclude,
        "sparsity_permute": a.sparsity_permute,
        "sparsity_method": a.sparsity_method,
        **unstructured_flags(a),
        "uniform": hf_folder_flag(a) is not None,  # what a HF config can hold
        "heads_round": getattr(a, "heads_round", None),
    }


def hf_folder_flag(a) -> str | None:
    """The flag that writes the pruned model as a Hugging Face folder (so the counts must be
    uniform and the model a Hugging Face one), or None."""
    if getattr(a, "save_pretrained", None):
        return "--save-pretrained"
    if getattr(a, "format", None) == "genai":
        return "--format genai"
    if getattr(a, "backend", None) == "onnxruntime-genai":
        return "--backend onnxruntime-genai"
    return None


def export_options(a) -> dict:
    """The exporter options ``fxprune export``'s flags spell: ``--format``, TensorRT's
    ``--fp32``, and genai's ``--precision`` / ``--overwrite`` / ``--tokenizer-from`` (refused
    for another exporter)."""
    from fxprune.errors import ConfigError
    from fxprune.exporters import exporter_for

    cls = exporter_for(a.out, a.format)
    options = {"format": a.format} if a.format else {}
    genai = {"precision": a.precision, "overwrite": a.overwrite or None}
    given = {k: v for k, v in {**genai, "tokenizer_from": a.tokenizer_from}.items() if v}
    if cls.format == "genai":
        from fxprune.exporters.genai_build import check_precision

        check_precision(a.precision or "fp32")
        return {**options, **given}
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"{flags}: options of --format genai, not of the {cls.format} exporter")
    if cls.format == "tensorrt":
        options["fp16"] = not a.fp32
    return options


def _prune_flags(a, model, x, channels: float):
    """``fxprune.compile`` with the pruning flags, or with ``--recipe``'s recipe."""
    import fxprune

    recipe = getattr(a, "recipe", None)
    if not recipe:
        return fxprune.compile(model, x, **flag_options(a, channels))
    from fxprune._util import is_default
    from fxprune.errors import ConfigError
    from fxprune.options import RECIPE_OPTIONS

    flags = flag_options(a, a.channels or 0.0)
    given = [k for k, v in flags.items() if k not in ("uniform", "seed")]
    given = [k for k in given if not is_default(flags[k], RECIPE_OPTIONS[k])]
    if given:
        raise ConfigError(
            f"--recipe {recipe}: the recipe holds the pruning options; drop "
            + ", ".join("--" + k.replace("_", "-") for k in given)
        )
    r = fxprune.Recipe.load(recipe)
    if flags["uniform"] and not r.uniform:  # --save-pretrained needs the counts a config holds
        import dataclasses

        r = dataclasses.replace(r, uniform=True)
    return fxprune.compile(model, x, r)
