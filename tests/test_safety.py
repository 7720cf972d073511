"""Safety: soft limits, clamping, stale state, motor to zero on exit/exception/SIGINT/SIGTERM, dry run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import rigs
from controllers.loop import ControlLoop
from controllers.lqr import LQRController
from controllers.safety import DryRunRig, MotorGuard, SoftLimits, StaleStateWatch
from controllers.simrig import SimulatedRig, run_lockstep


@pytest.fixture(scope="module")
def cart():
    cfg = rigs.load_config("cartpole")
    return cfg, rigs.make_model(cfg)


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
    rig = RecordingRig()
    with pytest.raises(KeyboardInterrupt), MotorGuard(rig) as guard:
        rig.send_command(4.0)
        os.kill(os.getpid(), signal.SIGINT)
    assert guard.stopped_by == "SIGINT" and rig.sent[-1] == 0.0 and rig.estops == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


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
