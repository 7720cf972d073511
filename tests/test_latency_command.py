"""``rigfm latency``: the predictor timed on this machine, torch-free, against configurable limits.

Timing values are never asserted against a threshold here (the machine is shared); the tests check that the
command measures what it says (real predictor process, real sockets, real sessions), that the numbers are
consistent with each other, and that the verdict and exit code follow the limits.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from onnx_helpers import TINY

from export.latency import Case, paced, verdicts
from export.onnx_export import export_checkpoint, save_random_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("lat")
    ck = save_random_checkpoint(d / "tiny.pt", config=TINY, seed=3)
    return export_checkpoint(ck, d / "tiny.onnx", context=16, streaming=d / "tiny_step.onnx").full_path


def _latency(args: list[str]) -> subprocess.CompletedProcess:
    """``rigfm latency ARGS`` in a process where torch and onnx cannot be imported (a rig PC)."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
        "from controllers.cli import main; sys.exit(main(['latency', *sys.argv[1:]]))"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=180)


def test_latency_runs_without_torch_and_reports_consistent_numbers(model, tmp_path):
    out = tmp_path / "lat.json"
    r = _latency([str(model), "--iters", "40", "--rate-hz", "200", "--json", str(out), "--no-progress",
                  "--max-rtt-p99-ms", "1e9", "--max-overhead-ms", "1e9", "--check"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert [c["case"] for c in rep["cases"]] == ["predict B1 T16", "stream_step B1", "stream_step @200Hz"]
    assert rep["model"]["step_cache"] == "buffer" and rep["model"]["context"] == 16
    for c in rep["cases"]:
        assert c["calls"] == 40
        # the server's handling time lies inside each round trip: 0 < transport < round trip
        assert 0 < c["transport_p50_ms"] < c["rtt_p50_ms"] <= c["rtt_p99_ms"] <= c["rtt_max_ms"]
        assert math.isfinite(c["server_p50_ms"]) and c["server_p50_ms"] > 0
        # the model call is part of the server's handling time
        assert 0 < c["server_compute_p50_ms"] <= c["server_p50_ms"] and c["server_other_p50_ms"] > 0
    for c in rep["cases"][:2]:  # in-process reference: overhead = round trip - in-process
        assert c["local_p50_ms"] > 0
        assert c["overhead_p50_ms"] == pytest.approx(c["rtt_p50_ms"] - c["local_p50_ms"])
    paced_case = rep["cases"][2]
    assert paced_case["period_ms"] == pytest.approx(5.0) and 0 <= paced_case["over_period"] <= 40
    assert len(rep["verdicts"]) == 6 and all(v["ok"] for v in rep["verdicts"])
    assert "targets: round trip p99 <= 1e+09 ms" in r.stdout and "ok  stream_step B1" in r.stdout
    assert "where the round trip goes" in r.stdout and "(the same inference in-process:" in r.stdout


def test_check_exits_1_when_a_limit_is_missed(model):
    r = _latency([str(model), "--iters", "20", "--rate-hz", "0", "--no-progress", "--max-overhead-ms", "0",
                  "--check"])
    assert r.returncode == 1, r.stderr
    assert "NO  predict B1 T16         overhead_p50_ms" in r.stdout
    assert "stream_step @" not in r.stdout  # --rate-hz 0 skips the paced case


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--window", "0"], "argument --window: must be an integer in [1, 65536], got '0'"),
        (["--window", "65"], "window must be in 1..64"),
        (["--iters", "3"], "argument --iters: must be an integer in [10, 100000000], got '3'"),
        (["--max-overhead-ms", "nan"], "--max-overhead-ms: must be a finite number in [0, 1e+09] ms"),
        (["--rate-hz", "-5"], "argument --rate-hz: must be a finite number in [0, 10000] Hz, got '-5'"),
        (["--rate-hz", "nan"], "argument --rate-hz: must be a finite number in [0, 10000] Hz, got 'nan'"),
        (["--rate-hz", "1e9"], "argument --rate-hz: must be a finite number in [0, 10000] Hz, got '1e9'"),
        (["--server-cpu", "4096"], "--server-cpu 4096: no such CPU"),
    ],
)
def test_bad_arguments_are_refused_by_name(model, args, message):
    r = _latency([str(model), "--no-progress", *args])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_model_without_step_graph_is_timed_on_predict_only(tmp_path):
    ck = save_random_checkpoint(tmp_path / "tiny.pt", config=TINY, seed=4)
    full = export_checkpoint(ck, tmp_path / "full_only.onnx", context=16).full_path
    r = _latency([str(full), "--iters", "20", "--no-progress", "--window", "8", "--bind", "tcp://127.0.0.1:*"])
    assert r.returncode == 0, r.stderr
    assert "predict B1 T8" in r.stdout
    assert "stream_step B1" not in r.stdout and "stream_step @" not in r.stdout
    assert "note: no step graph next to the model: stream_step not measured" in r.stdout


def test_missing_model_file_is_named(tmp_path):
    r = _latency([str(tmp_path / "nope.onnx")])
    assert r.returncode == 2 and "model file not found" in r.stderr and "nope.onnx" in r.stderr


def test_verdicts_follow_the_limits():
    cases = [
        Case("a", np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.5, 2.5]), np.array([0.9, 1.0, 1.1])).summary(),
        Case("paced", np.array([0.4, 0.5, 0.6]), np.array([0.3, 0.3, 0.3])).summary(),
    ]
    got = {(v["case"], v["metric"]): v for v in verdicts(cases, max_rtt_p99_ms=2.5, max_overhead_ms=0.5)}
    assert set(got) == {("a", "rtt_p99_ms"), ("a", "overhead_p50_ms"),
                        ("paced", "rtt_p99_ms"), ("paced", "transport_p50_ms")}
    assert not got["a", "rtt_p99_ms"]["ok"]  # p99 of 1, 2, 3 is 2.98
    over, trans = got["a", "overhead_p50_ms"], got["paced", "transport_p50_ms"]
    assert not over["ok"] and over["value"] == pytest.approx(1.0)  # rtt p50 2.0 - in-process p50 1.0
    assert got["paced", "rtt_p99_ms"]["ok"]
    assert trans["value"] == pytest.approx(0.2) and trans["ok"]  # no in-process reference: rtt - server


def test_paced_calls_wait_for_their_tick():
    import time

    stamps: list[float] = []
    t0 = time.perf_counter()
    t = paced(lambda: stamps.append(time.perf_counter()), rate_hz=200.0, iters=20)
    assert t.shape == (20,) and (t >= 0).all()
    # call i never starts before tick i + 1 (5 ms apart): the loop sleeps / spins, it does not run ahead
    assert (np.asarray(stamps) - t0 >= 0.005 * np.arange(1, 21)).all()
    with pytest.raises(ValueError, match="rate_hz must be > 0"):
        paced(lambda: None, 0.0, 1)
