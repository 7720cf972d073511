"""One controlled run end to end: rig connection (or a virtual rig), predictor, controller, loop, logger.

``run_session(RunOptions(...)) -> RunResult`` is what ``rigfm run`` and ``rigfm demo`` call; tests call it
too.  Everything it starts (virtual rig, predictor process, logger, worker threads) is stopped in
``finally`` blocks, and ``MotorGuard`` puts the motor to zero however the run ends.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from controllers.base import pendulum_index
from controllers.run_limits import MAX_DURATION_S, MAX_LATENCY_COMP_MS, MAX_RATE_HZ, MAX_TIMEOUT_MS
from export.shipped import file_sha256
from fm_core.cli_types import SEED, finite_float, int_range, option

CONTROLLERS = ("lqr", "swingup", "mpc")
MPC_PLANNERS = ("auto", "predictor", "local")


@dataclass
class RunOptions:
    """What to run; each field with ``option(...)`` is also its ``rigfm run`` flag (same default and help)."""

    rig: str = option("cartpole", flag="rig", help="cartpole, furuta or a rig TOML file")
    controller: str = option("swingup", choices=CONTROLLERS)
    estimator: str = option("diff", choices=("diff", "kf", "fm-ukf"),
                            help="state estimator: diff (filtered differentiation, default), kf (EKF on the "
                                 "rig physics), fm-ukf (UKF on the learned model; needs --model)")
    port: str | None = option(None, group="where", help="serial port of the rig (e.g. /dev/ttyUSB0 or a pty)")
    virtual: bool = option(False, group="where", help="start a virtual rig on a pty and use it")
    duration_s: float | None = option(None, flag="--duration", metavar="S",
                                      type=finite_float(0, MAX_DURATION_S, lo_open=True, unit="s"),
                                      help="stop after S seconds (default: until Ctrl-C)")
    rate_hz: float = option(500.0, flag="--rate", type=finite_float(0, MAX_RATE_HZ, lo_open=True, unit="Hz"),
                            help="control rate in Hz (default 500; at most the rig's STATE rate, and at "
                                 "least two commands per device watchdog period)")
    model: str | None = option(None, help="learned model (.onnx) or 'shipped' (the rig's ONNX pair in "
                                          "fm_core/weights, no torch needed): starts a predictor process")
    endpoint: str | None = option(None, help="use a running predictor (e.g. ipc:///tmp/pred.sock)")
    log_dir: str | None = option(None, flag="--log", metavar="DIR", help="write an MCAP run log into DIR")
    on_log_error: str = option("stop", choices=("stop", "continue"),
                               help="when the log cannot be written (disk full): stop the run (fault, motor "
                                    "to 0 V; default) or continue without a complete log; either way the "
                                    "exit status is 1")
    foxglove: str | None = option(None, nargs="?", const="8765", metavar="[HOST:]PORT",
                                  help="serve the run's channels on a Foxglove WebSocket (default "
                                       "127.0.0.1:8765; loopback unless a host is given)")
    dry_run: bool = option(False, help="compute and log, never actuate")
    init: str = option("hanging", choices=("hanging", "upright"), help="initial state of the virtual rig")
    virtual_params: dict[str, float] = field(default_factory=dict)  # plant overrides (--set plant.KEY=V)
    model_params: dict[str, float] = field(default_factory=dict)    # controller-model overrides (model.KEY)
    tuning: str | None = option(None, help="controller tuning TOML (overrides controllers/tuning.toml)")
    dither_v: float = option(0.0, flag="--dither", metavar="V", type=finite_float(0, 100, unit="V"),
                             help="add a random +-V telegraph signal (new sign every 20 ms) to the balance "
                                  "commands, so the logged run shows a model what the input does (data for "
                                  "fine-tuning; default 0 = off)")
    lqr_design: str = option("nominal", choices=("nominal", "learned"),
                             help="balance LQR designed on the physics (nominal, default) or on the served "
                                  "model's linearisation (learned; needs --model/--endpoint; redesigned when "
                                  "the predictor reloads a new model; falls back to nominal outside the "
                                  "trust band)")
    latency_ms: float = option(0.0, flag="--latency-comp-ms",
                               type=finite_float(0, MAX_LATENCY_COMP_MS, unit="ms"),
                               help="forecast the state this far ahead with the physics model (0 = off)")
    latency_source: str = option("physics", choices=("physics", "predictor"),
                                 help="latency forecast: physics model, or physics + the predictor's "
                                      "one-step correction (falls back to physics when no fresh, plausible "
                                      "prediction)")
    predictor_timeout_ms: float | None = option(
        None, type=finite_float(0, MAX_TIMEOUT_MS, lo_open=True, unit="ms"),
        help="deadline of one-step predictions (default: 0.8 model steps)")
    mpc_planner: str = option("auto", choices=MPC_PLANNERS,
                              help="where MPC's rollouts run: in this process's planning thread (local: "
                                   "onnxruntime on --model, one thread; does not follow a predictor reload) "
                                   "or in the predictor process; auto (default): local with --model, the "
                                   "predictor with --endpoint")
    mpc_timeout_ms: float = 100.0
    mpc_max_plan_age_s: float = 0.1
    stale_ms: float = option(50.0, type=finite_float(0, MAX_TIMEOUT_MS, lo_open=True, unit="ms"),
                             help="e-stop when no new state for this long")
    watchdog_ms: int | None = option(None, type=int_range(5, 1000, unit="ms"),
                                     help="device watchdog for this run: no COMMAND for this long -> 0 V "
                                          "(default: the rig config's watchdog_ms, 50; the motor's stop time "
                                          "when this process is killed)")
    realtime: bool = option(False, help="SCHED_FIFO priority for the loop (if permitted)")
    status: bool = option(True, flag="--quiet", action="store_false", help="no live status line")
    seed: int = option(0, type=SEED, help="virtual rig seed")
    kill_predictor_after_s: float | None = None  # test hook: SIGKILL the predictor mid-run
    command_line: list[str] | None = None  # recorded in the log metadata (default sys.argv)


@dataclass
class RunResult:
    """Outcome of a run: timing, modes, faults, prediction error, trajectory of (t, x, u, mode)."""

    stats: dict[str, Any]
    fault: str | None
    mode_changes: list[tuple[float, str, str]]
    monitor: dict[str, Any]
    trajectory: np.ndarray          # (N, 2 + n): t, u, x -- the newest 2^20 ticks at most
    modes: list[str]                # the mode of each trajectory row
    predictor: dict[str, Any]
    logger: dict[str, Any]
    first_fallback_after_kill_s: float | None = None
    log_files: list[str] = field(default_factory=list)
    rig_stats: dict[str, Any] = field(default_factory=dict)
    live_view: dict[str, Any] = field(default_factory=dict)
    estimation: dict[str, Any] = field(default_factory=dict)
    lqr_design: dict[str, Any] = field(default_factory=dict)  # the gain in use at the end and its history

    @property
    def log_error(self) -> str | None:
        """The logger's first file error (frames were lost), None when logging was complete."""
        return self.logger.get("error") if self.logger else None

    @property
    def ok(self) -> bool:
        return self.fault is None and self.log_error is None


