"""The savings estimator: the seed calculator's formulas on a worked example, the hardware rules
(no GPU speedup for unstructured below 95 %, Amdahl for 2:4, roofline bounds) and the structured
scenario built by fxprune.compile."""

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.estimator import HARDWARE, estimate, nm_bytes_ratio


@pytest.fixture(scope="module")
def resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)


def _linear(n=1000, k=1000):
    return nn.Sequential(nn.Linear(k, n, bias=False)).eval()


def test_worked_example_pins_the_seed_formulas():
    # one 1000 x 1000 weight, 90 % unstructured: remaining = P x (1 - s) = 100,000
    rep = estimate(_linear(), torch.randn(1, 1000), sparsity=0.9, structured=None)
    dense = rep.scenario("dense")
    assert dense.params == 1_000_000
    assert dense.bytes["dense"] == {"fp32": 4_000_000, "fp16": 2_000_000, "int8": 1_000_000}
    assert dense.flops == 2_000_000  # 2 x MACs at batch 1

    un = rep.scenario("unstructured")
    assert un.params == 100_000
    # CSR: nnz x (value + 4-byte index) + (rows + 1) x 4
    assert un.bytes["CSR"]["fp16"] == 100_000 * (2 + 4) + 1001 * 4 == 604_004
    assert un.bytes["CSR"]["fp32"] == 100_000 * (4 + 4) + 1001 * 4
    # bitmask: nnz x value + positions / 8
    assert un.bytes["bitmask"]["fp16"] == 100_000 * 2 + 1_000_000 / 8 == 325_000
    assert un.nominal_flops == pytest.approx(200_000)
    assert un.flops == 2_000_000  # dense kernels still run over the zeros
    assert "1,000,000 x (1 - 0.9) = 100,000" in un.formulas[0]
    assert all(v == 1.0 for hw in un.speedup.values() for v in hw.values())

    nm = rep.scenario("2:4")
    assert nm.params == 500_000
    # half the values + a 2-bit index per kept value
    assert nm.bytes["compressed"]["fp16"] == 500_000 * 2 + 500_000 * 2 / 8 == 1_125_000
    assert nm.bytes["compressed"]["int8"] == 500_000 + 125_000
    assert nm_bytes_ratio("fp16") == 0.5625


def test_index_overhead_exceeds_savings_at_half_sparsity():
    # the seed guide's warning: at 50 % an fp32 CSR is as large as the dense weight
    rep = estimate(_linear(), torch.randn(1, 1000), sparsity=0.5, nm=None, structured=None)
    csr = rep.scenario("unstructured").bytes["CSR"]["fp32"]
    assert csr >= rep.scenario("dense").bytes["dense"]["fp32"]


def test_amdahl_and_roofline_by_hand():
    # Linear 4096 x 4096 fp16 on the H100 profile, rows 1 (decoding) and 8192 (a big batch)
    rep = estimate(
        _linear(4096, 4096),
        torch.randn(1, 4096),
        sparsity=None,
        structured=None,
        hardware=["H100", "cpu"],
        batch_sizes=[1, 8192],
    )
    h100 = HARDWARE["H100"]
    (r1,) = [r for r in rep.roofline["H100"][1] if r.op == "linear"]
    # intensity = 2 M K N / ((K N + M K + M N) x 2 bytes) ~ 1 FLOP/byte at M = 1
    assert r1.intensity == pytest.approx(2 * 4096 * 4096 / ((4096 * 4096 + 2 * 4096) * 2))
    assert r1.bound == "memory" and h100.ridge("fp16") == pytest.approx(989e12 / 3350e9)
    (rb,) = [r for r in rep.roofline["H100"][8192] if r.op == "linear"]
    assert rb.bound == "compute"
    nm = rep.scenario("2:4")
    # rows 1 < the measured 4096-row minimum: no gain; compute-bound at 8192 rows: f = 1, k = 1.5
    assert nm.speedup["H100"][1] == 1.0
    assert nm.speedup["H100"][8192] == pytest.approx(h100.sparse_factor)
    assert nm.speedup["cpu"][8192] == 1.0  # no sparse math on the CPU profile
    assert "S = 1 / ((1 - 1.000) + 1.000 / 1.50) = 1.50x" in nm.formulas[-2]


