"""The plan (a versioned JSON record of what was kept) and the result of ``fxprune.compile``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from fxprune._util import Report, jsonable
from fxprune.checkpoint import atomic_save, read_checkpoint  # noqa: F401 - re-exported
from fxprune.errors import ConfigError, PlanError
from fxprune.summary import LayerRow, Summary  # noqa: F401 - re-exported

PLAN_VERSION = 1
# A plan's example inputs are rebuilt as zero tensors: a bound on what a plan may declare, so a
# few bytes of JSON cannot ask for gigabytes (2**28 elements: a 1 GiB float32 example)
MAX_EXAMPLE_ELEMENTS = 2**28


def inputs_spec(args: tuple) -> list[dict]:
    """The example inputs as a plan records them: shape and dtype, or ``{"none": True}``."""
    spec = []
    for a in args:
        if a is None:  # a positional the model leaves at its default (GPT-2's cache, ...)
            spec.append({"none": True})
            continue
        if not isinstance(a, torch.Tensor):
            raise ConfigError(f"example_inputs must be tensors (or None), got {type(a).__name__}")
        spec.append({"shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch.")})
    return spec


def _input_ok(i) -> bool:
    if i == {"none": True}:  # a None positional (GPT-2's cache before its mask)
        return True
    return (
        isinstance(i, dict)
        and isinstance(i.get("shape"), list)
        and all(isinstance(n, int) and n >= 0 for n in i["shape"])
        and isinstance(i.get("dtype"), str)
        and isinstance(getattr(torch, i["dtype"], None), torch.dtype)
    )


def _entry_ok(e) -> bool:
    return isinstance(e, dict) and isinstance(e.get("name"), str)


@dataclass
class Plan:
    """What a compile did, enough to rebuild the pruned architecture from a fresh dense model.

    ``passes`` holds one entry per pass that changed the model, in order, with the kept output
    indices of every layer that shrank: ``{"name": "channels", "kept": {"layer1.0.conv1": [...]}}``.
    """

    mode: str
    inputs: list[dict]  # [{"shape": [...], "dtype": "float32"}] to rebuild example inputs
    config: dict
    passes: list[dict] = field(default_factory=list)
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "mode": self.mode,
            "inputs": self.inputs,
            "config": self.config,
            "passes": self.passes,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if not isinstance(d, dict):
            raise PlanError(f"a plan is a JSON object, got {type(d).__name__}")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(
                f"plan version {d.get('version')!r} is not supported "
                f"(this fxprune reads version {PLAN_VERSION})"
            )
        if d.get("mode") not in ("fx", "export"):
            raise PlanError(f"plan 'mode' must be 'fx' or 'export', got {d.get('mode')!r}")
        inputs, passes, config = d.get("inputs"), d.get("passes", []), d.get("config", {})
        if not (isinstance(inputs, list) and all(_input_ok(i) for i in inputs)):
            raise PlanError(
                "plan 'inputs' must be a list of {'shape': [sizes], 'dtype': 'float32'} (or "
                "{'none': true}), "
                f"got {inputs!r:.80}"
            )
        sizes = [math.prod(i["shape"]) for i in inputs if "shape" in i]
        if sum(sizes) > MAX_EXAMPLE_ELEMENTS:
            raise PlanError(
                f"plan 'inputs' declare {sum(sizes):,} elements (shapes "
                f"{[i.get('shape') for i in inputs]!r:.80}), more than an example input needs "
                f"(at most {MAX_EXAMPLE_ELEMENTS:,}): the plan is corrupt or was edited"
            )
        if not (isinstance(passes, list) and all(_entry_ok(e) for e in passes)):
            raise PlanError(
                f"plan 'passes' must be a list of objects with a 'name', got {passes!r:.80}"
            )
        if not isinstance(config, dict):
            raise PlanError(f"plan 'config' must be an object, got {type(config).__name__}")
        return cls(d["mode"], inputs, config, passes, d["version"])

    @classmethod
    def from_json(cls, s: str) -> Plan:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise PlanError(f"the plan is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def example_inputs(self) -> tuple:
        """Zero tensors with the recorded shapes (tracing only needs shapes)."""
        return tuple(
            None if i.get("none") else torch.zeros(i["shape"], dtype=getattr(torch, i["dtype"]))
            for i in self.inputs
        )


def compose(passes) -> tuple[dict, dict]:
    """Compose what the passes did to each parameter dim, each recorded in the shapes its pass
    saw (kept masks, gather orders, zeroed consumer slices), into dense-model indices:
    ``(index, zeros)`` with ``index[param][dim]`` the dense index at each current position and
    ``zeros[param][dim]`` a bool mask over dense indices (False = zeroed)."""
    idx: dict[tuple[str, int], np.ndarray] = {}  # dense index at each current position
    size: dict[tuple[str, int], int] = {}
    zeros: dict[tuple[str, int], np.ndarray] = {}

    def current(key, n):
        if key not in idx:
            size[key] = n
            idx[key] = np.arange(n)
        return idx[key]

    for p in passes:
        for name, dims in p.zero.items():
            for d, keep in dims.items():
                keep = np.asarray(keep, dtype=bool)
                cur = current((name, d), keep.size)
                dense = np.ones(size[(name, d)], dtype=bool)
                dense[cur[~keep]] = False
                prev = zeros.get((name, d))
                zeros[(name, d)] = dense if prev is None else prev & dense
        for name, dims in p.keeps.items():
            for d, keep in dims.items():
                keep = np.asarray(keep, dtype=bool)
                idx[(name, d)] = current((name, d), keep.size)[keep]
        for name, dims in getattr(p, "order", {}).items():
            for d, gather in dims.items():
                idx[(name, d)] = current((name, d), len(gather))[np.asarray(gather)]
    index: dict[str, dict[int, np.ndarray]] = {}
    for (name, d), cur in idx.items():
        index.setdefault(name, {})[d] = cur
    out: dict[str, dict[int, np.ndarray]] = {}
    for (name, d), m in zeros.items():
        out.setdefault(name, {})[d] = m
    return index, out


@dataclass
class CompileResult(Report):
    """What ``fxprune.compile`` returns.

    Attributes:
        module: the pruned model, an ``fx.GraphModule`` whose parameter names match the original.
        plan: the :class:`Plan` (JSON-serialisable) that ``fxprune.apply_plan`` replays.
        summary: parameters and MACs before / after, per layer and in total.
        barriers: which operator kept which layers' channels, and why.
        passes: each pass's :class:`fxprune.passes.PassResult`.
        approximate: True when a group whose removal is inexact was pruned (allow_approximate).
        config: for a Hugging Face model, a copy of its config with the uniform head, FFN and
            layer counts written back (None otherwise; see ``fxprune.hf``).
        model: the pruned model as the user's own class (a copy, or the model itself with
            ``inplace=True``): smaller layers of the same types, head counts and removed blocks
            updated, checked against ``module``; it shares the changed tensors with ``module``.
            When the class's forward cannot run pruned (it hard-codes a size), ``model`` is
            ``module`` and ``model_note`` says why.
        model_note: why ``model`` is the graph module ("" when it is the module tree).
    """

    module: fx.GraphModule
    plan: Plan
    summary: Summary
    barriers: list[dict]
    passes: list
    approximate: bool = False
    seconds: float = 0.0
    config: object = None
    model: object = None
    model_note: str = ""
    example_note: str = ""

    def table(self) -> str:
        """:meth:`report`, why ``model`` is the graph module when it is, and what the example
        input was when compile made it."""
        note = f"\nresult.model is the graph module: {self.model_note}" if self.model_note else ""
        made = f"\n{self.example_note}" if self.example_note else ""
        return self.report() + note + made

    def to_dict(self) -> dict:
        """The plan, the summary and how the result came out (no tensors, no model)."""
        return jsonable(
            {
                "plan": self.plan.to_dict(),
                "summary": self.summary.to_dict(),
                "barriers": self.barriers,
                "approximate": self.approximate,
                "seconds": self.seconds,
                "materialized": self.materialized,
                "model_note": self.model_note,
            }
        )

    @property
    def materialized(self) -> bool:
        """True when ``model`` is the user's module tree, not the graph module."""
        return self.model is not None and self.model is not self.module

    @property
    def zero_spec(self) -> dict[str, dict[int, np.ndarray]]:
        """Consumer slices to zero in the dense model to reproduce the pruned model exactly:
        ``{param: {dim: bool mask over the dense indices, False = zero}}``, over all passes."""
        return compose(self.passes)[1]

    @property
    def dense_index(self) -> dict[str, dict[int, np.ndarray]]:
        """``{param: {dim: the dense index at each position of the pruned parameter}}`` for
        every dim a pass shrank or reordered."""
        return compose(self.passes)[0]

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Every weight mask (N:M and unstructured) by parameter name, in pruned shapes; see
        ``fxprune.passes.nm.keep_masks``."""
        return {k: v for p in self.passes for k, v in p.masks.items()}

    @property
    def nm_masks(self) -> dict[str, torch.Tensor]:
        """The N:M masks only (what sparse kernels can run)."""
        return {k: v for p in self.passes if p.name == "nm" for k, v in p.masks.items()}

    def export(self, path: str | Path, example_inputs=None, format: str | None = None, **options):
        """Export the pruned model with the exporter named ``format``, else by file suffix
        (``.onnx``, ``.engine``); checks run before anything lands.

        ``format="genai"`` writes the folder ``path``: an ONNX Runtime GenAI decoder with its
        KV cache, built from :meth:`save_pretrained`'s folder and checked greedy token for
        token against ``model.generate`` (options: ``precision="fp32" | "int4"``,
        ``overwrite``, ``tokenizer_from``; see ``fxprune.exporters.genai``).

        ``example_inputs`` default to the shapes recorded in the plan. When the N:M pass ran, the
        exported weights are audited for the pattern along each layer's reduction axis.

        Example:
            >>> result.export("llama-genai", format="genai", precision="int4")
        """
        from fxprune.exporters import exporter_for
        from fxprune.passes import NMResult

        cls = exporter_for(path, format)
        if isinstance(example_inputs, dict):  # keyword inputs, in the forward's order
            from fxprune.graph.trace import as_args

            example_inputs = as_args(example_inputs, self.model)
        args = example_inputs if example_inputs is not None else self.plan.example_inputs()
        nm = next((p for p in self.passes if isinstance(p, NMResult)), None)
        if nm is not None and cls.audits_nm and "nm" not in options:
            options["nm"] = (nm.n, nm.m)
            options["nm_weights"] = {
                k: self.module.get_parameter(k).detach().cpu().numpy() for k in nm.masks
            }
        options.setdefault("result", self)  # what the hand-off metadata describes
        return cls().export(self.module, args, Path(path), **options)

    def masks_from_weights(self) -> None:
        """Re-read every mask off the module's weights (after loading saved weights, which
        carry the masks the plan's method chose: a data-driven one cannot be recomputed)."""
        from fxprune.passes import NMResult, UnstructuredResult
        from fxprune.passes.nm import masks_from_weights

        for p in self.passes:
            if isinstance(p, NMResult) and p.masks:
                p.masks.update(masks_from_weights(self.module, list(p.masks), p.n, p.m))
                if p.method == "sparsegpt":
                    w = self.module.get_parameter
                    p.updated = {k: w(k).detach().clone() for k in p.masks}
            elif isinstance(p, UnstructuredResult):
                p.masks.update({k: self.module.get_parameter(k) != 0 for k in p.masks})

    def save(
        self,
        path: str | Path,
        source: dict | None = None,
        compress: str | None = None,
        proof: dict | None = None,
    ):
        """Save plan + state_dict (no pickled code); reload with ``fxprune.load``.

        ``source`` (JSON-able, e.g. ``{"model": "torchvision:resnet50", "seed": 0}``) records
        how to rebuild the dense model; the command line opens such a checkpoint directly.
        ``proof``: the equivalence proof run on this result (``fxprune.stored_proof.record``),
        which ``fxprune export`` / ``verify`` reuse where it applies.
        ``compress="bitmask"`` or ``"csr"`` stores every masked weight (unstructured or N:M)
        in that compact form (:data:`fxprune.checkpoint.COMPRESSIONS`) where it is smaller than
        the dense tensor; ``fxprune.load`` restores them bit for bit, and ``save`` returns the
        masked weights' bytes, ``{"dense": ..., "stored": ...}``.

        The file is written atomically and carries a sha256 digest of every tensor, compressed
        weight, the plan, ``source`` and ``proof``; ``fxprune.load`` checks them and names what
        changed (see ``fxprune.checkpoint``).
        """
        from fxprune.checkpoint import COMPRESSIONS, DIGESTS, compressed_bytes, seal
        from fxprune.checkpoint import compress as pack

        if compress is not None and compress not in COMPRESSIONS:
            raise ConfigError(f"compress={compress!r}: choose one of {COMPRESSIONS}")
        state = self.module.state_dict()
        ckpt = {"plan": self.plan.to_dict(), "state_dict": state}
        sizes = {"dense": 0, "stored": 0}
        if compress is not None and not self.masks:
            raise ConfigError(
                f"compress={compress!r}: no weight is masked (prune with unstructured= or "
                "sparsity='2:4'); the checkpoint would be the same"
            )
        if compress is not None:
            packed = {}
            for name in self.masks:
                t = state[name]
                entry, dense = pack(t, compress), t.numel() * t.element_size()
                sizes["dense"] += dense
                if compressed_bytes(entry) < dense:
                    packed[name] = entry
                sizes["stored"] += min(compressed_bytes(entry), dense)
            ckpt["state_dict"] = {k: v for k, v in state.items() if k not in packed}
            ckpt["compressed"] = packed
        if source is not None:
            ckpt["source"] = dict(source)
        if proof is not None:
            ckpt["proof"] = dict(proof)
        ckpt[DIGESTS] = seal(ckpt)  # fxprune.load refuses a file whose bytes changed since
        atomic_save(ckpt, path)
        return sizes if compress is not None else None

    def save_pretrained(
        self, path: str | Path, tokenizer_from=None, overwrite: bool = False, **kwargs
    ) -> Path:
        """Write the pruned Hugging Face model as a folder ``from_pretrained`` opens without
        fxprune: config.json with the new counts (``num_attention_heads``,
        ``num_key_value_heads``, ``head_dim``, ``intermediate_size``, ``num_hidden_layers``,
        ``layer_types``) and safetensors weights (tied embeddings stay tied), written by
        transformers' own ``save_pretrained`` (``kwargs`` go to it). Tokenizer files of the
        folder the model was loaded from (or ``tokenizer_from``) are copied.

        The save is atomic: the folder is staged beside ``path`` and swapped in whole, so a
        kill leaves the old folder as it was. Over an existing folder, the files a Hugging Face
        save owns (config.json, generation_config.json, ``model*.safetensors``,
        ``pytorch_model*.bin`` and their ``*.index.json``) are replaced or removed, and every
        other file there stays (see ``fxprune.hf``).

        Raises:
            ConfigError: not a Hugging Face model, counts differ per layer (compile with
                ``uniform=True``, or use :meth:`save`), or kept heads' ALiBi slopes, which
                the stock class rebuilds from the config's count (``hf.check_heads_reload``).
            UnsupportedModelError: ``model`` fell back to the graph module (``model_note``).
            FileAccessError: ``path`` is the folder the model was loaded from (its dense
                weights would be replaced) and ``overwrite`` is False.

        Example:
            >>> result.save_pretrained("llama-pruned", max_shard_size="2GB")  # doctest: +SKIP
        """
        from fxprune.hf import save_pretrained

        return save_pretrained(
            self, path, tokenizer_from=tokenizer_from, overwrite=overwrite, **kwargs
        )

    def report(self) -> str:
        """The before / after table, the barriers that kept channels, and what each N:M /
        unstructured pass masked (layers left dense, with why)."""
        from fxprune.passes import coverage_lines

        lines = [self.summary.table()]
        if self.barriers:
            lines.append(f"\n{len(self.barriers)} barriers kept channels (first 10):")
            for b in self.barriers[:10]:
                layers = ", ".join(b["layers"][:3]) + (" ..." if len(b["layers"]) > 3 else "")
                lines.append(f"  {b['node']} ({b['op']}): {b['reason']} -> {layers}")
        lines += coverage_lines(self.passes)
        if self.plan.config.get("heads_round"):
            lines.append(f"\n{self.plan.config['heads_round']}")
        return "\n".join(lines)
