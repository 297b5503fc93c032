"""ONNX Runtime GenAI exporter: a decoder with its KV cache that a serving team runs, built from
the pruned Hugging Face model by ONNX Runtime GenAI's model builder and checked token for token.

``result.export(DIR, format="genai", precision="fp32")`` (``fxprune export SRC --format genai
-o DIR``):

1. ``result.save_pretrained`` (the rebuilt model, counts uniform across layers) with its
   tokenizer files into a hidden staging folder beside DIR (``.<name>.<pid>.<random>``, as the
   ONNX exporter stages: one a killed export left is removed by the next export to DIR);
2. the model builder on it, ``precision`` ``"fp32"`` or ``"int4"`` on the CPU execution
   provider (``fxprune.exporters.genai_build``: why a subprocess, why not fp16);
3. greedy-token parity: ``prompts`` fresh prompts of random token ids, ``new_tokens`` greedy
   tokens each from ``result.model.generate`` (KV cache on) and from ONNX Runtime GenAI must be
   equal, else :class:`TokenParityError` and nothing is written. An int4 decoder's tokens
   differ from the float model's by design (its weights are rounded), so the check runs on an
   fp32 build of the same staged folder (it proves the builder read the pruned model right), the
   int4 build must generate too, and how many tokens it shares with the float model before the
   first difference is recorded;
4. the hand-off record ``fxprune_handoff.json`` beside ``genai_config.json``: the ONNX
   metadata's keys (``fxprune.exporters.metadata``: version, plan and its sha256, what each pass
   removed, the proof and the latency when given) plus ``genai`` (precision, execution
   provider, onnxruntime-genai version, the parity check), and ``sha256`` covering each of
   them (``fxprune.exporters.record``); :func:`read_handoff` reads it back and checks it;
5. the folder is renamed into place: DIR appears whole or not at all. A non-empty DIR is refused
   unless ``overwrite=True``, which renames the old folder aside first.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fxprune._util import Report
from fxprune.atomic import swap_in
from fxprune.errors import ConfigError, ExportError, FileAccessError
from fxprune.exporters import Exporter
from fxprune.exporters.genai_build import (
    PROVIDER,
    GenaiDecoder,
    build_genai,
    causal_lm_of,
    check_precision,
    context_length,
    hf_folder,
    hf_greedy,
    import_genai,
    random_prompts,
    weight_bytes,
)
from fxprune.exporters.metadata import (
    PREFIX,
    MetadataError,
    build_metadata,
    decode_metadata,
    encode_metadata,
)
from fxprune.exporters.onnx import remove_stale_staging
from fxprune.exporters.record import JUDGEMENTS

HANDOFF = "fxprune_handoff.json"
PROMPT_LEN = 12  # tokens of each parity prompt (fewer where the context is short)


class TokenParityError(ExportError):
    """The built decoder's greedy tokens differ from the pruned PyTorch model's; the message
    names the prompt and the first token that differs."""


@dataclass
class GenaiReport(Report):
    """What a genai export wrote and checked."""

    path: Path
    precision: str
    execution_provider: str
    parity: dict
    weight_bytes: int
    files: list[str] = field(default_factory=list)
    handoff: str = HANDOFF

    def table(self) -> str:
        p = self.parity
        lines = [
            f"wrote {self.path} (ONNX Runtime GenAI decoder with KV cache, {self.precision}, "
            f"{self.execution_provider} execution provider): {', '.join(self.files)}",
            f"greedy-token parity with result.model.generate (KV cache on): {p['prompts']} "
            f"prompts of {p['prompt_len']} random tokens x {p['new_tokens']} new tokens, "
            f"all equal on the {p['checked_precision']} build",
        ]
        if "quantized_common_prefix" in p:
            lines.append(
                f"the {self.precision} build generates; tokens equal to the float model's "
                f"before the first difference, per prompt: {p['quantized_common_prefix']} "
                f"of {p['new_tokens']}"
            )
        lines.append(f"weights {self.weight_bytes / 1e6:.2f} MB; hand-off record: {self.handoff}")
        return "\n".join(lines)


class GenaiExporter(Exporter):
    format = "genai"
    suffixes = ()  # a folder: chosen by format="genai"
    extra = "genai"
    audits_nm = False  # the weights go to the builder as they are; int4 re-quantizes them

    def export(
        self,
        module,
        example_inputs,
        path,
        *,
        result=None,
        precision: str = "fp32",
        overwrite: bool = False,
        tokenizer_from=None,
        prompts: int = 3,
        new_tokens: int = 16,
        seed: int = 0,
        equivalence=None,
        latency=None,
    ) -> GenaiReport:
        """Build and check the folder ``path`` (see the module docstring). ``module`` and
        ``example_inputs`` are not used: the builder reads ``result.model``.

        Raises:
            ConfigError: a bad option, no tokenizer, no compile result. UnsupportedModelError:
                not a Hugging Face causal LM. MissingExtraError: onnxruntime-genai is not
                installed. FileAccessError: ``path`` is a file, or a non-empty folder without
                ``overwrite``. ExportError: the builder failed; TokenParityError: tokens differ.
        """
        path = Path(path)
        check_precision(precision)
        for name, v in (("prompts", prompts), ("new_tokens", new_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}={v!r}: give a positive integer")
        if result is None or not hasattr(result, "plan"):
            raise ConfigError(
                "format='genai' exports a compile result, whose rebuilt Hugging Face model the "
                "builder reads: result.export(DIR, format='genai')"
            )
        plen = _prompt_len(causal_lm_of(result, "the genai export"), new_tokens)
        og = import_genai()
        _check_target(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent))
        try:
            hf = hf_folder(result, tmp / "hf", tokenizer_from)
            out = tmp / "out"
            build_genai(hf, out, precision, tmp / "cache")
            checked = out if precision == "fp32" else tmp / "fp32"
            if checked != out:  # rounded weights change tokens: check an fp32 build instead
                build_genai(hf, checked, "fp32", tmp / "cache")
            parity = check_parity(result.model, checked, out, (prompts, plen, new_tokens), seed)
            genai = {
                "precision": precision,
                "execution_provider": PROVIDER,
                "onnxruntime_genai": getattr(og, "__version__", "unknown"),
                "parity": parity,
            }
            record = handoff_record(result, equivalence, latency, genai)
            (out / HANDOFF).write_text(json.dumps(record, indent=1) + "\n")
            size, files = weight_bytes(out), sorted(f.name for f in out.iterdir())
            swap_in(out, path, tmp / "old")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return GenaiReport(path, precision, PROVIDER, parity, size, files)


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileAccessError(f"{path} is a file: the genai export writes a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileAccessError(
            f"{path} is a folder that is not empty: pass overwrite=True (--overwrite) to replace it"
        )


def _prompt_len(model, new_tokens: int) -> int:
    """The parity prompts' length: :data:`PROMPT_LEN`, fewer where the context is short."""
    context = context_length(model)
    plen = PROMPT_LEN if context is None else min(PROMPT_LEN, context - new_tokens)
    if plen < 1:
        raise ConfigError(
            f"new_tokens={new_tokens}: the model's context is {context} positions; leave room "
            "for a prompt"
        )
    return plen


