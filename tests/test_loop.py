"""Control loop: fixed-rate runner, velocity estimation, latency forecast, predictor tap, logger records."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import rigs
from controllers.estimation import VelocityEstimator
from controllers.latency import PhysicsForecaster, PredictorForecaster
from controllers.loop import ControlLoop, FixedRateRunner, LoopStats
from controllers.lqr import LQRController
from controllers.monitor import PredictionMonitor
from controllers.mpc import PhysicsRollout
from controllers.predictor_tap import PredictorTap
from controllers.simrig import SimulatedRig, run_lockstep


@pytest.fixture(scope="module")
def cart():
    cfg = rigs.load_config("cartpole")
    return cfg, rigs.make_model(cfg)


def test_runner_calls_tick_at_its_rate_until_stopped():
    runner = FixedRateRunner(1000.0)
    times = []

    def tick(now):
        times.append(now)
        return len(times) < 50

    stats = runner.run(tick, duration_s=5.0)
    assert len(times) == 50 and stats.ticks == 50  # stopped by tick() returning False
    assert np.all(np.diff(times) > 0)
    s = stats.summary()
    for key in ("period_err_p50_us", "period_err_p99_us", "jitter_us", "overrun_pct", "rate_hz"):
        assert np.isfinite(s[key])
    stop = threading.Event()
    stop.set()
    assert FixedRateRunner(500.0).run(lambda now: True, stop=stop).ticks == 0
    with pytest.raises(ValueError, match="rate"):
        FixedRateRunner(0.0)


def test_overrun_skips_missed_deadlines_instead_of_bursting():
    clock = [0.0]
    runner = FixedRateRunner(100.0, spin_s=0.0, clock=lambda: clock[0])
    runner.wait_until = lambda deadline: clock.__setitem__(0, max(clock[0], deadline))
    n = [0]

    def tick(now):
        n[0] += 1
        clock[0] += 0.035 if n[0] == 3 else 0.001  # third tick takes 3.5 periods
        return n[0] < 6

    stats = runner.run(tick)
    assert stats.overruns == 1 and stats.missed_deadlines == 3
    starts = stats._ordered(stats._start)
    assert starts[3] - starts[2] == pytest.approx(0.04)  # next tick on the next free deadline


def test_stats_ring_keeps_latest():
    st = LoopStats(0.01, capacity=4)
    for k in range(10):
        st.record(k * 0.01, k * 0.01 + (0.001 if k == 9 else 0.0), k * 0.01 + 0.002)
    assert st.ticks == 10 and len(st.period_errors()) == 3
    assert st.period_errors()[-1] == pytest.approx(0.001)


def test_velocity_estimator_tracks_a_sine_through_quantisation():
    est = VelocityEstimator(2, cutoff_hz=40.0, angle_channels=(1,))
    q = np.array([2.275e-5, 2 * np.pi / 4096])  # cart-pole encoder resolution (m, rad per count)
    errs = []
    rng = np.random.default_rng(0)
    t = 0.0
    for _ in range(2000):
        t += 0.002 + rng.uniform(-2e-4, 2e-4)  # jittery sampling
        pos = np.array([0.1 * np.sin(2 * np.pi * t), np.pi + 0.5 * np.sin(3 * t)])
        pos_q = np.round(pos / q) * q
        v = est.update(pos_q, t)
        true_v = np.array([0.2 * np.pi * np.cos(2 * np.pi * t), 1.5 * np.cos(3 * t)])
        if t > 0.5:
            errs.append(np.abs(v - true_v))
    errs = np.array(errs)
    assert errs[:, 0].max() < 0.05 * 0.2 * np.pi + 0.01  # a few % of the amplitude (lag + noise)
    # 4096 counts/rev at 2 ms: one count is 0.77 rad/s of raw difference; the filter brings it to ~0.1 rms
    assert np.sqrt(np.mean(errs[:, 1] ** 2)) < 0.12 and errs[:, 1].max() < 0.4
    # wrap-safe: crossing +-pi on the angle channel gives no velocity spike
    est2 = VelocityEstimator(1, angle_channels=(0,))
    est2.update(np.array([np.pi - 0.001]), 0.0)
    assert abs(est2.update(np.array([-np.pi + 0.001]), 0.002)[0]) < 2.0
    with pytest.raises(ValueError, match="non-finite"):
        est.update(np.array([np.nan, 0.0]), 10.0)


def test_latency_forecast_replays_commands(cart):
    cfg, model = cart
    f = PhysicsForecaster(model, delay_s=0.004, max_substep_s=0.001)
    x = np.array([0.0, 0.1, 0.0, 0.0])
    f.record_command(0.0, np.array([5.0]))
    f.record_command(0.002, np.array([-5.0]))
    got = f.forecast(x, 0.0)
    ref = x
    for k in range(4):
        ref = model.step(ref, np.array([5.0 if k < 2 else -5.0]), 0.001)
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    assert np.array_equal(PhysicsForecaster(model, 0.0).forecast(x, 1.0), x)


def test_latency_compensated_lqr_balances_with_extra_delay(cart):
    """A plant with 6 ms actuation delay: the loop with the matching physics forecast still balances."""
    cfg, model = cart
    sim = rigs.RigSimulator(cfg, seed=0)
    sim.delay = 0.006
    sim.reset(np.array([0.0, 0.1, 0.0, 0.0]))
    rig = SimulatedRig(sim, cfg)
    loop = ControlLoop(rig, LQRController(model, 0.002, cfg=cfg), model, cfg, rate_hz=500,
                       forecaster=PhysicsForecaster(model, 0.006))
    states = np.array(run_lockstep(loop, rig, 3.0))
    assert loop.fault is None and np.abs(states[750:, 1]).max() < np.deg2rad(3.0)


def _physics_next(model, x, u, dt, steps=10):
    for _ in range(steps):
        x = model.step(x, u, dt / steps)
    return np.asarray(x, dtype=float)


def test_predictor_forecast_adds_the_learned_correction_or_falls_back(cart):
    cfg, model = cart
    scale = np.array([0.033, 0.1, 0.2, 1.0])
    x_k, u_k = np.array([0.0, 0.1, 0.0, 0.0]), np.array([1.0])
    bias = np.array([0.0, 0.0, 0.01, 0.05])  # the "learned" model's step differs from physics by this
    src = {"v": (1.0, x_k, u_k, _physics_next(model, x_k, u_k, 0.01) + bias)}
    phys = PhysicsForecaster(model, delay_s=0.004)
    f = PredictorForecaster(phys, lambda: src["v"], 0.01, scale)
    x = np.array([0.0, 0.12, 0.1, 0.2])
    np.testing.assert_allclose(f.forecast(x, 1.005), phys.forecast(x, 1.005) + 0.4 * bias, atol=1e-9)
    assert f.used == 1
    assert np.array_equal(f.forecast(x, 1.05), phys.forecast(x, 1.05)) and f.stale == 1  # 5 steps old
    src["v"] = (1.0, x_k, u_k, np.array([0.0, 3.0, 0.0, 0.0]))  # implausible: 30 scale units
    assert np.array_equal(f.forecast(x, 1.005), phys.forecast(x, 1.005)) and f.rejected == 1
    src["v"] = None  # no prediction yet
    assert np.array_equal(f.forecast(x, 1.005), phys.forecast(x, 1.005)) and f.stale == 2
    with pytest.raises(ValueError, match="scale must be 4 positive"):
        PredictorForecaster(phys, lambda: None, 0.01, np.ones(3))


def test_predictor_forecast_balances_with_extra_delay_through_the_tap(cart):
    """6 ms actuation delay; the forecast uses the tap's one-step predictions (physics as the predictor)."""
    cfg, model = cart
    sim = rigs.RigSimulator(cfg, seed=0)
    sim.delay = 0.006
    sim.reset(np.array([0.0, 0.1, 0.0, 0.0]))
    rig = SimulatedRig(sim, cfg)
    tap = PredictorTap(PhysicsRollout(model, cfg.model_dt), cfg.model_dt)
    fc = PredictorForecaster(PhysicsForecaster(model, 0.006), tap.last_one_step, cfg.model_dt,
                             np.array([0.033, 0.1, 0.2, 1.0]))
    loop = ControlLoop(rig, LQRController(model, 0.002, cfg=cfg), model, cfg, rate_hz=500, tap=tap,
                       forecaster=fc)
    done = threading.Event()

    def on_tick(k, lp):  # let the worker answer before the next tick (lock-step runs faster than real time)
        for _ in range(200):
            if tap._job is None and not tap._busy:
                break
            done.wait(0.001)

    with tap:
        states = np.array(run_lockstep(loop, rig, 3.0, on_tick=on_tick))
    assert loop.fault is None and np.abs(states[750:, 1]).max() < np.deg2rad(3.0)
    assert fc.used > 0.8 * len(states) and fc.rejected == 0  # the learned correction was used