class RunSetupError(ValueError):
    """The run cannot start: a bad option for this rig, an unreachable rig or predictor, a model that does not
    fit the rig.  One line naming the cause and what to check; ``rigfm run`` exits 2, nothing was actuated."""


def _finite(v: Any) -> bool:
    try:
        return bool(np.isfinite(float(v)))
    except (TypeError, ValueError):
        return False


def check_run_options(opts: RunOptions, cfg: Any) -> None:
    """Refuse numeric options that make no sense for this rig (RunSetupError naming the option and range).

    ``--rate``: at most the rig's STATE rate (``sample_rate_hz``) and at least two commands per device
    watchdog period (``2000 / watchdog_ms`` Hz; ``--watchdog-ms`` or the rig config's), and with a learned
    model at least one tick per model step; ``--stale-ms``: longer than two control periods and two STATE
    periods; ``--watchdog-ms`` in [5, 1000]; ``--latency-comp-ms`` in [0, 50]; ``--predictor-timeout-ms``
    in (0, 10000]; ``--duration`` finite and > 0."""
    if opts.mpc_planner not in MPC_PLANNERS:
        raise RunSetupError(f"--mpc-planner must be one of {', '.join(MPC_PLANNERS)}, got "
                            f"{opts.mpc_planner!r}")
    if opts.controller == "mpc" and opts.mpc_planner == "local" and not opts.model:
        raise RunSetupError("--mpc-planner local needs --model (the planner loads the model itself; an "
                            "--endpoint predictor's model is not on this machine's disk)")
    if opts.duration_s is not None and not (_finite(opts.duration_s) and opts.duration_s > 0):
        raise RunSetupError(f"--duration must be a finite number of seconds > 0, got {opts.duration_s!r}")
    wd = cfg.watchdog_ms if opts.watchdog_ms is None else opts.watchdog_ms
    if not (isinstance(wd, int) and 5 <= wd <= 1000):
        raise RunSetupError(f"--watchdog-ms must be an integer in [5, 1000] ms, got {wd!r}")
    lo = 2000.0 / wd
    hi = float(cfg.sample_rate_hz)
    if opts.model or opts.endpoint:
        lo = max(lo, 1.0 / cfg.model_dt)
    if not (_finite(opts.rate_hz) and lo <= opts.rate_hz <= hi):
        raise RunSetupError(
            f"--rate must be in [{lo:g}, {hi:g}] Hz for rig {cfg.name!r} (at most its STATE rate "
            f"sample_rate_hz, at least two commands per {wd} ms watchdog"
            + (f" and one tick per {cfg.model_dt:g} s model step" if opts.model or opts.endpoint else "")
            + f"), got {opts.rate_hz!r}")
    min_stale = 2000.0 * max(1.0 / opts.rate_hz, 1.0 / cfg.control_rate_hz)
    if not (_finite(opts.stale_ms) and min_stale < opts.stale_ms <= MAX_TIMEOUT_MS):
        raise RunSetupError(f"--stale-ms must be in ({min_stale:g}, {MAX_TIMEOUT_MS:g}] ms (more than two "
                            f"control and STATE periods), got {opts.stale_ms!r}")
    if not (_finite(opts.latency_ms) and 0 <= opts.latency_ms <= MAX_LATENCY_COMP_MS):
        raise RunSetupError(f"--latency-comp-ms must be in [0, {MAX_LATENCY_COMP_MS:g}] ms, got "
                            f"{opts.latency_ms!r}")
    t = opts.predictor_timeout_ms
    if t is not None and not (_finite(t) and 0 < t <= MAX_TIMEOUT_MS):
        raise RunSetupError(f"--predictor-timeout-ms must be in (0, {MAX_TIMEOUT_MS:g}] ms, got {t!r}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _open_predictor(opts: RunOptions, cfg: Any, stack: contextlib.ExitStack) -> tuple[Any, str, Any, dict]:
    """Start (``--model``) or reach (``--endpoint``) the predictor, check its model against the rig.

    Returns ``(process or None, endpoint, client, info)``; RunSetupError naming the cause otherwise."""
    import zmq

    from export.client import PredictorClient, PredictorError, PredictorProcess
    from export.model_check import ModelMismatch, check_model_fits

    proc = None
    what = f"--model {opts.model}" if opts.model else f"--endpoint {opts.endpoint}"
    if opts.model:
        proc = PredictorProcess(opts.model)
        stack.callback(proc.__exit__, None, None, None)
        try:
            proc.start()
        except PredictorError as exc:
            code = proc.proc.returncode if proc.proc is not None else None
            why = _last_line("\n".join(proc.stderr_lines)) or _last_line(str(exc))
            raise RunSetupError(f"{what}: the predictor failed before READY (exit code {code}): "
                                f"{why}") from None
        endpoint = proc.endpoint
    else:
        endpoint = str(opts.endpoint)
        if endpoint.startswith("ipc://") and not Path(endpoint[len("ipc://"):]).exists():
            raise RunSetupError(f"{what}: no such socket file {endpoint[len('ipc://'):]!r}: is `rigfm serve "
                                f"MODEL --bind {endpoint}` running (on this machine)?")
    try:
        client = PredictorClient(endpoint, timeout_ms=5000.0)  # generous for the handshake only
    except zmq.ZMQError as exc:
        raise RunSetupError(f"{what}: ZeroMQ cannot use this endpoint ({exc.strerror}); give "
                            "ipc:///path/to.sock or tcp://HOST:PORT") from None
    stack.callback(client.close)
    try:
        info = client.info()
    except PredictorError as exc:
        raise RunSetupError(f"{what}: no answer from the predictor ({exc}): is `rigfm serve` running and "
                            "bound there, and CURVE/keys as the server expects?") from None
    if int(info.get("n", cfg.n)) != cfg.n or int(info.get("m", cfg.m)) != cfg.m:
        raise RunSetupError(f"{what}: the predictor's model has n={info.get('n')}, m={info.get('m')}; rig "
                            f"{cfg.name} needs n={cfg.n}, m={cfg.m}")
    try:
        check_model_fits(info, model=what, target=f"rig config {cfg.name!r}", rig=(cfg.name, cfg.kind),
                         state_names=cfg.state_names, dt=cfg.model_dt)
    except ModelMismatch as exc:
        raise RunSetupError(str(exc)) from None
    return proc, endpoint, client, info


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
        if st.get("pred_down"):
            parts.append("PREDICTOR DOWN")
        elif st.get("pred_fault"):
            parts.append("pred request failed")  # one missed deadline; DOWN once it persists
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
                     errors: tuple = (), max_plan_age_s: float = 0.1, lqr: Any = None) -> Any:
    """Controller by name; ``mpc`` needs a rollout function and falls back to LQR.  ``lqr``: the balance
    LQR to use (default: the nominal one on the physics)."""
    from controllers.lqr import LQRController
    from controllers.swingup import SwingUpController

    if name not in CONTROLLERS:
        raise ValueError(f"unknown controller {name!r}; choose one of {', '.join(CONTROLLERS)}")
    lqr = lqr if lqr is not None else LQRController(model, dt, cfg=cfg, tuning=tuning)
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


