"""How much the latency verifier's numbers can be trusted: other processes' CPU use while
timing and the spread between rounds, the thresholds that flag a run noisy, and where the flag
shows (table, JSON, HTML). No timing is asserted; the machine is shared."""

from __future__ import annotations

import importlib
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

import fxprune
from fxprune import report
from fxprune.verify.latency_report import (
    MIN_WINDOW_S,
    OTHER_CPU_LIMIT,
    SPREAD_LIMIT,
    LatencyReport,
    LatencyRow,
    noise_reasons,
)
from fxprune.verify.latency_runners import CpuMonitor, CpuSample, other_cores

lat = importlib.import_module("fxprune.verify.latency")  # the module, not the function
runners = importlib.import_module("fxprune.verify.latency_runners")
HAS_PROC = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")


class Sleeper:
    """A runner whose call sleeps ``delay()`` seconds and returns the model's output (computed
    once, in ``prepare``: the timing is the sleep alone, whatever the load on the machine)."""

    notes: tuple[str, ...] = ()

    def __init__(self, module, delay):
        self.module, self.delay = module, delay

    def prepare(self, args):
        with torch.inference_mode():
            return self.module(*args)

    def run(self, prepared):
        time.sleep(self.delay())
        return prepared


@pytest.fixture
def sleeping(monkeypatch):
    """Register backends whose calls sleep: "jitter" a random 0-5 ms, "steady" 5 ms."""
    monkeypatch.setattr(lat, "REGISTRY", dict(lat.REGISTRY))
    rng = random.Random(0)

    @fxprune.verify.backend("jitter")
    class Jitter(fxprune.verify.Backend):
        def runner(self, module, args, ctx):
            return Sleeper(module, lambda: rng.uniform(0.0, 0.005))

    @fxprune.verify.backend("steady")
    class Steady(fxprune.verify.Backend):
        def runner(self, module, args, ctx):
            return Sleeper(module, lambda: 0.005)


# ---------------------------------------------------------------- the classification


def test_clean_numbers_pass_and_noisy_ones_are_named():
    assert noise_reasons(0.1, 0.05) == []
    assert noise_reasons(0.0, 0.0, window_s=MIN_WINDOW_S) == []
    (cpu,) = noise_reasons(0.9, 0.02)
    assert "0.90 cores" in cpu
    (spread,) = noise_reasons(0.0, 0.14)
    assert "14%" in spread
    assert len(noise_reasons(1.2, 0.3)) == 2
    # just past each threshold flags, just below does not
    assert noise_reasons(OTHER_CPU_LIMIT + 0.01, 0.0) and not noise_reasons(OTHER_CPU_LIMIT, 0.0)
    assert noise_reasons(0.0, SPREAD_LIMIT + 0.01) and not noise_reasons(0.0, SPREAD_LIMIT)


def test_spare_cores_short_windows_and_unknown_readings():
    # a run of 2 threads on 8 CPUs leaves 6: other load that fits there is not contention
    assert noise_reasons(1.5, 0.0, spare_cores=6) == []
    assert "beyond the 1 spare" in noise_reasons(1.5, 0.0, spare_cores=1)[0]
    # a few /proc ticks over a short window say nothing: not judged
    assert noise_reasons(3.0, 0.0, window_s=MIN_WINDOW_S / 10) == []
    assert noise_reasons(None, 0.0) == []  # no /proc: the spread alone judges
    assert noise_reasons(None, 0.5) != []


def test_other_cores_from_samples():
    a, b = CpuSample(10.0, 100.0, 5.0), CpuSample(12.0, 103.0, 6.0)
    assert other_cores(a, b) == pytest.approx(1.0)  # 3 busy core-s, 1 our own, over 2 s
    assert other_cores(a, CpuSample(12.0, 100.5, 6.0)) == 0.0  # tick rounding: never negative
    assert other_cores(None, b) is None and other_cores(b, a) is None


def test_a_noisy_report_still_gates_on_speed():
    rep = LatencyReport("torch", 2, 1, 2, noisy=True, noise=["other processes kept 1.00 cores"])
    rep.rows.append(LatencyRow(1, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0, 0.5, 0.5, 0.25, 0.0, "slower"))
    assert rep.slower() and rep.min_speedup() == 0.5  # --fail-if-slower / --min-speedup
    assert "NOISY run" in rep.table() and "1.00 cores" in rep.table()
    assert json.loads(rep.to_json())["noisy"] is True


