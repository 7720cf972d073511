"""One controlled run end to end: rig connection (or a virtual rig), predictor, controller, loop, logger.

``run_session(RunOptions(...)) -> RunResult`` is what ``rigfm run`` and ``rigfm demo`` call; tests call it
too.  Everything it starts (virtual rig, predictor process, logger, worker threads) is stopped in
``finally`` blocks, and ``MotorGuard`` puts the motor to zero however the run ends.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controllers.base import pendulum_index

CONTROLLERS = ("lqr", "swingup", "mpc")


@dataclass
class RunOptions:
    """What to run (mirrors the ``rigfm run`` flags)."""

    rig: str = "cartpole"
    controller: str = "lqr"
    port: str | None = None
    virtual: bool = False
    duration_s: float | None = 10.0
    rate_hz: float = 500.0
    model: str | None = None            # ONNX file of the learned model (starts a predictor process)
    endpoint: str | None = None         # ... or an already running predictor
    log_dir: str | None = None
    dry_run: bool = False
    init: str = "hanging"               # virtual rig initial state
    virtual_params: dict[str, float] = field(default_factory=dict)  # plant overrides (virtual rig)
    model_params: dict[str, float] = field(default_factory=dict)    # controller-model overrides
    tuning: str | None = None
    latency_ms: float = 0.0             # latency compensation (physics forecast), 0 = off
    latency_source: str = "physics"     # "predictor": + the learned one-step correction (physics fallback)
    predictor_timeout_ms: float | None = None  # one-step deadline; default 0.8 model steps
    mpc_timeout_ms: float = 100.0
    mpc_max_plan_age_s: float = 0.1
    stale_ms: float = 50.0
    realtime: bool = False              # SCHED_FIFO for the control process (if permitted)
    status: bool = True
    seed: int = 0
    kill_predictor_after_s: float | None = None  # test hook: SIGKILL the predictor mid-run
    on_log_error: str = "stop"          # a logging failure: "stop" (fault, motor 0 V) or "continue"
    foxglove: str | None = None         # serve a Foxglove live view on [HOST:]PORT (loopback by default)
    command_line: list[str] | None = None  # recorded in the log metadata (default sys.argv)


@dataclass
class RunResult:
    """Outcome of a run: timing, modes, faults, prediction error, trajectory of (t, x, u, mode)."""

    stats: dict[str, Any]
    fault: str | None
    mode_changes: list[tuple[float, str, str]]
    monitor: dict[str, Any]
    trajectory: np.ndarray          # (N, 2 + n): t, u, x
    modes: list[str]
    predictor: dict[str, Any]
    logger: dict[str, Any]
    first_fallback_after_kill_s: float | None = None
    log_files: list[str] = field(default_factory=list)
    rig_stats: dict[str, Any] = field(default_factory=dict)
    live_view: dict[str, Any] = field(default_factory=dict)

    @property
    def log_error(self) -> str | None:
        """The logger's first file error (frames were lost), None when logging was complete."""
        return self.logger.get("error") if self.logger else None

    @property
    def ok(self) -> bool:
        return self.fault is None and self.log_error is None


def status_printer(stream: Any = sys.stderr) -> Callable[[dict[str, Any]], None]:
    """Live one-line status (rate, jitter, mode, prediction error) rewritten in place."""

    def show(st: dict[str, Any]) -> None:
        err = st.get("err1_ewma")
        x = st.get("x") or []
        nan = float("nan")
        parts = [f"{st.get('rate_hz', nan):6.1f} Hz", f"jitter {st.get('jitter_us', nan):6.1f} us",
                 f"overruns {st.get('overruns', 0)}", f"mode {st.get('mode', '?'):<10}",
                 f"u {st.get('u', 0.0):+6.2f} V"]
        if x:
            parts.append("x " + " ".join(f"{v:+.3f}" for v in x))
        if err is not None:
            parts.append(f"pred err {err:.3f}" + (" DRIFT" if st.get("drift") else ""))
        if st.get("pred_fault"):
            parts.append("PREDICTOR DOWN")
        if st.get("log_error"):
            parts.append(f"LOG FAILED ({st.get('log_lost', '?')} lost): {st['log_error']}")
        stream.write("\r" + " | ".join(parts) + "\x1b[K")
        stream.flush()

    return show


