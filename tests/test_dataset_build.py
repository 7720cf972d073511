"""Dataset build from synthetic runs logged with the real RunLogger (no sleeping: explicit timestamps)."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pytest

from fm_core.trajfile import load_trajectories
from hardware.dataset_build import DatasetBuildError, build_dataset
from hardware.log_commands import register
from hardware.logger import RunLogger

T0 = 1_700_000_000_000_000_000
RATE_HZ = 500
META = {"rig": "cartpole", "rig_config": {"name": "cartpole", "model_dt": 0.01}, "controller": "test"}


def u_of(t: float) -> float:
    """Commanded voltage: steps every 0.1 s (commands are sent 0.5 ms after each state)."""
    return float(math.floor(t / 0.1) % 5) - 2.0


def log_run(directory, name: str, seconds: float, fault_at: float | None = None,
            flag_span: tuple[float, float] | None = None, dev_offset_us: int = 0,
            applied: bool = False, monotonic_host: bool = False) -> None:
    """p = t (so every dataset sample tells its own time), theta = sin t; velocities [1, cos t]."""
    step_ns = 1_000_000_000 // RATE_HZ
    with RunLogger(directory, META, run_name=name, fsync_s=None) as log:
        mode = "balance"
        log.write("/mode", {"host_time_ns": T0, "mode": mode, "previous": "idle"}, log_time_ns=T0)
        for k in range(int(seconds * RATE_HZ)):
            t = k / RATE_HZ
            th = T0 + k * step_ns
            flags = 0x30  # MOTOR_ENABLED | CONNECTED: benign, must not exclude anything
            if flag_span and flag_span[0] <= t < flag_span[1]:
                flags |= 0x04  # LIMIT_HIT
            rec = {"seq": k, "device_time_us": (dev_offset_us + k * step_ns // 1000) % (1 << 32),
                   "host_time_ns": th + 150_000 - (T0 - 12_345_000_000 if monotonic_host else 0),
                   "positions": [t, math.sin(t)],
                   "velocities": [1.0, math.cos(t)], "counts": [k, k], "flags": flags}
            if applied:  # the firmware applied half of the previous command (as if clamped)
                rec["applied_voltage"] = 0.5 * u_of(t - 0.0015)
            assert log.write("/state", rec, log_time_ns=th + 200_000)
            tc = th + 500_000
            assert log.write("/command", {"seq": k, "host_time_ns": tc, "voltage": u_of(tc / 1e9 - T0 / 1e9)},
                             log_time_ns=tc)
            if fault_at is not None and abs(t - fault_at) < 1e-9:
                log.write("/fault", {"host_time_ns": th, "code": "limit", "message": "x"}, log_time_ns=th)
                log.write("/mode", {"host_time_ns": th, "mode": "estop", "previous": mode}, log_time_ns=th)
            if fault_at is not None and abs(t - (fault_at + 1.0)) < 1e-9:
                rec = {"host_time_ns": th, "mode": "balance", "previous": "estop"}
                log.write("/mode", rec, log_time_ns=th)
            if k % 2000 == 1999:
                while log.stats()["queued"] > 20_000:  # keep the queue from overflowing in this tight loop
                    time.sleep(0.001)
        st = log.close()
    assert st["dropped"] == 0 and st["write_errors"] == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    log_run(d / "a", "run_a", 12.0, fault_at=4.0, flag_span=(8.0, 9.0))
    # run_b: the device clock wraps after 3 s; host_time_ns is time.monotonic_ns() like hardware.driver's
    log_run(d / "b", "run_b", 8.0, dev_offset_us=(1 << 32) - 3_000_000, monotonic_host=True)
    log_run(d / "c", "run_c", 8.0, applied=True)
    return d


def _check_samples(ts, window: int, u_scale: float = 1.0) -> None:
    t = ts.x[:, :, 0].astype(np.float64)  # p == time since the first state
    assert np.allclose(np.diff(t, axis=1), 0.01, atol=1e-4), "grid step is not dt"
    assert np.allclose(ts.x[:, :, 1], np.sin(t), atol=1e-4)
    assert np.allclose(ts.x[:, :, 2], 1.0) and np.allclose(ts.x[:, :, 3], np.cos(t), atol=1e-4)
    # zero-order hold: the command in force at grid time t was sent at or before t
    expected_u = np.vectorize(u_of)(t - 0.0005 - 1e-7)
    assert np.array_equal(ts.u[:, :, 0], (u_scale * expected_u).astype(np.float32))
    assert ts.x.shape[1:] == (window, 4) and ts.u.shape[1:] == (window, 1)


def test_build_splits_by_run_and_excludes_faults(runs, tmp_path):
    out = tmp_path / "ds.npz"
    rep = build_dataset([runs], out, window=64, stride=32, split="0.6,0.2,0.2", seed=1)
    ts = load_trajectories(out)
    assert ts.dt == pytest.approx(0.01) and ts.rig == "cartpole"
    assert ts.state_names == ["p", "theta", "p_dot", "theta_dot"] and ts.input_names == ["voltage"]
    assert len(ts) == sum(rep["windows"].values()) and rep["split_mode"] == "by-run"
    _check_samples(ts, 64)
    # one run never spans two splits, and every split is used
    for src in set(ts.source.tolist()):
        assert len(set(ts.split[ts.source == src].tolist())) == 1
    assert set(ts.split.tolist()) == {"train", "val", "test"}
    assert set(ts.source.tolist()) == {"run_a", "run_b", "run_c"}
    # run_a: nothing from the fault/e-stop stretch [4 - guard, 5) or the flagged stretch [8, 9)
    ta = ts.x[ts.source == "run_a"][:, :, 0]
    assert len(ta) > 0
    assert not np.any((ta > 4.0 - 0.021) & (ta < 5.0))
    assert not np.any((ta >= 8.0 - 0.002) & (ta < 9.0))
    pts = rep["runs"]["run_a"]["points"]
    assert pts["mode"] >= 99 and pts["flags"] >= 99 and pts["fault"] >= 4
    # run_b's device clock wrapped: sample times stay continuous (checked by _check_samples) and complete
    assert rep["runs"]["run_b"]["points"]["valid"] >= 790
    assert "MCAP log time" in rep["runs"]["run_b"]["clock"]
    assert "host_time_ns" in rep["runs"]["run_a"]["clock"]


def test_dataset_keeps_run_id_episode_frame_index_and_timestamps(runs, tmp_path):
    out = tmp_path / "prov.npz"
    rep = build_dataset([runs], out, window=64, stride=32, split="0.6,0.2,0.2", seed=1)
    ts = load_trajectories(out)
    assert ts.has_provenance and rep["episodes"] == len(set(ts.episode.tolist()))
    assert ts.run_id.tolist() == ts.source.tolist()  # split by run: the source is the run id
    p = ts.x[:, :, 0].astype(np.float64)  # p == time since the run's first state
    # timestamps: host time of each sample (the runs' first states were received at T0 + 150 us)
    for run in ("run_a", "run_c"):
        sel = ts.run_id == run
        assert np.allclose(ts.timestamps()[sel] - p[sel], T0 / 1e9 + 150e-6, atol=2e-4)
    # frames: consecutive at dt inside an episode; an episode never spans two runs or splits
    for ep in set(ts.episode.tolist()):
        sel = ts.episode == ep
        assert len(set(ts.run_id[sel].tolist())) == 1 and len(set(ts.split[sel].tolist())) == 1
        start = p[sel][:, 0] - ts.frame_index[sel] * ts.dt  # the episode's first grid time, for every window
        assert np.allclose(start, start[0], atol=1e-4)
    assert np.array_equal(ts.frame_indices()[:, 1:] - ts.frame_indices()[:, :-1], np.ones((len(ts), 63)))
    # run_a has a fault and a flagged stretch: it falls into more than one episode
    assert len(set(ts.episode[ts.run_id == "run_a"].tolist())) >= 3


def test_single_run_splits_by_time_blocks(runs, tmp_path):
    out = tmp_path / "one.npz"
    rep = build_dataset([runs / "c" / "run_c_0000.mcap"], out, window=50, stride=50, split="0.8,0.1,0.1")
    assert rep["split_mode"] == "time-blocks" and "time blocks" in rep["note"]
    ts = load_trajectories(out)
    _check_samples(ts, 50)
    t_end = {s: ts.x[ts.split == s][:, :, 0] for s in ("train", "val", "test")}
    assert t_end["train"].max() < t_end["val"].min() and t_end["val"].max() < t_end["test"].min()
    assert set(ts.source.tolist()) == {"run_c#train", "run_c#val", "run_c#test"}
    assert set(ts.run_id.tolist()) == {"run_c"}
    for split in ("train", "val", "test"):  # each time block is its own episode, its frames counted from 0
        sel = ts.split == split
        assert len(set(ts.episode[sel].tolist())) == 1 and ts.frame_index[sel].min() == 0


def test_applied_voltage_input(runs, tmp_path):
    out = tmp_path / "applied.npz"
    rep = build_dataset([runs / "c"], out, window=50, input_source="applied")
    assert rep["input"] == "applied"
    _check_samples(load_trajectories(out), 50, u_scale=0.5)
    with pytest.raises(DatasetBuildError, match=r"run_a.*run_a_0000.mcap.*applied_voltage"):
        build_dataset([runs / "a"], out, input_source="applied")


def test_bad_inputs_name_the_file(runs, tmp_path):
    junk = tmp_path / "junk.mcap"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetBuildError, match="no usable run in 1 file.*junk.mcap.*not an MCAP file"):
        build_dataset([junk], tmp_path / "x.npz")
    with RunLogger(tmp_path / "ev", META, run_name="events_only") as log:
        log.write("/event", {"host_time_ns": T0, "name": "hello"})
    with pytest.raises(DatasetBuildError, match=r"events_only.*no /state and /command messages"):
        build_dataset([tmp_path / "ev"], tmp_path / "x.npz")
    with pytest.raises(DatasetBuildError, match="no valid window of 100000 steps"):
        build_dataset([runs / "c"], tmp_path / "x.npz", window=100_000)
    with pytest.raises(DatasetBuildError, match="--split"):
        build_dataset([runs / "c"], tmp_path / "x.npz", split="0.8,0.2")
    with pytest.raises(DatasetBuildError, match="nope: no such file"):
        build_dataset([tmp_path / "nope"], tmp_path / "x.npz")


def test_empty_and_unreadable_parts_are_skipped_with_a_warning_naming_them(runs, tmp_path, capsys):
    """A folder with one good run, an empty file, a non-MCAP file and a part with no messages: the build
    skips the three (each named), succeeds, and the CLI prints the warnings on stderr."""
    import shutil

    d = tmp_path / "mixed"
    shutil.copytree(runs / "c", d)
    (d / "empty_0001.mcap").write_bytes(b"")
    (d / "junk_0000.mcap").write_text("not a log")
    with RunLogger(d, META, run_name="nothing"):
        pass  # header + metadata, no messages: what a rotated part that never got a frame looks like
    rep = build_dataset([d], tmp_path / "m.npz", window=50)
    skipped = " | ".join(rep["skipped"])
    assert len(rep["skipped"]) == 3, skipped
    for name in ("empty_0001.mcap", "junk_0000.mcap", "nothing_0000.mcap"):
        assert name in skipped
    assert len(load_trajectories(tmp_path / "m.npz")) > 0 and list(rep["runs"]) == ["run_c"]
    assert _cli(["dataset", "build", str(d), "-o", str(tmp_path / "m2.npz"), "--window", "50"]) == 0
    err = capsys.readouterr().err
    assert err.count("dataset build: warning: ") == 3 and "empty_0001.mcap" in err and "Traceback" not in err


def test_one_short_run_with_no_val_or_test_windows_warns_loudly(tmp_path, capsys):
    log_run(tmp_path / "short", "short", 3.0)  # 3 s: the 10 % val / test blocks are 0.3 s < a 1 s window
    rep = build_dataset([tmp_path / "short"], tmp_path / "s.npz", window=100, stride=100)
    assert rep["windows"]["val"] == 0 and rep["windows"]["test"] == 0 and rep["windows"]["train"] > 0
    assert rep["warnings"] and "0 val and 0 test windows" in rep["warnings"][0]
    assert "1 run(s)" in rep["warnings"][0] and "--window 100" in rep["warnings"][0]
    assert _cli(["dataset", "build", str(tmp_path / "short"), "-o", str(tmp_path / "s2.npz"),
                 "--window", "100", "--stride", "100"]) == 0
    err = capsys.readouterr().err
    assert "dataset build: WARNING: 0 val and 0 test windows" in err
    rep = build_dataset([tmp_path / "short"], tmp_path / "s3.npz", window=100, split="1,0,0")
    assert rep["warnings"] == []  # no val / test wanted: nothing to warn about


def test_logs_check_recover_of_nothing_fails_by_name(tmp_path, capsys):
    """A log cut before its first chunk: --recover finds 0 messages: no recovered file, exit 1, a message."""
    import struct

    log_run(tmp_path / "full", "cut", 0.5)
    src = next((tmp_path / "full").glob("*.mcap")).read_bytes()
    off = 8
    while src[off] != 0x06:  # records up to the first Chunk (opcode 0x06): header, schemas, channels ...
        off += 9 + struct.unpack_from("<Q", src, off + 1)[0]
    cut = tmp_path / "cut_0000.mcap"
    cut.write_bytes(src[:off])
    assert _cli(["logs", "check", "--recover", str(cut)]) == 1
    err = capsys.readouterr().err
    assert f"ERROR {cut}: nothing to recover (0 readable messages" in err
    assert not (tmp_path / "cut_0000.recovered.mcap").exists()


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rigfm")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_dataset_build_and_logs_check(runs, tmp_path, capsys):
    out = tmp_path / "cli.npz"
    assert _cli(["dataset", "build", str(runs), "-o", str(out), "--window", "64", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "run_a:" in text and "excluded" in text
    assert len(load_trajectories(out)) > 0
    assert _cli(["logs", "check", str(runs / "a" / "run_a_0000.mcap")]) == 0
    text = capsys.readouterr().out
    assert "OK" in text and "/state" in text and "0 gap(s)" in text
    junk = tmp_path / "junk.mcap"
    junk.write_text("nope")
    assert _cli(["logs", "check", str(junk)]) == 1
    assert "junk.mcap" in capsys.readouterr().err
    assert _cli(["dataset", "build", str(junk), "-o", str(out)]) == 2
    assert "junk.mcap" in capsys.readouterr().err


def test_lockstep_control_loop_run_aligns_states_and_commands_exactly(tmp_path):
    """The real ControlLoop + RunLogger on a lock-step simulated rig (faster than real time): the dataset's
    (x[t], u[t]) pairs are exactly the loop's state at a tick and the command computed from it."""
    rigs = pytest.importorskip("rigs")
    from controllers.loop import ControlLoop
    from controllers.lqr import LQRController
    from controllers.simrig import SimulatedRig, run_lockstep

    cfg = rigs.load_config("cartpole")
    model = rigs.make_model(cfg)
    sim = rigs.RigSimulator(cfg, seed=0)
    sim.reset(np.array([0.0, 0.3, 0.0, 0.0]))
    rig = SimulatedRig(sim, cfg)
    log = RunLogger(tmp_path / "logs", metadata={"rig": "cartpole", "controller": "lqr"}, run_name="ls")
    loop = ControlLoop(rig, LQRController(model, 0.002, cfg=cfg), model, cfg, rate_hz=500, logger=log)
    ticks: list[tuple[np.ndarray, float]] = []
    run_lockstep(loop, rig, 1.2, on_tick=lambda k, lp: ticks.append((lp.last.x.copy(), lp.last.u)))
    assert log.close()["dropped"] == 0
    rep = build_dataset([tmp_path / "logs"], tmp_path / "ls.npz", window=20, stride=20, model_dt=0.01)
    assert rep["runs"]["ls"]["clock"].startswith("device")
    ts = load_trajectories(tmp_path / "ls.npz")
    tick_x = np.stack([x for x, _ in ticks])
    tick_u = np.array([u for _, u in ticks])
    assert len(ts) >= 4
    for w in range(len(ts)):
        idx = [int(np.argmin(np.abs(tick_x - row).sum(axis=1))) for row in ts.x[w].astype(np.float64)]
        assert np.allclose(tick_x[idx], ts.x[w], atol=1e-5)  # every sample is a loop state ...
        assert np.all(np.diff(idx) == 5)  # ... 5 ticks (dt / loop period) apart ...
        assert np.allclose(tick_u[idx], ts.u[w, :, 0], atol=1e-5)  # ... with the command computed from it
