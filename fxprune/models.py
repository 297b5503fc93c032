"""Model sources for the command line: ``torchvision:NAME``, ``timm:NAME``,
``hf:CONFIG_OR_LOCAL_DIR`` and ``file.py:factory`` (saved fxprune checkpoints are opened by the
command line itself: they name the source they were pruned from).

A Hugging Face folder is read as ``from_pretrained`` reads it, with its failures typed
(:func:`hf_config`, :func:`hf_weights`): code its ``auto_map`` names runs only with trust, as
does a pickled ``pytorch_model.bin``, and safetensors that are not the model's weights are never
taken for them."""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from fxprune.errors import CheckpointError, ConfigError, FileAccessError, MissingExtraError

# the weights files ``from_pretrained`` reads, in the order it prefers them
SAFETENSORS_WEIGHTS = ("model.safetensors.index.json", "model.safetensors")
PICKLED_WEIGHTS = ("pytorch_model.bin.index.json", "pytorch_model.bin")
# what transformers raises on a config or weights it cannot read (safetensors' SafetensorError
# is caught by name: it derives from Exception alone)
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError)

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


def remote_code_files(raw: dict) -> list[str]:
    """The Python files in the model folder that ``config.json``'s ``auto_map`` builds the
    model with (``"AutoConfig": "configuration_x.XConfig"`` -> ``configuration_x.py``; an entry
    naming another repository, ``"org/repo--module.Class"``, counts too)."""
    amap = raw.get("auto_map")
    if not isinstance(amap, dict):
        return []
    refs = [r for v in amap.values() for r in (v if isinstance(v, list) else [v])]
    return sorted({r.rpartition(".")[0] + ".py" for r in refs if isinstance(r, str) and "." in r})


def hf_config(file: Path, trust: bool = False, who: str = "hf", log: Callable | None = None):
    """The config in ``file`` (a ``config.json``) as transformers reads it, its failures typed.

    A config whose ``auto_map`` names code in the folder and whose ``model_type`` transformers
    does not know needs that code: it is refused unless ``trust``, and run with it (transformers'
    ``trust_remote_code``). Where transformers knows the ``model_type``, its own classes are
    used without ``trust`` (as transformers does; ``log`` hears that the folder's code was not
    run) and the folder's code with it.

    Raises:
        FileAccessError: ``file`` cannot be read.
        CheckpointError: it is not a JSON object, names no ``model_type`` (and no code), or
            transformers refuses it; the message names the file.
        ConfigError: it needs the folder's code and ``trust`` is False.
    """
    import transformers

    try:
        raw = json.loads(file.read_text())
    except OSError as e:
        raise FileAccessError(f"{who}: cannot read {file}: {e.strerror or e}") from e
    except ValueError as e:
        raise CheckpointError(f"{who}: {file} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{who}: {file} holds a JSON {type(raw).__name__}, not an object")
    kind, code = raw.get("model_type"), remote_code_files(raw)
    known = isinstance(kind, str) and kind in transformers.CONFIG_MAPPING
    if code and not known and not trust:
        raise ConfigError(
            f"{who}: {file}'s auto_map builds the model with the folder's code "
            f"({', '.join(code)}; model_type {kind!r} is not one transformers knows); running "
            "it needs --trust (trust=True in Python) if you trust that code"
        )
    if not code and not known:
        what = (
            "names no model_type, so transformers cannot tell which model it describes"
            if kind is None
            else f"has model_type {kind!r}, which transformers {transformers.__version__} "
            "does not know"
        )
        raise CheckpointError(
            f'{who}: {file} {what}; say which family the weights are, e.g. "model_type": "llama"'
        )
    if code and known and log is not None:
        how = "running that code" if trust else "transformers' own classes, not that code"
        log(f"{who}: {file}'s auto_map names {', '.join(code)}; building with {how}")
    remote = bool(code and trust)
    try:  # the folder, where remote code is looked for; else the file, whatever its name
        return transformers.AutoConfig.from_pretrained(
            str(file.parent if remote else file), trust_remote_code=remote
        )
    except _READ_ERRORS as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{who}: transformers cannot read {file}: {first}") from e