def _monitor_scale(cfg: Any) -> np.ndarray:
    """Per-state normalisation of prediction errors: a few percent of each channel's operating range."""
    lim = cfg.limits
    return np.array([0.1 * lim.position_soft, 0.1, 0.05 * lim.actuated_velocity_max, 1.0])


def build_controller(name: str, model: Any, cfg: Any, tuning: dict, dt: float, mpc_rollout: Any = None,
                     errors: tuple = (), max_plan_age_s: float = 0.1) -> Any:
    """Controller by name; ``mpc`` needs a rollout function and falls back to LQR."""
    from controllers.lqr import LQRController
    from controllers.swingup import SwingUpController

    if name not in CONTROLLERS:
        raise ValueError(f"unknown controller {name!r}; choose one of {', '.join(CONTROLLERS)}")
    lqr = LQRController(model, dt, cfg=cfg, tuning=tuning)
    if name == "lqr":
        return lqr
    if name == "swingup":
        return SwingUpController(model, cfg, dt, lqr=lqr, tuning=tuning)
    from controllers.mpc import MPCParams, make_mpc

    if mpc_rollout is None:
        raise ValueError("controller 'mpc' needs the learned model: pass --model model.onnx (or --endpoint)")
    sec = tuning.get("mpc", {})
    params = MPCParams(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in sec.items()})
    return make_mpc(model, cfg, mpc_rollout, lqr, cfg.model_dt, params=params, predictor_errors=errors,
                    max_plan_age_s=max_plan_age_s)


class _LoggedShutdown:
    """The rig as ``MotorGuard`` sees it: the 0 V and the e-stop it sends at exit go into /command."""

    def __init__(self, rig: Any, loop: Any) -> None:
        self.rig = rig
        self.loop = loop

    def send_command(self, volts: float) -> Any:
        out = self.rig.send_command(volts)
        self.loop.log_command(volts, "shutdown")
        return out

    def estop(self) -> Any:
        out = self.rig.estop()
        self.loop.log_command(0.0, "shutdown", estop=True)
        return out


def _file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _controller_params(controller: Any, tuning: dict, opts: RunOptions, cfg: Any) -> dict[str, Any]:
    """Controller and tuning parameters as run: loop options, the tuning tables, LQR gain, swing-up params."""
    import dataclasses

    out: dict[str, Any] = {
        "controller": opts.controller, "rate_hz": opts.rate_hz, "tuning_file": opts.tuning or "built-in",
        "tuning": tuning, "latency_ms": opts.latency_ms, "latency_source": opts.latency_source,
        "predictor_timeout_ms": opts.predictor_timeout_ms, "mpc_timeout_ms": opts.mpc_timeout_ms,
        "mpc_max_plan_age_s": opts.mpc_max_plan_age_s, "stale_ms": opts.stale_ms, "dry_run": opts.dry_run,
        "model_params": dict(opts.model_params), "on_log_error": opts.on_log_error,
    }
    if opts.virtual:
        out["virtual"] = {"init": opts.init, "seed": opts.seed, "params": dict(opts.virtual_params)}
    for obj in (controller, getattr(controller, "lqr", None), getattr(controller, "fallback", None)):
        if obj is not None and getattr(obj, "k", None) is not None and "lqr_K" not in out:
            out["lqr_K"] = np.asarray(obj.k).tolist()
            out["lqr_q"] = np.asarray(getattr(obj, "q", [])).tolist()
            out["lqr_r"] = np.asarray(getattr(obj, "r", [])).tolist()
    params = getattr(controller, "params", None)
    if params is not None and dataclasses.is_dataclass(params):
        out[f"{opts.controller}_params"] = dataclasses.asdict(params)
    return out


