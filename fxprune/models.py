"""Model sources for the command line: ``torchvision:NAME``, ``timm:NAME``,
``hf:CONFIG_OR_LOCAL_DIR`` and ``file.py:factory`` (saved fxprune checkpoints are opened by the
command line itself: they name the source they were pruned from)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import torch

from fxprune.errors import ConfigError, MissingExtraError

# the text inputs an example is made of, by forward parameter name
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _hf_input(cfg, seq_len: int, model=None):
    """An example input for a Hugging Face config: pixels for vision configs; for text, token ids
    with an all-ones ``attention_mask`` and zero ``token_type_ids``, as many of them as lead the
    forward's parameters (BERT: all three; LLaMA: ids and mask; GPT-2, whose second parameter is
    the cache: ids alone), since the example is passed positionally."""
    if hasattr(cfg, "image_size") and hasattr(cfg, "num_channels"):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        return torch.randn(1, cfg.num_channels, size, size)
    vocab = getattr(cfg, "vocab_size", None)
    if not vocab:
        raise ConfigError(f"hf: cannot make an example input for a {type(cfg).__name__}")
    limit = getattr(cfg, "max_position_embeddings", None) or seq_len
    if "roberta" in getattr(cfg, "model_type", ""):  # positions start after the padding index
        limit -= (getattr(cfg, "pad_token_id", None) or 0) + 1
    ids = torch.randint(0, vocab, (1, min(seq_len, limit)))
    made = dict(zip(_TEXT_INPUTS, (ids, torch.ones_like(ids), torch.zeros_like(ids)), strict=True))
    params = list(inspect.signature(model.forward).parameters) if model is not None else []
    lead = []
    for name in params:
        if name not in made:
            break
        lead.append(made[name])
    if not lead or params[0] != "input_ids":
        return ids
    return lead[0] if len(lead) == 1 else tuple(lead)


def load_hf(name: str, trust: bool = False, seq_len: int = 128):
    """``hf:`` source: a local model folder (its weights when present, else random weights from
    its config.json), a config.json file, or a model type (``hf:llama``: the default config of
    that family, random weights). Nothing is downloaded; ``use_cache`` stays as the config says
    (``compile`` turns it off for the capture only)."""
    try:
        import transformers
    except ImportError as e:
        raise MissingExtraError("transformers", "hf", "hf: models") from e
    path = Path(name)
    if path.is_dir() or path.suffix == ".json":
        folder = path if path.is_dir() else path.parent
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.exists():
            raise ConfigError(f"hf:{name}: no config.json there")
        cfg = transformers.AutoConfig.from_pretrained(str(cfg_file))
    elif name in transformers.CONFIG_MAPPING:
        folder, cfg = None, transformers.AutoConfig.for_model(name)
    else:
        raise ConfigError(
            f"hf:{name}: give a local model folder, a config.json, or a model type such as "
            "'bert' or 'llama' (nothing is downloaded from the hub)"
        )
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    pickles = sorted(folder.glob("pytorch_model*.bin")) if folder is not None else []
    if not files and pickles and not trust:
        raise ConfigError(
            f"hf:{name}: {pickles[0].name} is a pickle; pass --trust to load it (safetensors "
            "needs no trust)"
        )
    # the class the checkpoint was saved from (keeps task heads), else the base model
    arch = next(
        (getattr(transformers, a) for a in (cfg.architectures or []) if hasattr(transformers, a)),
        transformers.AutoModel,
    )
    if files or pickles:
        model = arch.from_pretrained(str(folder), config=cfg)
        how = f"weights from {folder} ({len(files) or len(pickles)} file(s))"
    else:
        auto = arch is transformers.AutoModel
        model = transformers.AutoModel.from_config(cfg) if auto else arch(cfg)
        how = "random weights (no weights in the source)"
    x = _hf_input(cfg, seq_len, model)
    params = list(inspect.signature(model.forward).parameters)
    what = " + ".join(params[: len(x)]) if isinstance(x, tuple) else "input"
    shape = list((x[0] if isinstance(x, tuple) else x).shape)
    print(
        f"fxprune: hf:{name}: {type(model).__name__}, {how}; example {what} {shape}",
        file=sys.stderr,
    )
    return model.eval(), x


def load_model(spec: str, trust: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    """Build a model (random weights unless the source has them; nothing downloaded) and a
    matching example input."""
    kind, _, name = spec.partition(":")
    if kind == "hf":
        return load_hf(name, trust=trust)
    if kind == "torchvision":
        try:
            import torchvision
        except ImportError as e:
            raise MissingExtraError("torchvision", "vision", "torchvision models") from e
        if name not in torchvision.models.list_models():
            raise ConfigError(f"unknown torchvision model {name!r}")
        size = 299 if name == "inception_v3" else 224
        return torchvision.models.get_model(name, weights=None).eval(), torch.randn(
            1, 3, size, size
        )
    if kind == "timm":
        try:
            import timm
        except ImportError as e:
            raise MissingExtraError("timm", "vision", "timm models") from e
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:3] if name else []
            raise ConfigError(
                f"unknown timm model {name!r}" + (f" (did you mean {close}?)" if close else "")
            )
        m = timm.create_model(name, pretrained=False).eval()
        cfg = m.pretrained_cfg.get("input_size", (3, 224, 224))
        return m, torch.randn(1, *cfg)
    if name and kind.endswith(".py"):
        path = Path(kind)
        if not path.exists():
            raise ConfigError(f"no such file: {path}")
        if not trust:
            raise ConfigError(
                f"{spec}: building the model runs the Python file {path}; pass --trust if you "
                "trust it"
            )
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        if not callable(getattr(mod, name, None)):
            raise ConfigError(f"{spec}: {path} defines no function {name!r}")
        made = getattr(mod, name)()
        if not (isinstance(made, tuple) and len(made) == 2):
            raise ConfigError(f"{spec}: the factory must return (model, example_input)")
        return made
    raise ConfigError(
        f"model source {spec!r}: use torchvision:NAME, timm:NAME, hf:CONFIG_OR_DIR, "
        "file.py:factory or a checkpoint saved by `fxprune prune --save`"
    )


def check_example(model: torch.nn.Module, example) -> None:
    """Run ``model`` once, eagerly, on ``example`` (a tensor or a tuple of them).

    Raises:
        ConfigError: the model's own forward raises on it: the message says that the model
            rejected the example inputs and shows their shapes.
    """
    args = example if isinstance(example, (tuple, list)) else (example,)
    try:
        with torch.no_grad():
            model(*args)
    except Exception as e:  # noqa: BLE001 - whatever the forward raises, the inputs are wrong
        shapes = ", ".join(
            f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            if isinstance(t, torch.Tensor)
            else type(t).__name__
            for t in args
        )
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise ConfigError(
            f"{type(model).__name__} rejected the example inputs (shape {shapes}): its forward "
            f"raised {type(e).__name__}: {first}"
        ) from e