def test_unstructured_only_pays_above_the_threshold_and_only_on_gpus():
    x = torch.randn(1, 4096)
    m = _linear(4096, 4096)
    low = estimate(m, x, sparsity=0.9, nm=None, structured=None, batch_sizes=[1])
    high = estimate(m, x, sparsity=0.98, nm=None, structured=None, batch_sizes=[1])
    assert low.scenario("unstructured").speedup["H100"][1] == 1.0
    # memory-bound at batch 1: a CSR kernel reads fewer bytes than the dense weight
    assert high.scenario("unstructured").speedup["H100"][1] > 2.0
    assert high.scenario("unstructured").speedup["cpu"][1] == 1.0


def test_structured_scenario_is_the_real_pruned_model(resnet18):
    model, x = resnet18
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = estimate(model, x, structured={"channels": 0.5, "ignore": ["fc"]}, batch_sizes=[8])
    st = rep.scenario("structured")
    res = fxprune.compile(model, x, channels=0.5, ignore=["fc"])
    assert st.params == sum(p.numel() for p in res.module.parameters())
    assert st.flops == pytest.approx(2 * res.summary.macs_after)
    # a smaller dense model: every profile speeds up, by at most the inverse FLOP ratio
    for hw in rep.hardware:
        assert 1.0 < st.speedup[hw][8] <= 1.02 / res.summary.macs_ratio
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the estimate sits next to a measurement of the same model
    fake = fxprune.verify.LatencyReport("onnxruntime", 2, 1, 2)
    r = res.summary.macs_ratio
    fake.rows.append(
        fxprune.verify.LatencyRow(8, 10.0, 9.0, 11.0, 4.0, 3.5, 4.5, 2.5, r, 2.5 * r, 0.0, "ok")
    )
    (row,) = rep.compare(fake, hardware="cpu")
    assert row["measured"] == 2.5 and row["estimated"] == st.speedup["cpu"][8]
    assert "measured" in rep.table()


def test_report_table_and_json(resnet18):
    model, x = resnet18
    rep = estimate(model, x, hardware=["A100", "cpu"], batch_sizes=[1])
    text = rep.table()
    for s in ("unstructured 90%", "2:4", "structured", "ridge point", "remaining = P x (1 - s)"):
        assert s in text
    import json

    d = json.loads(rep.to_json())
    assert {s["name"].split(" ")[0] for s in d["scenarios"]} >= {"dense", "unstructured", "2:4"}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"sparsity": 1.0}, "sparsity=1.0"),
        ({"nm": "4:8"}, "only '2:4'"),
        ({"hardware": ["TPU"]}, "hardware 'TPU'"),
        ({"dtype": "bf8"}, "dtype='bf8'"),
        ({"batch_sizes": [0]}, "batch_sizes"),
        ({"structured": 2}, "structured=2"),
    ],
)
def test_bad_arguments_name_the_problem(kw, match):
    with pytest.raises(ConfigError, match=match):
        estimate(_linear(8, 8), torch.randn(1, 8), **kw)


def test_structured_failure_is_reported_not_raised():
    x = torch.randn(1, 8)
    rep = estimate(_linear(8, 8), x, structured={"channels": 0.5})  # only the model output
    assert "channels=0.5 removes nothing" in rep.scenario("structured").skipped
    rep = estimate(_linear(8, 8), x, structured={"channels": 0.5, "ignore": ["nope"]})
    assert "'nope' matches no module name" in rep.scenario("structured").skipped
    assert "skipped: nothing" not in rep.table()


def test_exclude_applies_to_unstructured_and_nm_only_results_are_priced():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    x = torch.randn(4, 64)
    every = estimate(m, x, structured=None, nm=None)
    kept = estimate(m, x, structured=None, nm=None, exclude=["2"])
    assert kept.scenario("unstructured").params == every.scenario("unstructured").params + round(
        64 * 64 * 0.9
    )
    only_nm = fxprune.compile(m, x, sparsity="2:4")
    rep = estimate(m, x, structured=only_nm, batch_sizes=[1])
    st = rep.scenario("structured")
    assert st.skipped is None and "2 weights N:M-masked" in st.formulas[0]


def test_custom_hardware_gets_its_ridge_in_the_table():
    from fxprune.estimator import Hardware

    tiny = Hardware(
        "edge",
        "gpu",
        {"fp32": 2.0, "fp16": 4.0, "int8": 8.0},
        1.0,
        50.0,
        True,
        1.5,
        0,
        0.95,
        "made up",
    )
    rep = estimate(_linear(8, 8), torch.randn(1, 8), hardware=[tiny], structured=None)
    assert "roofline edge fp16, batch 1: ridge point 80 FLOP/byte" in rep.table()