def run_session(opts: RunOptions, stop: threading.Event | None = None) -> RunResult:
    """Run one session (see module docstring); returns its result.  Raises on setup errors."""
    import rigs
    from controllers.latency import PhysicsForecaster, PredictorForecaster
    from controllers.loop import ControlLoop
    from controllers.monitor import PredictionMonitor
    from controllers.mpc import PredictorRollout
    from controllers.predictor_tap import PredictorTap
    from controllers.safety import DryRunRig, MotorGuard
    from controllers.tuning import load_tuning

    if opts.controller not in CONTROLLERS:
        raise ValueError(f"unknown controller {opts.controller!r}; choose one of {', '.join(CONTROLLERS)}")
    if (opts.port is None) == (not opts.virtual):
        raise ValueError("give exactly one of --port PATH or --virtual")
    if opts.model and opts.endpoint:
        raise ValueError("give at most one of --model and --endpoint")
    if opts.controller == "mpc" and not (opts.model or opts.endpoint):
        raise ValueError("controller 'mpc' needs the learned model: pass --model model.onnx (or --endpoint)")
    if opts.latency_source not in ("physics", "predictor"):
        raise ValueError(f"unknown latency source {opts.latency_source!r}; choose physics or predictor")
    if opts.latency_source == "predictor" and opts.latency_ms > 0 and not (opts.model or opts.endpoint):
        raise ValueError("latency source 'predictor' needs the learned model: pass --model (or --endpoint)")
    if opts.model and not Path(opts.model).is_file():
        raise FileNotFoundError(f"--model {opts.model}: no such file")
    if opts.on_log_error not in ("stop", "continue"):
        raise ValueError(f"--on-log-error {opts.on_log_error!r}: choose stop or continue")
    if opts.foxglove is not None:
        from hardware.live_view import parse_address

        parse_address(opts.foxglove)  # a bad address fails before anything starts
    cfg = rigs.load_config(opts.rig)
    model = rigs.make_model(cfg, opts.model_params or None)
    tuning = load_tuning(cfg.kind, opts.tuning)
    dt = 1.0 / opts.rate_hz

    with contextlib.ExitStack() as stack:
        # -- the rig ----------------------------------------------------------------------------------
        port = opts.port
        if opts.virtual:
            from hardware.virtual_rig_process import VirtualRigProcess

            vr = VirtualRigProcess(opts.rig, params=opts.virtual_params or None, init=opts.init,
                                   seed=opts.seed)
            stack.enter_context(vr)
            port = vr.port
            if opts.realtime and vr.proc is not None:
                from controllers.realtime import realtime_process

                realtime_process(vr.proc.pid, priority=49)  # the plant outranks everything but the loop
        from hardware.driver import RigConnection
        from hardware.state_feed import StateFeed

        # a new run clears the e-stop latch that the previous run's clean exit left (once, at first connect;
        # never on a reconnect mid-run); the firmware still enforces its limits and watchdog
        feed = StateFeed()  # every STATE frame the driver receives, for the loop to log
        conn = stack.enter_context(RigConnection(port=port, rig_config=cfg, clear_estop_on_connect=True,
                                                 on_state=feed))
        feed.attach(conn)
        if conn.wait_state(timeout=5.0) is None:
            raise RuntimeError(f"no STATE from the rig on {port} within 5 s")
        rig = DryRunRig(conn) if opts.dry_run else conn
        logger = None

        # -- predictor --------------------------------------------------------------------------------
        endpoint = opts.endpoint
        proc = None
        errors: tuple = ()
        if opts.model:
            from export.client import PredictorProcess

            proc = stack.enter_context(PredictorProcess(opts.model))
            endpoint = proc.endpoint
        tap = None
        monitor = None
        mpc_rollout = None
        if endpoint:
            from export.client import PredictorClient, PredictorError

            errors = (PredictorError,)
            tap_client = PredictorClient(endpoint, timeout_ms=5000.0)  # generous for the handshake only
            stack.callback(tap_client.close)
            info = tap_client.info()
            model_dt = float(info.get("dt") or cfg.model_dt)
            # a one-step prediction is only useful if it arrives before the step it predicts
            tap_client.timeout_ms = opts.predictor_timeout_ms or 800.0 * model_dt

            def reset_stream(xh: np.ndarray, uh: np.ndarray, client: Any = tap_client) -> None:
                step_budget = client.timeout_ms  # re-priming sends a whole window: allow it more time
                client.timeout_ms = max(step_budget, 50.0)
                try:
                    client.stream_reset(xh, uh)
                finally:
                    client.timeout_ms = step_budget

            if int(info.get("n", cfg.n)) != cfg.n or int(info.get("m", cfg.m)) != cfg.m:
                raise ValueError(f"predictor model has n={info.get('n')}, m={info.get('m')}; rig "
                                 f"{cfg.name} needs n={cfg.n}, m={cfg.m}")
            monitor = PredictionMonitor(_monitor_scale(cfg), horizons=(1, 10),
                                        angle_channels=(pendulum_index(model),))
            tap = PredictorTap(PredictorRollout(tap_client), model_dt, monitor=monitor, logger=logger,
                               errors=errors, stream_step=tap_client.stream_step,
                               stream_reset=reset_stream)
            stack.callback(tap.close)
            if opts.controller == "mpc":
                mpc_client = PredictorClient(endpoint, timeout_ms=opts.mpc_timeout_ms)
                stack.callback(mpc_client.close)
                mpc_rollout = PredictorRollout(mpc_client)

        controller = build_controller(opts.controller, model, cfg, tuning, dt, mpc_rollout, errors,
                                      opts.mpc_max_plan_age_s)
        if hasattr(controller, "close"):
            stack.callback(controller.close)

        # -- logger and live view (after the predictor: the metadata names the model it serves) ------------
        if opts.log_dir:
            import shlex

            from hardware.logger import RunLogger

            dev = conn.device_info
            pinfo = info if endpoint else {}
            model_path = opts.model or str(pinfo.get("model_path") or "")
            logger = RunLogger(opts.log_dir, metadata={
                "rig": cfg.name, "rig_config": cfg, "rig_config_source": str(opts.rig),
                "firmware_version": ".".join(map(str, dev.firmware_version)) if dev else "no handshake",
                "protocol_version": dev.protocol_version if dev else "no handshake",
                "device": {"rig_kind": dev.rig_kind, "uid": dev.uid, "port": dev.port,
                           "loop_rate_hz": dev.loop_rate_hz, "max_voltage": dev.max_voltage,
                           "watchdog_ms": dev.watchdog_ms} if dev else {},
                "virtual": bool(opts.virtual),
                "controller": opts.controller, "rate_hz": opts.rate_hz,
                "controller_params": _controller_params(controller, tuning, opts, cfg),
                "model": model_path or "none (no learned model)",
                "model_sha256": (_file_sha256(model_path) if model_path and Path(model_path).is_file()
                                 else "none (no learned model)" if not endpoint else "not readable here"),
                "model_checkpoint_sha256": str(pinfo.get("model_sha256") or "none"),
                "predictor_endpoint": endpoint or "none",
                "dry_run": opts.dry_run, "model_dt": cfg.model_dt, "state_names": list(cfg.state_names),
                "command_line": shlex.join(opts.command_line if opts.command_line is not None else sys.argv),
            })
            stack.callback(logger.close)
        live = None
        if opts.foxglove is not None:
            from hardware.live_view import LiveView, is_loopback, parse_address

            host, fport = parse_address(opts.foxglove)
            live = stack.enter_context(LiveView(host, fport, name=f"rigfm {cfg.name}"))
            if not is_loopback(host):
                print(f"rigfm run: WARNING: the live view on {host} can be read by anyone who reaches this "
                      "machine", file=sys.stderr)
            print(f"rigfm run: Foxglove live view on {live.url} (Foxglove: Open connection -> Foxglove "
                  "WebSocket)", file=sys.stderr)
        sink: Any = logger
        if live is not None:
            from hardware.live_view import LogTee

            sink = LogTee(logger, live)
        if tap is not None:
            tap.logger = sink
        forecaster: Any = None
        if opts.latency_ms > 0:
            forecaster = PhysicsForecaster(model, opts.latency_ms / 1000.0)
            if opts.latency_source == "predictor" and tap is not None:
                forecaster = PredictorForecaster(forecaster, tap.last_one_step, tap.model_dt,
                                                 _monitor_scale(cfg))
        est_cut = float(tuning.get("estimation", {}).get("velocity_cutoff_hz", 25.0))
        from controllers.estimation import VelocityEstimator

        estimator = VelocityEstimator(cfg.n // 2, est_cut, angle_channels=(pendulum_index(model),))
        traj: list[tuple] = []
        modes: list[str] = []
        status_cb = None
        if opts.status:
            show = status_printer()

            def status_cb(st: dict[str, Any]) -> None:
                if logger is not None and logger.error:
                    lst = logger.stats()
                    st = {**st, "log_error": logger.error, "log_lost": lst["dropped"]}
                show(st)

        loop = ControlLoop(rig, controller, model, cfg, rate_hz=opts.rate_hz, estimator=estimator,
                           stale_ms=opts.stale_ms, logger=sink, tap=tap, forecaster=forecaster,
                           dry_run=opts.dry_run, status_cb=status_cb, state_feed=feed)
        t_start = time.monotonic()
        kill_at = None if opts.kill_predictor_after_s is None else t_start + opts.kill_predictor_after_s
        killed_at: list[float] = []
        first_fb: list[float] = []
        inner = loop.tick

        from controllers.safety import SafetyFault

        def tick(now: float) -> bool:
            if logger is not None and logger.error is not None and opts.on_log_error == "stop":
                loop.trip(SafetyFault("log_write", f"logging failed (--on-log-error stop): {logger.error}"),
                          now)
                return False
            if kill_at is not None and not killed_at and now >= kill_at and proc is not None:
                proc.proc.kill()  # SIGKILL, as a crash would (reaped by PredictorProcess.stop)
                killed_at.append(time.monotonic())
            ok = inner(now)
            if loop.last.x is not None:
                traj.append((now - t_start, loop.last.u, *loop.last.x))
                modes.append(loop.mode)
                if killed_at and not first_fb and "fallback" in loop.mode:
                    first_fb.append(now - killed_at[0])
            return ok

        if tap is not None:
            tap.start()
        if hasattr(controller, "start"):
            controller.start()
        restore = None
        if opts.realtime:
            from controllers.realtime import enable_realtime

            restore = enable_realtime()
            if restore is None:
                print("rigfm run: real-time scheduling not permitted; running at normal priority",
                      file=sys.stderr)
        switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)  # other threads hold the GIL at most ~0.2 ms at a time
        gc.collect()
        gc.freeze()  # long-lived objects out of the collector's way; no cyclic GC pauses in the loop
        gc.disable()
        interrupted = None
        feed.keep_latest()  # frames from before the run (handshake, predictor start) are not part of it
        try:
            with MotorGuard(_LoggedShutdown(rig, loop)) as guard:
                loop.runner.run(tick, opts.duration_s, stop)
        except (KeyboardInterrupt, SystemExit):  # the guard has already put the motor to 0 V and e-stopped
            interrupted = guard.stopped_by or "interrupted"
        finally:
            gc.enable()
            gc.unfreeze()
            sys.setswitchinterval(switch)
            if restore is not None:
                restore()
        if opts.status:
            sys.stderr.write("\n")
        if tap is not None:
            loop.stats.predictor_late = tap.late
        summary = loop.stats.summary()
        pred = tap.status() if tap is not None else {}
        if hasattr(controller, "fallbacks"):
            pred["mpc_fallback_ticks"] = controller.fallbacks
            pred["mpc_plans"] = controller.plans
            pred["mpc_plan_time_ms"] = controller.plan_time_s * 1e3
            pred["mpc_fallback_delays_ms"] = [d * 1e3 for d in controller.fallback_delays]
            pred["mpc_fallback_delay_ticks"] = list(controller.fallback_delay_ticks)
        if isinstance(forecaster, PredictorForecaster):
            pred.update(forecast_learned=forecaster.used, forecast_stale=forecaster.stale,
                        forecast_rejected=forecaster.rejected)
        try:
            rig_stats = conn.stats().as_dict()
        except Exception:  # noqa: BLE001 - statistics are informative only
            rig_stats = {}
        log_stats: dict[str, Any] = {}
        files: list[str] = []
        if logger is not None:
            log_stats = logger.close()
            log_stats["state_frames_received"] = feed.received
            log_stats["state_feed_overflow"] = feed.overflow
            files = [str(p) for p in logger.files]
        live_stats = live.close() if live is not None else {}
        fault = None if loop.fault is None else f"{loop.fault.code}: {loop.fault.message}"
        if interrupted and fault is None:
            fault = f"stopped by {interrupted} (motor zeroed, e-stop sent)"
        return RunResult(
            stats=summary, fault=fault,
            mode_changes=[(t - t_start, a, b) for t, a, b in loop.mode_changes],
            monitor=monitor.snapshot() if monitor else {},
            trajectory=np.array(traj) if traj else np.zeros((0, 2 + cfg.n)), modes=modes, predictor=pred,
            logger=log_stats, first_fallback_after_kill_s=first_fb[0] if first_fb else None, log_files=files,
            rig_stats=rig_stats, live_view=live_stats)
    raise AssertionError("unreachable")  # pragma: no cover