def test_predictor_tap_feeds_monitor_without_blocking(cart):
    """The physics model as the predictor: one-step and k-step errors are small, and nothing is late."""
    cfg, model = cart
    sim = rigs.RigSimulator(cfg, seed=0)
    sim.reset(np.array([0.0, 0.1, 0.0, 0.0]))
    rig = SimulatedRig(sim, cfg)
    mon = PredictionMonitor([0.033, 0.1, 0.2, 1.0], horizons=(1, 10), angle_channels=(1,))
    tap = PredictorTap(PhysicsRollout(model, cfg.model_dt), cfg.model_dt, monitor=mon, kstep=10,
                       kstep_every=5)
    loop = ControlLoop(rig, LQRController(model, 0.002, cfg=cfg), model, cfg, rate_hz=500, tap=tap)
    done = threading.Event()

    def on_tick(k, lp):  # give the worker time in lock-step (the real loop sleeps between ticks)
        if k % 5 == 4:
            for _ in range(200):
                if tap._job is None and not tap._busy:
                    break
                done.wait(0.001)

    with tap:
        run_lockstep(loop, rig, 2.0, on_tick=on_tick)
    snap = mon.snapshot()
    assert snap["err1_count"] > 150 and snap["err10_count"] > 20
    assert snap["err1_ewma"] < 0.2 and snap["err10_ewma"] < 0.5
    assert tap.failures == 0 and not snap["drift"]


