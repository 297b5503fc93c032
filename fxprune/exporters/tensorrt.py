"""TensorRT exporter: ONNX (checked and audited) -> engine with sparse weights enabled, plus the
builder's own account of which layers were eligible for sparse math and which got a sparse kernel.

"Eligible" means TensorRT found the 2:4 pattern in the layer's weights; "picked" means the timed
tactic it chose is a sparse one. TensorRT picks dense when that is faster (small channel counts,
small batches), so only "picked" layers run sparse. Sources: docs/research/tensorrt-sparsity.md.

Everything except the build itself is plain Python (command line, log parsing, report) and is
unit-tested on recorded builder logs; the build needs the ``tensorrt`` extra and an NVIDIA GPU.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fxprune._util import Report
from fxprune.errors import ExportError, MissingExtraError
from fxprune.exporters import Exporter

_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)$")
_PICKED = re.compile(
    r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(.*)$"
)


def _names(listed: str) -> list[str]:
    return [s.strip() for s in listed.split(", ") if s.strip()]


def parse_sparsity_log(lines) -> tuple[list[str], list[str]]:
    """(eligible, picked) TensorRT layer names from builder log lines (trtexec or Python logger).

    Each name is a fused TensorRT layer, often several ONNX nodes joined by ``" + "``.
    """
    eligible: list[str] = []
    picked: list[str] = []
    for line in lines:
        line = line.rstrip("\n")
        m = _ELIGIBLE.search(line)
        if m:
            eligible += _names(m.group(1))
        m = _PICKED.search(line)
        if m:
            picked += _names(m.group(1))
    return eligible, picked


@dataclass
class LayerRow:
    onnx_node: str
    trt_layer: str | None  # the fused TensorRT layer holding this node, when named in the log
    eligible: bool
    picked_sparse: bool


def layer_report(eligible: list[str], picked: list[str], onnx_nodes: list[str]) -> list[LayerRow]:
    """One row per weight-carrying ONNX node: is it inside an eligible / a sparse-picked layer?"""
    owner: dict[str, str] = {}
    for layer in eligible + picked:
        for part in layer.split(" + "):
            owner.setdefault(part.strip(), layer)
    e_parts = {p.strip() for layer in eligible for p in layer.split(" + ")}
    p_parts = {p.strip() for layer in picked for p in layer.split(" + ")}
    return [LayerRow(n, owner.get(n), n in e_parts, n in p_parts) for n in onnx_nodes]


MAX_BATCH, MAX_SEQUENCE = 64, 512


def profile_shapes(shape, example=None, opt_batch: int = 1):
    """(min, opt, max) shapes of one input for a TensorRT optimisation profile: every dynamic
    dim (-1 in the ONNX shape) gets one. Dim 0 is the batch: 1 .. max(64, opt_batch), optimised
    for ``opt_batch``; any other dynamic dim (a sequence) runs 1 .. max(512, example), optimised
    for the example's size there (128 when unknown)."""
    lo, opt, hi = [], [], []
    for d, n in enumerate(shape):
        if n != -1:
            lo.append(n), opt.append(n), hi.append(n)
        elif d == 0:
            lo.append(1), opt.append(opt_batch), hi.append(max(MAX_BATCH, opt_batch))
        else:
            o = int(example[d]) if example is not None and d < len(example) else 128
            lo.append(1), opt.append(o), hi.append(max(MAX_SEQUENCE, o))
    return lo, opt, hi


def trtexec_command(
    onnx_path,
    engine_path,
    *,
    fp16: bool = True,
    int8: bool = False,
    sparse: bool = True,
    trt_major: int = 10,
) -> str:
    """The trtexec line equivalent to this exporter's build (TRT 11 has no precision flags: the
    network is strongly typed and the ONNX's own dtypes decide)."""
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if trt_major < 11:
        parts += ["--fp16"] if fp16 else []
        parts += ["--int8"] if int8 else []
    if sparse:
        parts.append("--sparsity=enable")
    parts += ["--profilingVerbosity=detailed", "--verbose"]
    return " ".join(parts)