def check_parity(model, checked: Path, built: Path, shape: tuple[int, int, int], seed: int):
    """Greedy tokens of the fp32 folder ``checked`` against ``model.generate`` on fresh random
    prompts, ``shape`` = (prompts, prompt length, new tokens) (TokenParityError on any
    difference); with a quantized ``built`` folder, how many of its tokens per prompt equal the
    model's before the first difference. Returns what the hand-off record keeps."""
    prompts, plen, new_tokens = shape
    ids = random_prompts(model.config.vocab_size, prompts, plen, seed)
    want = hf_greedy(model, ids, new_tokens)
    got = GenaiDecoder(checked).generate(ids, new_tokens)[0]
    bad = [i for i, (w, g) in enumerate(zip(want, got, strict=True)) if w != g]
    if bad:
        i = bad[0]
        k = _common_prefix(want[i], got[i])
        theirs = got[i][k] if k < len(got[i]) else "nothing (it stopped)"
        raise TokenParityError(
            f"ONNX Runtime GenAI's greedy tokens differ from result.model.generate on "
            f"{len(bad)} of {prompts} prompts: prompt {i}, new token {k}: {theirs} where "
            f"PyTorch gives {want[i][k]}; the built decoder does not compute what the pruned "
            "model computes, so nothing was written"
        )
    info = {
        "prompts": prompts,
        "prompt_len": plen,
        "new_tokens": new_tokens,
        "seed": seed,
        "checked_precision": "fp32",
        "tokens_equal": True,
    }
    if built != checked:
        quant = GenaiDecoder(built).generate(ids, new_tokens)[0]
        info["quantized_common_prefix"] = [
            _common_prefix(w, q) for w, q in zip(want, quant, strict=True)
        ]
    return info


def _common_prefix(a: list[int], b: list[int]) -> int:
    pairs = enumerate(zip(a, b, strict=False))  # a shorter row ends the comparison
    return next((k for k, (x, y) in pairs if x != y), min(len(a), len(b)))


def handoff_record(result, equivalence, latency, genai: dict) -> dict:
    """The hand-off record: the ONNX metadata's entries for the same export and ``genai``,
    decoded (the plan as an object), with ``sha256`` covering every field as stored in the
    ONNX metadata (compact JSON; the plan's ``plan_sha256`` too), so :func:`read_handoff`
    checks all of them."""
    props = build_metadata(result, equivalence, latency, extra={"genai": genai})
    raw = {k[len(PREFIX) :]: v for k, v in props.items()}
    return {k: v for k, v in decode_metadata(raw).items() if k not in JUDGEMENTS}


def read_handoff(folder: str | Path) -> dict:
    """A genai folder's hand-off record, decoded and judged as ``metadata.read_metadata``
    decodes an ONNX file's: ``digest_ok`` (every field matches its sha256), ``unverified``
    (which fields were changed, deleted or are not covered) and ``failures`` (those, and a
    proof or token parity that the record says failed).

    Raises:
        FileAccessError: the record cannot be read. MetadataError: it is not a JSON object, or
            a field has the wrong JSON type.
    """
    p = Path(folder) / HANDOFF
    try:
        record = json.loads(p.read_text())
    except OSError as e:
        raise FileAccessError(f"cannot read {p}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetadataError(f"{p} is not valid JSON: {getattr(e, 'msg', e)}") from e
    if not isinstance(record, dict):
        raise MetadataError(f"{p} holds a {type(record).__name__}, not a JSON object")
    return decode_metadata(encode_metadata(record, p), p, label="field ")