def hf_weights(folder: Path) -> tuple[str | None, list[Path]]:
    """The weights a Hugging Face folder holds, as ``from_pretrained`` picks them:
    ``("safetensors", [file])`` (the index, else ``model.safetensors``), ``("pickle",
    [file])`` (``pytorch_model.bin`` or its index), or ``(None, others)``: the folder's other
    ``*.safetensors`` and ``pytorch_model*.bin`` files, which ``from_pretrained`` does not read
    as the model's weights (an adapter, shards without their index)."""
    for kind, names in (("safetensors", SAFETENSORS_WEIGHTS), ("pickle", PICKLED_WEIGHTS)):
        found = [folder / n for n in names if (folder / n).is_file()]
        if found:
            return kind, found[:1]
    return None, sorted([*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")])


def _load_weights(arch, folder: Path, cfg, kind: str, remote: bool, who: str):
    """``arch.from_pretrained`` on exactly the weights :func:`hf_weights` chose (never a
    pickle when safetensors were chosen), its failures a CheckpointError."""
    from safetensors import SafetensorError

    try:
        return arch.from_pretrained(
            str(folder),
            config=cfg,
            use_safetensors=kind == "safetensors",
            trust_remote_code=remote,
        )
    except (*_READ_ERRORS, RuntimeError, SafetensorError) as e:  # size mismatch: RuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{who}: cannot load the weights in {folder}: {first}") from e


def _model_class(transformers, cfg, remote: bool):
    """The class the checkpoint was saved from (keeps task heads), else the base model; with
    the folder's code trusted, the auto class its ``auto_map`` names (a model's own code)."""
    if remote:
        auto = [k for k in cfg.auto_map if k.startswith("AutoModel")]
        return (
            getattr(transformers, auto[0], transformers.AutoModel)
            if auto
            else transformers.AutoModel
        )
    return next(
        (getattr(transformers, a) for a in (cfg.architectures or []) if hasattr(transformers, a)),
        transformers.AutoModel,
    )


def load_hf(name: str, trust: bool = False, seq_len: int = 128):
    """``hf:`` source: a local model folder (its weights when present, else random weights from
    its config.json), a config.json file, or a model type (``hf:llama``: the default config of
    that family, random weights). Nothing is downloaded; ``use_cache`` stays as the config says
    (``compile`` turns it off for the capture only).

    Raises:
        ConfigError: the weights are a pickle, or the config needs the folder's code
            (:func:`hf_config`), and ``trust`` is False.
        CheckpointError: the config or the weights cannot be read, or the folder holds only
            files that are not a model's weights (:func:`hf_weights`)."""
    try:
        import transformers
    except ImportError as e:
        raise MissingExtraError("transformers", "hf", "hf: models") from e
    path, who = Path(name), f"hf:{name}"
    if path.is_dir() or path.suffix == ".json":
        folder = path if path.is_dir() else path.parent
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.exists():
            raise ConfigError(f"{who}: no config.json there")
        cfg = hf_config(cfg_file, trust, who, log=lambda s: print(f"fxprune: {s}", file=sys.stderr))
    elif name in transformers.CONFIG_MAPPING:
        folder, cfg = None, transformers.AutoConfig.for_model(name)
    else:
        raise ConfigError(
            f"{who}: give a local model folder, a config.json, or a model type such as "
            "'bert' or 'llama' (nothing is downloaded from the hub)"
        )
    kind, files = hf_weights(folder) if folder is not None else (None, [])
    if kind == "pickle" and not trust:
        raise ConfigError(
            f"{who}: {files[0].name} is a pickle; pass --trust to load it (safetensors "
            "needs no trust)"
        )
    if kind is None and files:
        raise CheckpointError(
            f"{who}: {folder} holds {', '.join(f.name for f in files[:3])} but none of "
            f"{', '.join(SAFETENSORS_WEIGHTS + PICKLED_WEIGHTS)}: not weights from_pretrained "
            "reads; give the folder save_pretrained wrote"
        )
    remote = bool(trust and folder is not None and remote_code_files(cfg.to_dict()))
    arch = _model_class(transformers, cfg, remote)
    if kind:
        model = _load_weights(arch, folder, cfg, kind, remote, who)
        how = f"weights from {files[0]}"
    else:
        auto = arch.__name__.startswith("Auto")
        model = arch.from_config(cfg, trust_remote_code=remote) if auto else arch(cfg)
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


def default_example(model: torch.nn.Module) -> tuple[object, str]:
    """An example input for ``compile(model)`` called without one, from what the model says it
    takes: a Hugging Face model's config (random token ids of its vocabulary with an all-ones
    attention mask, batch 1 x 16, or pixels of its image size), a timm model's
    ``pretrained_cfg["input_size"]``, a torchvision classifier's 3 x 224 x 224 (299 for
    Inception v3). Returns the input and a sentence saying what it is.

    Raises:
        ConfigError: the model does not say what it takes; the message names what to give.
    """
    cfg = getattr(model, "config", None)
    if "transformers" in sys.modules and hasattr(cfg, "model_type") and hasattr(cfg, "to_dict"):
        x = _hf_input(cfg, 16, model)
        params = list(inspect.signature(model.forward).parameters)
        what = " + ".join(params[: len(x)]) if isinstance(x, tuple) else params[0]
        shape = list((x[0] if isinstance(x, tuple) else x).shape)
        pixels = isinstance(x, torch.Tensor) and x.is_floating_point()
        kind = "random pixels" if pixels else "random token ids"
        return x, f"{what} {shape} made from its {type(cfg).__name__} ({kind})"
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if size is not None:  # timm
        return torch.randn(
            1, *size
        ), f"random pixels [1, {', '.join(map(str, size))}] from pretrained_cfg"
    mod = type(model).__module__
    if mod.startswith("torchvision.models.") and mod.count(".") == 2:  # the classifiers
        side = 299 if type(model).__name__ == "Inception3" else 224
        return torch.randn(1, 3, side, side), f"random pixels [1, 3, {side}, {side}] (torchvision)"
    raise ConfigError(
        f"compile({type(model).__name__}) needs example_inputs: a tensor (or a tuple / dict of "
        "them) shaped as the model's forward takes, e.g. fxprune.compile(model, "
        "torch.randn(1, 3, 224, 224), ...); only Hugging Face, timm and torchvision classifiers "
        "say what they take"
    )
