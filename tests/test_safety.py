"""Safety: soft limits, clamping, stale state, motor to zero on exit/exception/SIGINT/SIGTERM, dry run.

The last part kills real processes mid-run -- `rigfm run` (SIGKILL, SIGTERM), the virtual rig, the
predictor -- and checks from the rig's side (the virtual rig's ``--voltage-log``) when the motor really got
0 V, that the MCAP log is complete or recoverable with `rigfm logs check --recover`, and what the console
said."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import rigs
from controllers.loop import ControlLoop
from controllers.lqr import LQRController
from controllers.safety import DryRunRig, MotorGuard, SoftLimits, StaleStateWatch
from controllers.simrig import SimulatedRig, run_lockstep


def test_soft_limits_from_config_clamp_and_check(cart):
    cfg, model = cart
    lim = SoftLimits.from_config(cfg, model)
    assert lim.base_soft == cfg.limits.position_soft and lim.voltage_max == cfg.limits.voltage_max
    x_mid = np.zeros(4)
    np.testing.assert_allclose(lim.clamp(np.array([25.0]), x_mid), [10.0])
    np.testing.assert_allclose(lim.clamp(np.array([np.nan]), x_mid), [0.0])
    x_edge = np.array([cfg.limits.position_soft - 0.5 * cfg.limits.position_margin, 0, 0, 0])
    assert lim.clamp(np.array([5.0]), x_edge)[0] == 0.0       # pushing further out: cut
    assert lim.clamp(np.array([-5.0]), x_edge)[0] == -5.0     # back towards the centre: allowed
    assert lim.check(x_mid) is None
    assert lim.check(np.array([0.35, 0, 0, 0])).code == "limit"
    assert lim.check(np.array([0.0, np.nan, 0, 0])).code == "nonfinite_state"


def test_stale_state_watch():
    w = StaleStateWatch(stale_ms=20)
    assert w.update(1, 0.000) is None
    assert w.update(1, 0.015) is None
    assert w.update(2, 0.016) is None
    f = w.update(2, 0.040)
    assert f is not None and f.code == "stale_state"


class RecordingRig:
    def __init__(self):
        self.sent, self.estops = [], 0

    def send_command(self, v):
        self.sent.append(v)

    def estop(self):
        self.estops += 1


def test_motor_guard_zero_and_estop_on_normal_exit_and_on_exception():
    rig = RecordingRig()
    with MotorGuard(rig):
        rig.send_command(3.0)
    assert rig.sent[-1] == 0.0 and rig.estops == 1  # latched safe, no watchdog trip during teardown
    with pytest.raises(RuntimeError), MotorGuard(rig):
        raise RuntimeError("boom")
    assert rig.sent[-1] == 0.0 and rig.estops == 2


def test_motor_guard_sigint_in_process():
    # a shell's background job starts with SIGINT ignored: give the test the interactive default
    prior = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rig = RecordingRig()
        with pytest.raises(KeyboardInterrupt), MotorGuard(rig) as guard:
            rig.send_command(4.0)
            os.kill(os.getpid(), signal.SIGINT)
        assert guard.stopped_by == "SIGINT" and rig.sent[-1] == 0.0 and rig.estops == 1
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, prior)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_motor_guard_signal_in_subprocess(tmp_path, sig):
    """A real process running a guarded loop is signalled; the last thing it 'sends' is 0 V."""
    out = tmp_path / "sent.txt"
    code = textwrap.dedent(f"""
        import time, sys
        from controllers.safety import MotorGuard
        class Rig:
            def send_command(self, v):
                with open({str(out)!r}, "a") as f: f.write(f"{{v}}\\n")
            def estop(self):
                with open({str(out)!r}, "a") as f: f.write("estop\\n")
        rig = Rig()
        with MotorGuard(rig):
            rig.send_command(5.0)
            print("ready", flush=True)
            while True:
                time.sleep(0.01)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.read_text().split()
    assert lines[0] == "5.0" and "0.0" in lines[1:] and lines[-1] == "estop"
    assert proc.returncode != 0


def test_dry_run_never_actuates(cart):
    cfg, model = cart
    sim = rigs.RigSimulator(cfg, seed=0)
    sim.reset(np.array([0.0, 0.1, 0.0, 0.0]))
    inner = SimulatedRig(sim, cfg)
    rig = DryRunRig(inner)
    loop = ControlLoop(rig, LQRController(model, 0.002, cfg=cfg), model, cfg, rate_hz=500, dry_run=True)
    run_lockstep(loop, inner, 0.2)
    assert inner.commands == [] and loop.commands_sent == 0
    assert rig.commands == 0  # the loop does not even call send_command in dry-run
    assert loop.mode == "dry-lqr" and abs(loop.last.u) > 0  # but it computed commands