def test_loop_writes_log_records(cart, tmp_path):
    from hardware.log_reader import read_topics
    from hardware.logger import RunLogger

    cfg, model = cart
    sim = rigs.RigSimulator(cfg, seed=0)
    sim.reset(np.array([0.0, 0.1, 0.0, 0.0]))
    rig = SimulatedRig(sim, cfg)
    log = RunLogger(tmp_path, metadata={"rig": "cartpole", "controller": "lqr"})
    loop = ControlLoop(rig, LQRController(model, 0.002, cfg=cfg), model, cfg, rate_hz=500, logger=log)
    run_lockstep(loop, rig, 0.2)
    stats = log.close()
    assert stats["dropped"] == 0
    _, msgs = read_topics(log.files[0], {"/state", "/command", "/mode"})
    assert len(msgs["/state"]) == 100 and len(msgs["/command"]) == 100
    assert msgs["/mode"][0][1]["mode"] == "lqr"
    cmd = msgs["/command"][-1][1]
    assert abs(cmd["voltage"]) <= cfg.limits.voltage_max and cmd["state_seq"] >= 1


def test_overrun_watch_judges_one_second_windows():
    from controllers.safety import OverrunWatch

    w = OverrunWatch()  # > 90 % of the ticks of a 1 s window, windows of >= 10 ticks
    assert w.update(0, 0, 0.0) is None
    assert w.update(250, 240, 0.5) is None  # window still open
    assert w.update(500, 450, 1.0) is None  # exactly 90 %: not a fault (a loaded host preempting ticks)
    assert w.update(505, 255, 2.0) is None  # every tick overran, but only 5 ticks: not judged
    fault = w.update(800, 550, 3.0)  # every one of 295 ticks overran: the loop cannot keep up
    assert fault is not None and fault.code == "overrun" and "cannot hold its rate" in fault.message
    assert w.update(1300, 560, 4.0) is None  # 10 overruns in 500 ticks (host stalls) is fine
    with pytest.raises(ValueError):
        OverrunWatch(max_fraction=0)


class _Slow:
    """LQR that sleeps ``sleep_s`` in every ``every``-th compute (a tick longer than the period)."""

    def __init__(self, lqr, sleep_s: float, every: int = 1) -> None:
        self.lqr, self.sleep_s, self.every, self.n = lqr, sleep_s, every, 0
        self.name = "slow"

    def reset(self):
        self.lqr.reset()

    def compute(self, x, t=0.0):
        import time

        self.n += 1
        if self.n % self.every == 0:
            time.sleep(self.sleep_s)
        return self.lqr.compute(x, t)


@pytest.mark.parametrize(("every", "faults"), [(1, True), (10, False)])
def test_a_loop_that_overruns_every_tick_is_an_overrun_fault(cart, every, faults):
    """Real time, 500 Hz: 3 ms of work in every tick -> fault 'overrun' within ~1 s, motor to 0 V + e-stop;
    3 ms in one tick of ten (10 % overruns) keeps running."""
    cfg, model = cart
    sim = rigs.RigSimulator(cfg, seed=0)
    sim.reset(np.array([0.0, 0.05, 0.0, 0.0]))
    rig = SimulatedRig(sim, cfg)
    ctl = _Slow(LQRController(model, 0.002, cfg=cfg), 0.003, every)
    loop = ControlLoop(rig, ctl, model, cfg, rate_hz=500, stale_ms=10_000.0)
    stats = loop.run(duration_s=2.5)
    if faults:
        assert loop.fault is not None and loop.fault.code == "overrun", loop.fault
        assert rig.estopped and rig.commands[-1] == 0.0 and loop.mode == "estop"
        assert stats.ticks < 0.6 * 2.5 * 500  # stopped early, not at the end of the run
    else:
        assert loop.fault is None, loop.fault
        assert stats.overruns > 0


def test_tick_recorder_keeps_the_newest_rows_in_bounded_memory():
    from controllers.trajectory import TickRecorder

    rec = TickRecorder(4, capacity=1000, block=64)
    for k in range(10_000):
        rec.append(k * 0.002, float(k), np.full(4, float(k)), "swingup" if k < 9_500 else "balance")
    rows, modes = rec.arrays()
    assert rows.shape == (1000, 6) and rec.ticks == 10_000
    assert rows[0, 1] == 9_000 and rows[-1, 1] == 9_999 and np.all(np.diff(rows[:, 1]) == 1)
    assert np.all(rows[:, 2:] == rows[:, 1:2])
    assert modes[:500] == ["swingup"] * 500 and modes[500:] == ["balance"] * 500
    assert sum(b.nbytes for b in rec._rows) <= (1000 + 2 * 64) * 6 * 8  # never more than capacity + 2 blocks
    empty = TickRecorder(4)
    assert empty.arrays()[0].shape == (0, 6) and empty.arrays()[1] == []