@dataclass
class TensorRTReport(Report):
    engine: Path
    onnx: Path
    command: str
    eligible: list[str]
    picked: list[str]
    layers: list[LayerRow] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def summary(self) -> str:  # the name before the report protocol
        return self.table()

    def table(self) -> str:
        lines = [
            f"wrote {self.engine} from {self.onnx}",
            f"equivalent: {self.command}",
            f"eligible for sparse math: {len(self.eligible)} layers; sparse kernel picked: "
            f"{len(self.picked)}",
        ]
        dense = [r.onnx_node for r in self.layers if r.eligible and not r.picked_sparse]
        if dense:
            lines.append(f"eligible but running dense (TensorRT timed dense faster): {dense[:8]}")
        return "\n".join(lines)


class TensorRTExporter(Exporter):
    format = "tensorrt"
    suffixes = (".engine", ".plan", ".trt")
    extra = "tensorrt"

    def export(
        self,
        module,
        example_inputs,
        path,
        *,
        fp16: bool = True,
        int8: bool = False,
        sparse: bool = True,
        workspace_gb: float = 4.0,
        **onnx_options,
    ) -> TensorRTReport:
        """ONNX export (with every check of the ONNX exporter) next to ``path``, then the build."""
        from fxprune.exporters import check_target

        check_target(path)  # an engine path that is a folder fails now, not after the build
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise ExportError(
                "building a TensorRT engine needs an NVIDIA GPU and none is "
                "visible; export ONNX here and run the printed trtexec command "
                "on the target machine"
            )
        from fxprune.exporters.onnx import OnnxExporter

        path = Path(path)
        onnx_path = path.with_suffix(".onnx")
        onnx_rep = OnnxExporter().export(module, example_inputs, onnx_path, **onnx_options)
        major = int(trt.__version__.split(".")[0])
        if fp16 and major >= 11:
            raise ExportError(
                "TensorRT 11 builds strongly typed networks only: precision comes "
                "from the ONNX file, so fp16=True needs an FP16 export (not yet "
                "supported here); pass fp16=False for an FP32 engine"
            )
        log: list[str] = []
        first = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
        engine = build_engine(
            trt,
            onnx_path,
            log,
            fp16=fp16,
            int8=int8,
            sparse=sparse,
            workspace=int(workspace_gb * 2**30),
            opt_batch=int(first.shape[0]),
            example_shapes=[
                list(a.shape)
                for a in (
                    example_inputs
                    if isinstance(example_inputs, (tuple, list))
                    else [example_inputs]
                )
            ],
        )
        _atomic_write(path, engine)
        eligible, picked = parse_sparsity_log(log)
        nodes = sorted({r.node for r in onnx_rep.audit})
        return TensorRTReport(
            path,
            onnx_path,
            trtexec_command(onnx_path, path, fp16=fp16, int8=int8, sparse=sparse, trt_major=major),
            eligible,
            picked,
            layer_report(eligible, picked, nodes),
            log,
        )


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingExtraError("tensorrt", "tensorrt", "building a TensorRT engine") from e
    return trt


def build_engine(
    trt,
    onnx_path: Path,
    log: list[str],
    *,
    fp16,
    int8,
    sparse,
    workspace,
    opt_batch,
    example_shapes=None,
) -> bytes:
    class Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):  # INFO carries the (Sparsity) lines
            log.append(msg)

    logger = Capture()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        if -1 in shape:
            example = example_shapes[i] if example_shapes and i < len(example_shapes) else None
            profile.set_shape(inp.name, *profile_shapes(shape, example, opt_batch))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ExportError("TensorRT build failed; last builder messages: " + " | ".join(log[-5:]))
    return bytes(blob)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
