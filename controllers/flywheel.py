"""The data flywheel, end to end, against ONE running predictor process.

run (mismatched virtual rig, logged) -> dataset build -> fine-tune -> export -> hot reload of the running
predictor (same pid) -> run again -> compare the prediction monitor's 1-step and 10-step errors.

The control side stays torch-free: fine-tuning and export run as ``rigfm`` subprocesses
(``python -m controllers.cli finetune|export``).  ``python -m controllers.flywheel`` or ``rigfm flywheel``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controllers.flywheel_gate import DEFAULT_MIN_RATIO, check_update
from fm_core.cli_types import (
    SEED,
    add_options,
    add_set_option,
    finite_float,
    int_range,
    option,
    options_from_args,
    section,
)

DEFAULT_PARAMS = {"pole_mass_scale": 1.4, "friction_scale": 2.0}
NOMINAL_WEIGHTS = {"cartpole": "fm_core/weights/cartpole.pt", "furuta": "fm_core/weights/furuta.pt"}
PRETRAINED = "fm_core/weights/default.pt"
REPO = Path(__file__).resolve().parents[1]


class FlywheelError(RuntimeError):
    """A flywheel stage failed; the message names the stage (and the command / file)."""


@dataclass
class FlywheelConfig:
    """One flywheel experiment; each ``option(...)`` field is also its ``rigfm flywheel`` flag."""

    out: str = option("runs/flywheel", help="output folder (default runs/flywheel)")
    rig: str = option("cartpole")
    controller: str = option("swingup", choices=("lqr", "swingup"))
    duration_s: float = option(60.0, flag="--duration", type=finite_float(0, 1e6, lo_open=True, unit="s"),
                               help="seconds per run (default 60)")
    finetune_steps: int = option(300, flag="--steps", type=int_range(1, 10**9),
                                 help="fine-tune steps (default 300)")
    init_checkpoint: str | None = option(None, flag="--init", help="v1 checkpoint (default "
                                         "fm_core/weights/<rig>.pt, else the pretrained default.pt)")
    virtual_params: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PARAMS))  # --set plant.K=V
    init_state: str = option("hanging", choices=("hanging", "upright"),
                             help="virtual rig start of both runs: hanging (swing-up first; default) or "
                                  "upright (balance data only)")
    seed: int = option(0, type=SEED)
    stale_ms: float = option(200.0, type=finite_float(0, 10_000, lo_open=True, unit="ms"),
                             help="e-stop when no new state for this long (tolerant: shared machines)")
    window: int | None = option(None, type=int_range(2, 10**7), help="dataset window (default fits the run)")
    context: int = 64                       # predictor window of the exported ONNX
    status: bool = option(False, help="live status line during the runs")
    angle_features: str = option("auto", choices=("auto", "raw", "sincos"),
                                 help="fine-tune v2 on the pendulum angle as logged or as (sin, cos) (the "
                                      "predictor still serves raw states); auto (default): as v1 has it")
    lqr_design: str = option("nominal", choices=("nominal", "learned"),
                             help="balance LQR of both runs: physics (default) or the served model's "
                                  "linearisation (run 2 then balances on v2's, controllers/learned_lqr.py)")
    dither_v: float = option(0.0, flag="--dither", metavar="V", type=finite_float(0, 100, unit="V"),
                             help="random +-V telegraph added to the balance commands of both runs (rigfm "
                                  "run --dither): data that shows the model what the input does (default 0)")

    gate: float = option(DEFAULT_MIN_RATIO, type=finite_float(0, 1e6),
                         help="deploy v2 only when its pendulum-angle input response is at least this share "
                              f"of v1's, else keep v1 serving (controllers/flywheel_gate.py; 0 = deploy "
                              f"always; default {DEFAULT_MIN_RATIO})")

    def __post_init__(self) -> None:
        if self.angle_features not in ("auto", "raw", "sincos"):
            raise ValueError(f"angle_features {self.angle_features!r}: use 'auto', 'raw' or 'sincos'")


def _rigfm(args: list[str], stage: str, log: Path) -> None:
    """Run ``rigfm ARGS`` in a subprocess (torch lives there); raise FlywheelError naming the stage."""
    cmd = [sys.executable, "-m", "controllers.cli", *args]
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text()[-2000:]
        raise FlywheelError(f"flywheel stage {stage!r} failed (exit {rc}): {' '.join(cmd)}\n{tail}")


def resolve_init(cfg: FlywheelConfig) -> tuple[Path, bool]:
    """The v1 checkpoint and whether it is already fine-tuned on the rig (else the pretrained default)."""
    if cfg.init_checkpoint:
        p = Path(cfg.init_checkpoint)
        if not p.is_file():
            raise FileNotFoundError(f"--init {p}: no such checkpoint")
        return p, True
    nominal = REPO / NOMINAL_WEIGHTS.get(cfg.rig, f"fm_core/weights/{cfg.rig}.pt")
    if nominal.is_file():
        return nominal, True
    p = REPO / PRETRAINED
    if not p.is_file():
        raise FileNotFoundError(f"no initial checkpoint: neither {nominal} nor {p} exists")
    return p, False


def export_onnx(ckpt: Path, onnx: Path, context: int, log: Path, dims: bool) -> Path:
    """``rigfm export`` -> full-window ONNX + KV-cache step graph; returns the step graph path."""
    step = onnx.with_name(onnx.stem + ".step.onnx")
    args = ["export", str(ckpt), "-o", str(onnx), "--streaming", str(step), "--context", str(context)]
    if dims:  # pretrained weights carry no n/m/dt
        args += ["--n", "4", "--m", "1", "--dt", "0.01"]
    _rigfm(args, "export", log)
    return step


def _errors(res: Any) -> dict[str, Any]:
    mon = res.monitor or {}
    out = {k: mon.get(k) for k in ("err1_win", "err1_ewma", "err1_count", "err10_win", "err10_ewma",
                                   "err10_count")}
    out.update(fault=res.fault, overruns=res.stats.get("overruns"), modes=sorted(set(res.modes)),
               predictor={k: v for k, v in res.predictor.items() if isinstance(v, (int, float, str))},
               log_files=list(res.log_files),
               lqr_design={k: v for k, v in (res.lqr_design or {}).items() if k != "designs"})
    return out


def _run(cfg: FlywheelConfig, endpoint: str, log_dir: Path | None) -> Any:
    from controllers.session import RunOptions, run_session

    opts = RunOptions(rig=cfg.rig, controller=cfg.controller, virtual=True, duration_s=cfg.duration_s,
                      endpoint=endpoint, log_dir=str(log_dir) if log_dir else None,
                      virtual_params=dict(cfg.virtual_params), stale_ms=cfg.stale_ms, status=cfg.status,
                      seed=cfg.seed, lqr_design=cfg.lqr_design, init=cfg.init_state, dither_v=cfg.dither_v)
    return run_session(opts)


def _window(duration_s: float, dt: float, requested: int | None) -> int:
    if requested:
        return requested
    steps = int(duration_s / dt)
    return int(max(16, min(256, 0.05 * steps)))  # the 10 % val/test blocks must hold windows


def _split_counts(report: dict[str, Any]) -> dict[str, int] | Any:
    w = report.get("windows")
    return {k: int(v) for k, v in w.items()} if isinstance(w, dict) else w


def _can_fine_tune(counts: dict[str, int] | Any) -> bool:
    """The window counts hold a train and a val window (counts not given per split: assumed so)."""
    return not isinstance(counts, dict) or bool(counts.get("train") and counts.get("val"))


def build_fit_dataset(build: Callable[..., dict[str, Any]], logs: list[Path], data: Path, window: int,
                      explicit: bool, seed: int) -> tuple[int, dict[str, Any]]:
    """``build(logs, data, window=, seed=)`` -> (window used, report). When the default window leaves the
    train or val split empty (a short run whose val block a state gap cuts up), halve it, down to 16 steps;
    an explicit ``--window`` is used as given."""
    while True:
        report = build(logs, data, window=window, seed=seed)
        if _can_fine_tune(_split_counts(report)) or explicit or window // 2 < 16:
            return window, report
        window //= 2


def run_flywheel(cfg: FlywheelConfig, progress: Any = None) -> dict[str, Any]:
    """Run the whole experiment; writes ``flywheel.json`` and ``flywheel.md`` into ``cfg.out``; returns the
    result dict (``error_before``/``error_after``/``factor`` = 10-step windowed errors, plus 1-step)."""
    import rigs
    from export.client import PredictorProcess
    from hardware.dataset_build import build_dataset

    say = progress or (lambda msg: None)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rcfg = rigs.load_config(cfg.rig)
    init, tuned = resolve_init(cfg)
    t0 = time.monotonic()
    stages: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        stages[name] = round(time.monotonic() - since, 2)
        return time.monotonic()

    t = time.monotonic()
    v1 = out / "v1.onnx"
    v1_step = export_onnx(init, v1, cfg.context, out / "export_v1.log", dims=not tuned)
    t = mark("export_v1", t)
    with PredictorProcess(v1, extra_args=["--streaming", str(v1_step)]) as proc:
        client = proc.client(timeout_ms=30_000)
        try:
            pid0 = proc.pid
            info1 = client.info()
            say(f"predictor pid {pid0} serving v1 ({init.name}, sha {str(info1.get('model_sha256'))[:12]})")
            before = _run(cfg, proc.endpoint, out / "logs_before")
            t = mark("run_before", t)
            say(f"run 1: err10_win {before.monitor.get('err10_win')}, fault {before.fault}")
            if not before.log_files:
                raise FlywheelError("flywheel stage 'run_before' wrote no log files")
            data = out / "data.npz"
            window, report = build_fit_dataset(build_dataset, before.log_files, data,
                                               _window(cfg.duration_s, rcfg.model_dt, cfg.window),
                                               bool(cfg.window), cfg.seed)
            t = mark("dataset", t)
            n_windows = _split_counts(report)
            say(f"dataset {data.name}: window {window}, windows {n_windows}")
            if not _can_fine_tune(n_windows):
                raise FlywheelError(
                    f"flywheel stage 'dataset': run 1 gave too little data to fine-tune on (windows "
                    f"{n_windows}; a train and a val window are needed): it ended after "
                    f"{before.stats.get('ticks', 0) / max(before.stats.get('rate_hz') or 1.0, 1.0):.1f} s"
                    f"{' with the fault ' + str(before.fault) if before.fault else ''}; use a longer "
                    f"--duration or a smaller --window")
            ft = out / "ft"
            _rigfm(["finetune", "--init", str(init), "--data", str(data), "--mode", "full", "--steps",
                    str(cfg.finetune_steps), "--seed", str(cfg.seed), "--out", str(ft), "--no-progress",
                    "--angle-features", cfg.angle_features],
                   "finetune", out / "finetune.log")
            t = mark("finetune", t)
            v2 = out / "v2.onnx"
            v2_step = export_onnx(ft / "finetuned.pt", v2, cfg.context, out / "export_v2.log", dims=False)
            t = mark("export_v2", t)
            gate = check_update(v1, v2, data, min_ratio=cfg.gate) if cfg.gate > 0 else None
            t = mark("gate", t)
            deploy = gate is None or gate.passed
            reloads0 = int(client.health().get("reloads", 0))
            if deploy:
                rel = client.reload(str(v2), streaming=str(v2_step))
            else:
                rel = {"skipped": gate.reason}
                say(f"gate: kept v1 serving: {gate.reason}")
            info2 = client.info()
            health = client.health()
            t = mark("reload", t)
            if proc.pid != pid0 or proc.proc is None or proc.proc.poll() is not None:
                raise FlywheelError(f"flywheel stage 'reload': predictor pid {pid0} did not survive")
            if deploy:
                say(f"reloaded v2 in pid {proc.pid}: sha {str(info2.get('model_sha256'))[:12]}")
            after = _run(cfg, proc.endpoint, out / "logs_after")
            t = mark("run_after", t)
        finally:
            client.close()
    eb, ea = _errors(before), _errors(after)

    def ratio(a: Any, b: Any) -> float:
        if a is None or not b or not (math.isfinite(a) and math.isfinite(b)):
            return math.nan
        return float(a) / float(b)

    result = {
        "rig": cfg.rig, "config": asdict(cfg), "init_checkpoint": str(init), "init_is_rig_finetuned": tuned,
        "predictor_pid": pid0, "pid_after_reload": proc.pid,
        "sha_v1": info1.get("model_sha256"), "sha_v2": info2.get("model_sha256"), "reload_reply": rel,
        "deployed": "v2" if deploy else "v1", "deployed_onnx": str(v2 if deploy else v1),
        "gate": asdict(gate) if gate is not None else None,
        "angle_channels_v2": info2.get("angle_channels", []),
        "reloads": int(health.get("reloads", 0)) - reloads0, "dataset": {"path": str(data), "window": window,
                                                                       "windows": n_windows},
        "before": eb, "after": ea,
        "error_before": eb["err10_win"], "error_after": ea["err10_win"],
        "factor": ratio(eb["err10_win"], ea["err10_win"]),
        "error1_before": eb["err1_win"], "error1_after": ea["err1_win"],
        "factor1": ratio(eb["err1_win"], ea["err1_win"]),
        "factor_ewma": ratio(eb["err10_ewma"], ea["err10_ewma"]),
        "stages_s": stages, "wall_s": round(time.monotonic() - t0, 1),
    }
    (out / "flywheel.json").write_text(json.dumps(result, indent=1, default=_jsonable))
    (out / "flywheel.md").write_text(summary_markdown(result))
    return result


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def summary_markdown(r: dict[str, Any]) -> str:
    """Short markdown summary of a flywheel result."""
    c = r["config"]

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    params = " ".join(f"{k}={v}" for k, v in c["virtual_params"].items())
    gate = r.get("gate")
    deployed = r.get("deployed", "v2")
    gate_line = (f"Gate (v2's input response vs v1's, at least {gate['min_ratio']}x): "
                 f"{'passed' if gate['passed'] else 'failed'}: {gate['reason']}; run 2 served {deployed}.\n"
                 if gate else "Gate: off.\n")
    return (
        f"# Flywheel: {r['rig']} ({c['controller']}), virtual rig {params}\n\n"
        f"v1 = `{Path(r['init_checkpoint']).name}` (rig-fine-tuned: {r['init_is_rig_finetuned']}), "
        f"{c['duration_s']:.0f} s runs, {c['finetune_steps']} fine-tune steps, dataset windows "
        f"{r['dataset']['windows']}.\n"
        f"Predictor pid {r['predictor_pid']} before and {r['pid_after_reload']} after the reload "
        f"({r['reloads']} reload), sha {str(r['sha_v1'])[:12]} -> {str(r['sha_v2'])[:12]}.\n"
        f"{gate_line}\n"
        f"| error (monitor, windowed mean) | before (v1) | after ({deployed}) | factor |\n|---|---|---|---|\n"
        f"| 10-step | {f(r['error_before'])} | {f(r['error_after'])} | {r['factor']:.2f}x |\n"
        f"| 1-step | {f(r['error1_before'])} | {f(r['error1_after'])} | {r['factor1']:.2f}x |\n\n"
        f"Faults: before {r['before']['fault']}, after {r['after']['fault']}. "
        f"Stage times (s): {r['stages_s']}.\n"
    )


# ------------------------------------------------------------------------------------------------ CLI
def register(subparsers: Any) -> None:
    """Add ``flywheel``."""
    p = subparsers.add_parser("flywheel", help="run -> log -> dataset -> fine-tune -> export -> hot reload "
                                               "-> run again; reports the prediction-error drop")
    add_arguments(p)
    p.set_defaults(func=handler)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, FlywheelConfig)
    add_set_option(p, "plant mismatch of the virtual rig (default plant.pole_mass_scale=1.4 "
                      "plant.friction_scale=2)", number=True, sections=("plant",))


def handler(args: argparse.Namespace) -> int:
    cfg = options_from_args(FlywheelConfig, args,
                            virtual_params=section(args.overrides, "plant") or dict(DEFAULT_PARAMS))
    try:
        res = run_flywheel(cfg, progress=lambda m: print(f"flywheel: {m}", file=sys.stderr, flush=True))
    except (FlywheelError, FileNotFoundError, ValueError) as exc:
        print(f"rigfm flywheel: {exc}", file=sys.stderr)
        return 2
    print(summary_markdown(res))
    print(f"wrote {Path(cfg.out) / 'flywheel.json'} and flywheel.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controllers.flywheel", description=__doc__)
    add_arguments(p)
    return handler(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