def test_limit_violation_trips_estop(cart):
    cfg, model = cart
    sim = rigs.RigSimulator(cfg, seed=0)
    sim.reset(np.array([0.0, 0.1, 0.0, 0.0]))
    rig = SimulatedRig(sim, cfg)

    class Runaway:  # pushes the cart into the end stop
        name = "runaway"

        def reset(self):
            pass

        def compute(self, x, t=0.0):
            from controllers.base import ControlOutput
            return ControlOutput(np.array([8.0]), "runaway")

    loop = ControlLoop(rig, Runaway(), model, cfg, rate_hz=500)
    states = run_lockstep(loop, rig, 3.0)
    assert loop.fault is not None and loop.fault.code == "limit"
    assert rig.estopped and loop.mode == "estop"
    assert abs(states[-1][0]) < cfg.limits.position_hard


# ------------------------------------------------------------------ kills mid-run, real processes
ROOT = Path(__file__).resolve().parents[1]
CHUNK_MS = 100.0  # hardware.logger.RunLogger default: at most the open chunk is lost on a SIGKILL


def _voltage_log(path: Path) -> list[tuple[int, float, int, int]]:
    """The virtual rig's --voltage-log: (monotonic ns, applied V, ns of the last COMMAND, watchdog flag)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if len(parts) == 4:
            rows.append((int(parts[0]), float(parts[1]), int(parts[2]), int(parts[3])))
    return rows


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class _Run:
    """`rigfm run cartpole --port <virtual rig> --controller lqr` as a real process, with a test-owned rig."""

    def __init__(self, tmp_path: Path, *extra: str, duration: float = 30.0) -> None:
        from hardware.virtual_rig_process import VirtualRigProcess

        self.vlog = tmp_path / "voltage.log"
        self.logdir = tmp_path / "logs"
        self.rig = VirtualRigProcess("cartpole", init="upright", voltage_log=str(self.vlog)).start()
        from controllers.realtime import realtime_process

        # as `rigfm run --realtime` does for its own virtual rig: the simulated firmware keeps real time on a
        # loaded machine only at SCHED_FIFO (a starved rig runs its watchdog late, on its device clock)
        self.rig_realtime = realtime_process(self.rig.proc.pid, priority=49)
        self.stdout_path, self.stderr_path = tmp_path / "run.out", tmp_path / "run.err"
        cmd = [sys.executable, "-m", "controllers.cli", "run", "cartpole", "--port", self.rig.port,
               "--controller", "lqr", "--stale-ms", "200", "--duration", str(duration), "--quiet",
               "--realtime", "--log", str(self.logdir), *extra]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})

    def wait_driving(self, settle_s: float = 1.0) -> None:
        """Until the rig applies a non-zero voltage (the loop runs), then ``settle_s`` more."""
        _wait(lambda: any(v != 0.0 for _, v, _, _ in _voltage_log(self.vlog)) or self.proc.poll() is not None,
              90, "the run to drive the motor")
        assert self.proc.poll() is None, self.stderr()
        time.sleep(settle_s)

    def first_zero_after(self, t_ns: int) -> tuple[int, float, int, int]:
        _wait(lambda: any(t > t_ns and v == 0.0 for t, v, _, _ in _voltage_log(self.vlog)), 5, "0 V at rig")
        return next(r for r in _voltage_log(self.vlog) if r[0] > t_ns and r[1] == 0.0)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.rig.stop()

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _log_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controllers.cli", "logs", "check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("watchdog_ms", [None, 40])
def test_sigkilled_run_motor_zeroed_by_the_rig_watchdog_and_log_recoverable(tmp_path, watchdog_ms):
    """Nothing on the host can act after a SIGKILL: the rig's watchdog zeroes the motor ``watchdog_ms`` after
    the last COMMAND it received (the rig config's 50 ms, or `--watchdog-ms 40`: 0 V within 50 ms of the
    kill), and the MCAP log loses at most its open chunk."""
    from hardware.log_check import check_file
    from hardware.log_reader import read_topics

    extra = [] if watchdog_ms is None else ["--watchdog-ms", str(watchdog_ms)]
    watchdog_ms = watchdog_ms or rigs.load_config("cartpole").watchdog_ms
    with _Run(tmp_path, *extra) as run:
        run.wait_driving(1.5)
        t_kill, wall_kill = time.monotonic_ns(), time.time_ns()
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(10)
        t0v, _, last_cmd, watchdog = run.first_zero_after(t_kill)
    after_kill_ms, after_cmd_ms = (t0v - t_kill) / 1e6, (t0v - last_cmd) / 1e6
    print(f"\nSIGKILL (watchdog {watchdog_ms} ms): 0 V at the rig {after_kill_ms:.1f} ms after the kill, "
          f"{after_cmd_ms:.1f} ms after the last command it received")
    assert watchdog == 1  # the watchdog did it

    files = sorted(run.logdir.glob("*.mcap"))
    assert len(files) == 1
    assert not check_file(files[0]).ok  # truncated: no footer
    r = _log_check("--recover", str(files[0]))
    assert r.returncode == 0, r.stdout + r.stderr
    recovered = files[0].with_name(files[0].stem + ".recovered.mcap")
    assert check_file(recovered).ok
    _, msgs = read_topics(recovered, {"/state", "/command"})
    assert len(msgs["/command"]) > 500
    last_ns = max(rec["host_time_ns"] for _, rec in msgs["/command"])  # time.time_ns() of the command
    lost_ms = (wall_kill - last_ns) / 1e6
    print(f"SIGKILL: last recovered /command {lost_ms:.0f} ms before the kill (chunk {CHUNK_MS:.0f} ms)")
    assert lost_ms <= CHUNK_MS + 50.0  # the open chunk, plus the writer thread's lag
    if not run.rig_realtime:
        pytest.skip("SCHED_FIFO not permitted: the virtual rig's own timing is not real time here")
    assert after_cmd_ms <= watchdog_ms + 5.0  # one firmware tick + the rig's scheduling
    assert after_kill_ms <= watchdog_ms + 5.0
    if watchdog_ms <= 45:
        assert after_kill_ms <= 50.0


def test_sigterm_run_zeroes_the_motor_at_once_and_closes_the_log(tmp_path):
    from hardware.log_check import check_file

    with _Run(tmp_path) as run:
        run.wait_driving(1.0)
        t_kill = time.monotonic_ns()
        run.proc.send_signal(signal.SIGTERM)
        run.proc.wait(30)
        t0v, _, _, watchdog = run.first_zero_after(t_kill)
        # the rig writes its stats file every ~0.25 s: wait for the one written after the e-stop frame
        _wait(lambda: run.rig.stats().get("estop_latched", False), 5, "the rig to report its e-stop latch")
        st = run.rig.stats()
    after_kill_ms = (t0v - t_kill) / 1e6
    print(f"\nSIGTERM: 0 V at the rig {after_kill_ms:.1f} ms after the signal")
    assert after_kill_ms <= 50.0 and watchdog == 0  # the run's MotorGuard did it, not the watchdog
    assert st["estop_latched"] and st["output_voltage"] == 0.0
    assert run.proc.returncode == 1 and "stopped by SIGTERM" in run.stdout()
    assert "Traceback" not in run.stderr()
    files = sorted(run.logdir.glob("*.mcap"))
    assert files and all(check_file(f).ok for f in files)  # closed cleanly, nothing to recover


def test_killed_virtual_rig_stops_the_run_with_a_named_fault(tmp_path):
    from hardware.log_check import check_file
    from hardware.log_reader import read_topics

    with _Run(tmp_path) as run:
        run.wait_driving(1.0)
        t_kill = time.monotonic()
        run.rig.proc.send_signal(signal.SIGKILL)
        run.proc.wait(30)
        took = time.monotonic() - t_kill
    print(f"\nrig SIGKILL: the run stopped {took:.2f} s later")
    assert run.proc.returncode == 1 and took < 10
    out = run.stdout()
    assert "stale_state: no new state" in out, out
    assert "Traceback" not in run.stderr()
    files = sorted(run.logdir.glob("*.mcap"))
    assert files and all(check_file(f).ok for f in files)
    _, msgs = read_topics(files[-1], {"/fault"})
    assert [rec["code"] for _, rec in msgs["/fault"]] == ["stale_state"]


def test_killed_predictor_is_one_console_line_and_the_loop_keeps_driving(tmp_path):
    from run_models import export_run_models

    models = export_run_models(tmp_path)
    with _Run(tmp_path, "--model", str(models["cartpole"]), duration=8.0) as run:
        run.wait_driving(2.0)
        kids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_server_child(int(p), run.proc.pid)]
        assert len(kids) == 1, kids
        t_kill = time.monotonic_ns()
        os.kill(kids[0], signal.SIGKILL)
        run.proc.wait(60)
        volts = _voltage_log(run.vlog)
        t_end = time.monotonic_ns()
    err = run.stderr()
    assert run.proc.returncode == 0, err
    down = [ln for ln in err.splitlines() if "predictor DOWN" in ln]
    assert len(down) == 1, err
    assert "killed by SIGKILL" in down[0] and "lqr goes on without predictions" in down[0]
    assert "Traceback" not in err
    # the rig was driven without a gap from the kill until the run's own clean stop at its duration
    zeros = [t for t, v, _, _ in volts if v == 0.0 and t_kill < t < t_end]
    stops = [t for t, v, _, wd in volts if v == 0.0 and t > t_kill and wd == 0]
    assert len(zeros) == 1 and zeros == stops[:1], volts
    out = run.stdout()
    assert "predictor down" in out and "killed by SIGKILL" in out and "final mode" in out


def _is_server_child(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read()
    except OSError:
        return False
    return ppid == parent and b"export.server" in cmd