# ---------------------------------------------------------------- measured


def test_jitter_between_rounds_flags_the_run(pruned, sleeping):
    m, x, res = pruned
    rep = fxprune.verify.latency(m, res, x, backend="jitter", batch_sizes=(1, 2), repeats=20)
    for r in rep.rows:
        assert r.round_spread > SPREAD_LIMIT and r.noisy
        assert any("spread" in n for n in r.noise)
        assert r.speedup_p10 <= r.speedup_p90
    assert rep.noisy
    text = rep.table()
    assert "| noise |" in text and "NOISY" in text and "NOISY run" in text
    data = json.loads(rep.to_json())
    assert data["noisy"] is True and data["rows"][0]["noisy"] is True
    assert data["rows"][0]["round_spread"] > SPREAD_LIMIT
    page = report.render("t", latency=rep)
    assert "Noisy run" in page and "NOISY" in page and "speedup [rounds p10-p90]" in page


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
def test_a_busy_loop_in_another_process_is_seen(pruned, sleeping):
    m, x, res = pruned
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        # 2 x 60 calls of 5 ms asleep: 0.6 s timed, this process nearly idle
        rep = fxprune.verify.latency(m, res, x, backend="steady", batch_sizes=(1,), repeats=60)
    finally:
        busy.kill()
        busy.wait()
    assert rep.timed_s >= MIN_WINDOW_S and rep.cpu_source == "/proc"
    assert rep.other_cpu > 0.5  # the loop alone keeps about one core busy
    assert rep.rows[0].other_cpu is not None and rep.rows[0].other_cpu > 0.5
    assert rep.noisy and any("cores busy" in n for n in rep.noise)


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
def test_a_plain_run_reports_the_other_cpu_it_saw(pruned):
    m, x, res = pruned
    rep = fxprune.verify.latency(m, res, x, backend="torch", batch_sizes=(1,), repeats=4)
    # not asserted small: other work shares this machine
    assert isinstance(rep.other_cpu, float) and rep.other_cpu >= 0.0
    assert rep.cpus >= 1 and rep.timed_s >= MIN_WINDOW_S  # short timing: read on after it
    r = rep.rows[0]
    assert rep.topped_up_s == pytest.approx(max(0.0, rep.timed_s - r.timed_s), abs=1e-6)
    # a window of a few ticks is not reported: the run's reading stands for the row
    assert (r.other_cpu is None) == (r.timed_s < MIN_WINDOW_S)
    assert r.round_spread >= 0.0 and r.noisy == bool(r.noise)
    assert rep.noisy == (bool(rep.noise) or r.noisy)
    data = json.loads(rep.to_json())
    for k in ("other_cpu", "cpus", "timed_s", "cpu_source", "noisy", "noise"):
        assert k in data
    assert {"round_spread", "speedup_p10", "speedup_p90", "other_cpu", "noisy"} <= set(
        data["rows"][0]
    )
    assert "note: noise: other processes' CPU use while timing:" in rep.table()


def test_without_proc_the_reading_is_none_and_said_so(pruned, sleeping, monkeypatch):
    monkeypatch.setattr(runners, "cpu_sample", lambda: None)
    monkeypatch.setattr(lat, "cpu_source", lambda: "unavailable")
    m, x, res = pruned
    rep = fxprune.verify.latency(m, res, x, backend="jitter", batch_sizes=(1,), repeats=10)
    assert rep.other_cpu is None and rep.rows[0].other_cpu is None
    assert "not measured" in rep.table() and "unavailable" in rep.table()
    assert rep.noisy and all("cores" not in n for n in rep.rows[0].noise)  # the spread alone


def test_the_monitor_adds_up_windows():
    mon = CpuMonitor()
    mon.start()
    time.sleep(0.05)
    cores, secs = mon.stop()
    assert secs >= 0.05 and (cores is None or cores >= 0.0)
    added = mon.top_up(0.2, work=lambda: time.sleep(0.01))
    other, total = mon.total()
    assert total >= 0.2 and added > 0.0 and (other is None or other >= 0.0)
    assert mon.top_up(0.1) == 0.0  # already covered
