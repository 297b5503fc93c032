"""Hardware profiles of the estimator: dense datasheet peaks per dtype, bandwidth, and what
sparsity each can exploit, every figure with its source."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
INDEX_BYTES = 4  # int32 column indices and row pointers in CSR
NM_META_BITS = 2  # a 2-bit position index per kept value of a 2:4 group


@dataclass(frozen=True)
class Hardware:
    """A hardware profile: dense peak math per dtype (TFLOP/s), memory bandwidth (GB/s), and
    what sparsity it can exploit. Figures are dense (no-sparsity) datasheet numbers."""

    name: str
    kind: str  # "gpu" or "cpu"
    tflops: Mapping[str, float]  # dense peak per dtype (tensor cores on GPUs)
    cuda_tflops: float  # fp32 peak without tensor cores (where unstructured kernels run)
    bandwidth_gbs: float
    sparse_24: bool  # has 2:4 sparse math
    sparse_factor: float  # speedup of a compute-bound 2:4 GEMM's math
    sparse_min_rows: int  # GEMMs with fewer rows (tokens / pixels x batch) gain nothing
    unstructured_threshold: float | None  # sparsity above which sparse kernels may pay (GPU)
    source: str

    def ridge(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) where memory-bound turns compute-bound."""
        return self.tflops[dtype] * 1e12 / (self.bandwidth_gbs * 1e9)


HARDWARE: dict[str, Hardware] = {
    "A100": Hardware(
        "A100",
        "gpu",
        {"fp32": 156.0, "fp16": 312.0, "int8": 624.0},  # fp32 = TF32 tensor cores
        19.5,
        2039.0,
        True,
        1.6,
        4096,
        0.95,
        "NVIDIA A100 SXM4 80GB datasheet (dense figures; the sparse ones are 2x); 2:4 factor 1.6 "
        "from the seed calculator (~1.5-1.7x); min rows 4096 as measured on the H100 (no A100 "
        "measurement yet)",
    ),
    "H100": Hardware(
        "H100",
        "gpu",
        {"fp32": 495.0, "fp16": 989.0, "int8": 1979.0},
        67.0,
        3350.0,
        True,
        1.5,
        4096,
        0.95,
        "NVIDIA H100 SXM5 datasheet (dense; the seed guide's 2000 TFLOPS fp16 is the sparse "
        "figure); 2:4 factor 1.5 and min rows 4096 measured by fxprune (docs/benchmarks-gpu.md: "
        "cuSPARSELt 1.51x on 8192^3, 1.12-1.32x on BERT-size GEMMs at M>=4096, slower below)",
    ),
    "L4": Hardware(
        "L4",
        "gpu",
        {"fp32": 60.0, "fp16": 121.0, "int8": 242.0},
        30.3,
        300.0,
        True,
        1.6,
        4096,
        0.95,
        "NVIDIA L4 datasheet (dense; the sparse figures are 2x); 2:4 factor 1.6 from the seed "
        "calculator; min rows 4096 as measured on the H100 (no L4 measurement yet)",
    ),
    "cpu": Hardware(
        "cpu",
        "cpu",
        {"fp32": 0.77, "fp16": 0.77, "int8": 1.54},
        0.77,
        50.0,
        False,
        1.0,
        0,
        None,
        "generic 8-core AVX2/FMA CPU at 3 GHz (8 x 32 FLOP/cycle; fp16 computed in fp32; int8 "
        "with VNNI 2x) and dual-channel DDR4-3200 (~50 GB/s); stock runtimes have no 2:4 or "
        "unstructured sparse kernels",
    ),
}