def _controller_params(controller: Any, tuning: dict, opts: RunOptions, cfg: Any) -> dict[str, Any]:
    """Controller and tuning parameters as run: loop options, the tuning tables, LQR gain, swing-up params."""
    import dataclasses

    out: dict[str, Any] = {
        "controller": opts.controller, "estimator": opts.estimator, "rate_hz": opts.rate_hz,
        "tuning_file": opts.tuning or "built-in",
        "tuning": tuning, "latency_ms": opts.latency_ms, "latency_source": opts.latency_source,
        "predictor_timeout_ms": opts.predictor_timeout_ms, "mpc_timeout_ms": opts.mpc_timeout_ms,
        "mpc_max_plan_age_s": opts.mpc_max_plan_age_s, "mpc_planner": opts.mpc_planner,
        "lqr_design": opts.lqr_design,
        "stale_ms": opts.stale_ms, "dry_run": opts.dry_run,
        "model_params": dict(opts.model_params), "on_log_error": opts.on_log_error,
        "watchdog_ms": cfg.watchdog_ms if opts.watchdog_ms is None else int(opts.watchdog_ms),
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


def _learned_lqr(endpoint: str | None, info: dict, model: Any, cfg: Any, tuning: dict, dt: float,
                 stack: contextlib.ExitStack) -> tuple[Any, Any]:
    """The balance LQR designed on the served model's linearisation (controllers/learned_lqr.py), and the
    thread that redesigns it when the predictor starts serving another model (flywheel redeploy)."""
    from controllers.learned_lqr import (
        GainRefresher,
        LearnedDesignParams,
        LearnedLQRController,
        design_from_client,
    )
    from export.client import PredictorClient, PredictorError

    params = LearnedDesignParams.from_tuning(tuning)
    ctl = LearnedLQRController(model, dt, cfg=cfg, tuning=tuning, trust_frac=params.trust_frac)
    client = PredictorClient(str(endpoint), timeout_ms=5000.0)
    stack.callback(client.close)
    try:
        design = design_from_client(client, ctl, model, cfg, params, info)
    except PredictorError as exc:
        raise RunSetupError(f"--lqr-design learned: the predictor did not answer the linearisation request "
                            f"({exc})") from None
    ctl.apply(design)
    if design.source != "learned":
        print(f"rigfm run: learned LQR design rejected, using the nominal gain: {design.reason}",
              file=sys.stderr)
    ident = (str(info.get("model_sha256") or ""), str(info.get("model_path") or ""))
    refresher = GainRefresher(client, ctl, model, cfg, params, ident)
    stack.callback(refresher.close)
    return ctl, refresher


def _log_design(sink: Any, design: Any) -> None:
    """An ``lqr_design`` event in the run log (which gain is in use, and why)."""
    if sink is not None:
        from hardware import log_clock

        sink.write("/event", {"host_time_ns": log_clock.now_ns(), "name": "lqr_design",
                              "data": design.summary()})


def _design_summary(ctl: Any, refresher: Any) -> dict[str, Any]:
    if ctl is None:
        return {}
    return {**ctl.design.summary(), "designs": [d.summary() for d in ctl.designs],
            "refreshes": refresher.refreshes if refresher is not None else 0,
            "refresh_errors": list(refresher.errors) if refresher is not None else []}


def mpc_planner(opts: RunOptions) -> str:
    """Where MPC's rollouts run: ``--mpc-planner``, with ``auto`` = ``local`` when the run has the model file
    (``--model``) and ``predictor`` when it only reaches one (``--endpoint``)."""
    if opts.mpc_planner != "auto":
        return opts.mpc_planner
    return "local" if opts.model else "predictor"


def local_rollout(model_path: str) -> tuple[Any, tuple[type[BaseException], ...]]:
    """``--mpc-planner local``: (rollout function, its error types) on the ONNX model itself, in this
    process (one onnxruntime thread; the KV-cache step graph beside it when there is one)."""
    from export.onnx_runtime import InputError, OnnxPredictor

    pred = OnnxPredictor(str(model_path), threads=1, self_test=False, find_step=True)

    def rollout(x_hist: np.ndarray, u_hist: np.ndarray, u_plan: np.ndarray) -> np.ndarray:
        try:
            return pred.rollout(x_hist, u_hist, u_plan)
        except InputError:
            raise
        except Exception as exc:  # onnxruntime's own errors: a planner fault (LQR fallback), named
            raise LocalPlannerError(f"local MPC rollout failed: {type(exc).__name__}: {exc}") from exc

    return rollout, (LocalPlannerError,)


class LocalPlannerError(RuntimeError):
    """A local (in-process) MPC rollout failed in onnxruntime; the MPC falls back to LQR."""


SHIPPED = "shipped"  # --model shipped: the rig's ONNX pair in fm_core/weights (export/shipped.py)


def resolve_model(opts: RunOptions) -> RunOptions:
    """``--model shipped`` -> the rig's shipped ONNX pair (fm_core/weights, export/shipped.py), with a note on
    stderr (and a warning when it no longer matches its checkpoint). Raises ValueError when the rig ships
    none. Other options are returned unchanged."""
    if opts.model != SHIPPED:
        return opts
    import rigs
    from export.shipped import shipped_onnx, staleness

    name = rigs.load_config(opts.rig).name
    path = shipped_onnx(name)
    if path is None:
        raise ValueError(f"--model shipped: no shipped ONNX model for rig {name!r} in fm_core/weights")
    stale = staleness(path)
    print(f"model: {path} (shipped ONNX of {name}.pt{'; WARNING: ' + stale if stale else ''})",
          file=sys.stderr)
    return replace(opts, model=str(path))


def _check_log_dir(log_dir: str) -> None:
    """Create ``--log DIR`` if needed and check that this process can write there (RunSetupError if not)."""
    path = Path(log_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunSetupError(f"--log {log_dir}: cannot create the log directory "
                            f"({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunSetupError(f"--log {log_dir}: the log directory is not writable by this user")


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

    opts = resolve_model(opts)
    opts = replace(opts, mpc_planner=mpc_planner(opts))  # "auto" resolved once, here
    if opts.controller not in CONTROLLERS:
        raise ValueError(f"unknown controller {opts.controller!r}; choose one of {', '.join(CONTROLLERS)}")
    if (opts.port is None) == (not opts.virtual):
        raise ValueError("give exactly one of --port PATH or --virtual")
    if opts.model and opts.endpoint:
        raise ValueError("give at most one of --model and --endpoint")
    if opts.controller == "mpc" and not (opts.model or opts.endpoint):
        raise ValueError("controller 'mpc' needs the learned model: pass --model model.onnx, --model shipped "
                         "(the rig's shipped ONNX) or --endpoint")
    from controllers.estimators import ESTIMATORS, EstimatorSetupError

    if opts.estimator not in ESTIMATORS:
        raise EstimatorSetupError(f"unknown estimator {opts.estimator!r}; choose one of "
                                  f"{', '.join(ESTIMATORS)}")
    if opts.estimator == "fm-ukf" and not opts.model:
        raise EstimatorSetupError(
            "--estimator fm-ukf needs a learned model to run in-process: pass --model model.onnx or --model "
            "shipped (an --endpoint alone is not enough; the filter calls onnxruntime itself)")
    from controllers.learned_lqr import LQR_DESIGNS

    if opts.lqr_design not in LQR_DESIGNS:
        raise ValueError(f"unknown --lqr-design {opts.lqr_design!r}; choose one of {', '.join(LQR_DESIGNS)}")
    if opts.lqr_design == "learned" and not (opts.model or opts.endpoint):
        raise ValueError("--lqr-design learned needs the learned model: pass --model model.onnx, --model "
                         "shipped or --endpoint")
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
    if opts.log_dir:
        _check_log_dir(opts.log_dir)  # before the rig or the predictor is touched
    cfg = rigs.load_config(opts.rig)
    check_run_options(opts, cfg)
    model = rigs.make_model(cfg, opts.model_params or None)
    tuning = load_tuning(cfg.kind, opts.tuning)
    dt = 1.0 / opts.rate_hz

    with contextlib.ExitStack() as stack:
        # -- predictor first: a run that cannot use it never touches the rig, nor leaves a log ------
        proc = None
        errors: tuple = ()
        endpoint = None
        info: dict[str, Any] = {}
        if opts.model or opts.endpoint:
            from export.client import PredictorError

            errors = (PredictorError,)
            proc, endpoint, tap_client, info = _open_predictor(opts, cfg, stack)

        # -- the rig ----------------------------------------------------------------------------------
        port = opts.port
        from hardware.driver import RigConnection, RigError
        from hardware.state_feed import StateFeed
        from hardware.virtual_rig_process import VirtualRigError

        feed = StateFeed()  # every STATE frame the driver receives, for the loop to log
        try:
            if opts.virtual:
                from hardware.virtual_rig_process import VirtualRigProcess

                vr = VirtualRigProcess(opts.rig, params=opts.virtual_params or None, init=opts.init,
                                       seed=opts.seed)
                stack.enter_context(vr)
                port = vr.port
                if opts.realtime and vr.proc is not None:
                    from controllers.realtime import RIG_PRIORITY, realtime_process

                    realtime_process(vr.proc.pid, priority=RIG_PRIORITY)  # outranks all but the loop
            # a new run clears the e-stop latch that the previous run's clean exit left (once, at first
            # connect; never on a reconnect mid-run); the firmware still enforces its limits and watchdog
            conn = stack.enter_context(RigConnection(port=port, rig_config=cfg, clear_estop_on_connect=True,
                                                     on_state=feed, truth=opts.virtual))
            feed.attach(conn)
            if opts.watchdog_ms is not None:
                conn.configure(watchdog_ms=int(opts.watchdog_ms))  # kept across reconnects by the driver
        except (RigError, VirtualRigError) as exc:
            raise RunSetupError(_last_line(str(exc)) or type(exc).__name__) from None
        if conn.wait_state(timeout=5.0) is None:
            raise RunSetupError(f"{port}: the rig answered HELLO but sent no STATE within 5 s: check the "
                                "firmware's telemetry (state divider) and the link")
        rig = DryRunRig(conn) if opts.dry_run else conn
        logger = None

        # -- predictor tap ----------------------------------------------------------------------------
        tap = None
        monitor = None
        mpc_rollout = None
        if endpoint:
            from export.client import PredictorClient

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

            monitor = PredictionMonitor(_monitor_scale(cfg), horizons=(1, 10),
                                        angle_channels=(pendulum_index(model),))
            tap = PredictorTap(PredictorRollout(tap_client), model_dt, monitor=monitor, logger=logger,
                               errors=errors, stream_step=tap_client.stream_step,
                               stream_reset=reset_stream)
            stack.callback(tap.close)
            if opts.controller == "mpc" and opts.mpc_planner == "local":
                mpc_rollout, local_errors = local_rollout(opts.model)
                errors = (*errors, *local_errors)
            elif opts.controller == "mpc":
                mpc_client = PredictorClient(endpoint, timeout_ms=opts.mpc_timeout_ms)
                stack.callback(mpc_client.close)
                mpc_rollout = PredictorRollout(mpc_client)

        lqr_ctl = None
        refresher = None
        if opts.lqr_design == "learned":
            lqr_ctl, refresher = _learned_lqr(endpoint, info, model, cfg, tuning, dt, stack)
        controller = build_controller(opts.controller, model, cfg, tuning, dt, mpc_rollout, errors,
                                      opts.mpc_max_plan_age_s, lqr=lqr_ctl)
        if opts.dither_v > 0:
            from controllers.dither import Dither

            controller = Dither(controller, opts.dither_v, seed=opts.seed)
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
                "model_sha256": (file_sha256(model_path) if model_path and Path(model_path).is_file()
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
        if lqr_ctl is not None:
            _log_design(sink, lqr_ctl.design)
            refresher.on_design = lambda d: _log_design(sink, d)
        forecaster: Any = None
        if opts.latency_ms > 0:
            forecaster = PhysicsForecaster(model, opts.latency_ms / 1000.0)
            if opts.latency_source == "predictor" and tap is not None:
                forecaster = PredictorForecaster(forecaster, tap.last_one_step, tap.model_dt,
                                                 _monitor_scale(cfg))
        from controllers.estimator_select import make_estimator

        estimator = make_estimator(opts.estimator, model, cfg, tuning, fm_model=opts.model,
                                   pendulum=pendulum_index(model))
        if hasattr(estimator, "close"):
            stack.callback(estimator.close)
        from controllers.trajectory import TickRecorder

        record = TickRecorder(cfg.n)  # bounded: the newest 2^20 ticks (RunResult.trajectory / .modes)
        status_cb = None
        if opts.status:
            show = status_printer()

            def status_cb(st: dict[str, Any]) -> None:
                st = {**st, "pred_down": watch is not None and watch.down}
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
        watch = None
        if tap is not None:
            from controllers.predictor_watch import PredictorWatch

            if opts.controller == "mpc":
                fallback = ("MPC plans on in this process (monitor off)" if opts.mpc_planner == "local"
                            else "MPC falls back to LQR")
            else:
                fallback = f"{opts.controller} goes on without predictions"
            if isinstance(forecaster, PredictorForecaster):
                fallback += ", latency forecast from physics only"
            watch = PredictorWatch(tap, proc, t0=t_start, fallback=fallback, clear_line=opts.status)

        from controllers.safety import SafetyFault

        def tick(now: float) -> bool:
            if logger is not None and logger.error is not None and opts.on_log_error == "stop":
                loop.trip(SafetyFault("log_write", f"logging failed (--on-log-error stop): {logger.error}"),
                          now)
                return False
            if kill_at is not None and not killed_at and now >= kill_at and proc is not None:
                proc.proc.kill()  # SIGKILL, as a crash would (reaped by PredictorProcess.stop)
                killed_at.append(time.monotonic())
            if watch is not None:
                watch.poll(now)
            ok = inner(now)
            if loop.last.x is not None:
                record.append(now - t_start, loop.last.u, loop.last.x, loop.mode)
                if killed_at and not first_fb and "fallback" in loop.mode:
                    first_fb.append(now - killed_at[0])
            return ok

        if tap is not None:
            tap.start()
        if refresher is not None:
            refresher.start()
        if hasattr(controller, "start"):
            controller.start()
        restore = None
        planner_priority = None
        if opts.realtime:
            from controllers.realtime import enable_realtime

            restore = enable_realtime()
            if restore is None:
                print("rigfm run: real-time scheduling not permitted; running at normal priority",
                      file=sys.stderr)
            elif getattr(controller, "worker_tid", None):
                from controllers.realtime import PLANNER_PRIORITY, thread_fifo

                if thread_fifo(controller.worker_tid, PLANNER_PRIORITY):  # below the plant: realtime.py
                    planner_priority = PLANNER_PRIORITY
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
        if watch is not None:
            pred["pred_down_events"] = [list(e) for e in watch.events]
        if hasattr(controller, "fallbacks"):
            pred["mpc_fallback_ticks"] = controller.fallbacks
            pred["mpc_plans"] = controller.plans
            pred["mpc_planner_priority"] = planner_priority
            pred["mpc_takeover_ticks"] = controller.takeovers
            pred["mpc_plan_time_ms"] = controller.plan_time_s * 1e3
            pred["mpc_land_age_ms"] = controller.land_age_s * 1e3
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
        traj, modes = record.arrays()
        if interrupted and fault is None:
            fault = f"stopped by {interrupted} (motor zeroed, e-stop sent)"
        return RunResult(
            stats=summary, fault=fault,
            mode_changes=[(t - t_start, a, b) for t, a, b in loop.mode_changes],
            monitor=monitor.snapshot() if monitor else {},
            trajectory=traj, modes=modes, predictor=pred,
            logger=log_stats, first_fallback_after_kill_s=first_fb[0] if first_fb else None, log_files=files,
            rig_stats=rig_stats, live_view=live_stats, estimation=loop.estimation_summary(),
            lqr_design=_design_summary(lqr_ctl, refresher))
    raise AssertionError("unreachable")  # pragma: no cover
