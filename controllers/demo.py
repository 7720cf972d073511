"""``rigfm demo``: a virtual rig, the predictor with the shipped model, swing-up + balance, the logger.

Everything runs for real (pty, predictor subprocess, MCAP logger) for a fixed time, is shut down cleanly
(no orphan processes, motor at 0 V), and leaves in ``runs/demo-<timestamp>/``: the MCAP log, ``summary.txt``,
``summary.json`` and three plots (states, predictions vs measured, predictor latency histogram).

The model (unless ``--model`` is given): the shipped ONNX pair of the rig
(``fm_core/weights/<rig>.int8.onnx``, no torch needed) while it matches ``fm_core/weights/<rig>.pt``;
otherwise that checkpoint (or the pretrained ``default.pt``) exported into the run folder, which needs torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "fm_core" / "weights"
DEFAULT_CKPT = WEIGHTS / "default.pt"


def shipped_checkpoint(rig: str) -> Path:
    """The checkpoint the demo serves: the rig's fine-tuned model if shipped, else the pretrained one."""
    tuned = WEIGHTS / f"{rig}.pt"
    return tuned if tuned.is_file() else DEFAULT_CKPT


def export_default_model(out_dir: Path, rig: str, model_dt: float = 0.01) -> tuple[Path, str]:
    """Export the shipped checkpoint to ONNX in ``out_dir`` (subprocess: this process stays torch-free).

    Prefers ``fm_core/weights/<rig>.pt`` (fine-tuned on that rig's simulator data); the pretrained
    ``default.pt`` is exported zero-shot for n=4, m=1 otherwise. Without any shipped checkpoint a
    random-weight model of the same size is exported, and said so."""
    ckpt = shipped_checkpoint(rig)
    note = f"model: {ckpt.relative_to(ROOT)} exported to ONNX"
    code = ("import sys\nfrom pathlib import Path\n"
            "from export.onnx_export import export_checkpoint, save_random_checkpoint\n"
            "d = Path(sys.argv[1]); ck = Path(sys.argv[2]); dt = float(sys.argv[4])\n"
            "if not ck.is_file():\n"
            "    ck = save_random_checkpoint(d / 'random_init.pt', seed=0, dt=dt, rig=sys.argv[3])\n"
            "kw = {'n': 4, 'm': 1, 'dt': dt} if ck.name == 'default.pt' else {}\n"
            "export_checkpoint(ck, d / 'model.onnx', context=32, streaming=d / 'model_step.onnx', **kw)\n")
    if not ckpt.is_file():
        note = (f"WARNING: {ckpt} not found; using a RANDOM-WEIGHT model of the shipped size "
                "(predictions are meaningless, the plumbing is real)")
        print(note, file=sys.stderr)
    elif ckpt == DEFAULT_CKPT:
        note += " (zero-shot: no fine-tuned checkpoint for this rig)"
    proc = subprocess.run([sys.executable, "-c", code, str(out_dir), str(ckpt), rig, repr(model_dt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"exporting the model failed (needs torch):\n{proc.stderr[-2000:]}")
    return out_dir / "model.onnx", note


def _torch_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # sys.modules["torch"] = None (blocked) raises ValueError
        return False


def demo_model(out_dir: Path, rig: str, model_dt: float = 0.01) -> tuple[Path, str]:
    """The ONNX model the demo serves and a one-line note saying which and why.

    The shipped pair of ``rig`` when it matches its checkpoint; else an export of the checkpoint (torch);
    without torch a stale shipped pair is served with a warning. Raises RuntimeError when there is neither
    a shipped pair nor torch to export one."""
    from export.shipped import shipped_onnx, staleness

    shipped = shipped_onnx(rig)
    stale = staleness(shipped) if shipped is not None else None
    if shipped is not None and stale is None:
        return shipped, f"model: {shipped.relative_to(ROOT)} (shipped ONNX of {rig}.pt)"
    if _torch_available():
        if stale:
            print(f"rigfm demo: shipped ONNX is stale ({stale}); exporting the checkpoint", file=sys.stderr)
        return export_default_model(out_dir, rig, model_dt)
    if shipped is not None:
        note = f"WARNING: {stale}; serving it anyway (no torch to export the checkpoint)"
        print(note, file=sys.stderr)
        return shipped, f"model: {shipped.relative_to(ROOT)} ({note})"
    raise RuntimeError(f"no shipped ONNX model for rig {rig!r} and no torch to export "
                       f"{shipped_checkpoint(rig).relative_to(ROOT)}: pass --model model.onnx")


def _plots(out: Path, result: Any, log_files: list[str], state_names: tuple[str, ...],
           model_dt: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    traj = result.trajectory
    if len(traj):
        fig, axes = plt.subplots(5, 1, figsize=(10, 11), sharex=True)
        for i, name in enumerate(state_names):
            axes[i].plot(traj[:, 0], traj[:, 2 + i], lw=0.8)
            axes[i].set_ylabel(name)
        axes[4].plot(traj[:, 0], traj[:, 1], lw=0.6, color="C3")
        axes[4].set_ylabel("u (V)")
        axes[4].set_xlabel("t (s)")
        for t, _, new in result.mode_changes:
            for ax in axes:
                ax.axvline(t, color="k", ls=":", lw=0.6)
            axes[0].text(t, axes[0].get_ylim()[1], new, fontsize=7, va="top")
        fig.suptitle("measured state (encoders + estimated velocities) and command")
        fig.tight_layout()
        fig.savefig(out / "states.png", dpi=110)
        plt.close(fig)
        written.append("states.png")

    preds, states = [], []
    if log_files:
        from hardware.log_reader import read_topics

        for f in log_files:
            _, msgs = read_topics(f, {"/prediction", "/state"})
            preds += [m for _, m in msgs.get("/prediction", [])]
            states += [m for _, m in msgs.get("/state", [])]
    if preds and states:
        st_t = np.array([s["host_time_ns"] for s in states], dtype=float) * 1e-9
        st_x = np.array([s["positions"] + s["velocities"] for s in states], dtype=float)
        p_t = np.array([p["ref_host_time_ns"] for p in preds], dtype=float) * 1e-9 + model_dt
        p_x = np.array([p["predicted"][0] for p in preds], dtype=float)
        t0 = st_t[0]
        fig, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True)
        for i, name in enumerate(state_names):
            axes[i].plot(st_t - t0, st_x[:, i], lw=0.8, label="measured")
            axes[i].plot(p_t - t0, p_x[:, i], ".", ms=2, label="one-step prediction")
            axes[i].set_ylabel(name)
        axes[0].legend(loc="upper right", fontsize=8)
        axes[-1].set_xlabel("t (s)")
        fig.suptitle("learned model: one-step predictions vs measured")
        fig.tight_layout()
        fig.savefig(out / "predictions.png", dpi=110)
        plt.close(fig)
        written.append("predictions.png")
        lat = np.array([p.get("latency_us") or np.nan for p in preds], dtype=float)
        lat = lat[np.isfinite(lat)]
        if lat.size:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.hist(lat / 1000.0, bins=60)
            ax.set_xlabel("predictor round trip (ms)")
            ax.set_ylabel("count")
            ax.set_title(f"one-step prediction latency: p50 {np.percentile(lat, 50) / 1e3:.2f} ms, "
                         f"p99 {np.percentile(lat, 99) / 1e3:.2f} ms")
            fig.tight_layout()
            fig.savefig(out / "latency.png", dpi=110)
            plt.close(fig)
            written.append("latency.png")
    return written


def run_demo(rig: str = "cartpole", duration_s: float = 20.0, model: str | None = None,
             out: str | None = None, controller: str = "swingup", plots: bool = True,
             stale_ms: float = 200.0) -> int:
    """Run the demo; returns the exit code (0 clean, 1 fault)."""
    import rigs
    from controllers.run_report import result_jsonable, summary_table
    from controllers.session import RunOptions, run_session

    cfg = rigs.load_config(rig)
    out_dir = Path(out or ROOT / "runs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        try:
            model_path, note = demo_model(out_dir, cfg.name, cfg.model_dt)
        except RuntimeError as exc:
            print(f"rigfm demo: {exc}", file=sys.stderr)
            return 2
    else:
        model_path, note = Path(model), f"model: {model}"
    print(f"rigfm demo: {cfg.name}, {controller}, {duration_s:g} s -> {out_dir}", file=sys.stderr)
    result = run_session(RunOptions(rig=rig, controller=controller, virtual=True, duration_s=duration_s,
                                    model=str(model_path), log_dir=str(out_dir), realtime=True,
                                    # virtual rig on a shared host: tolerate scheduler pauses
                                    stale_ms=stale_ms))
    table = summary_table(result)
    files = _plots(out_dir, result, result.log_files, cfg.state_names, cfg.model_dt) if plots else []
    text = f"{note}\n{table}\nfiles: {', '.join([Path(f).name for f in result.log_files] + files)}\n"
    print(text)
    (out_dir / "summary.txt").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(result_jsonable(result), indent=1, default=float))
    return 0 if result.ok else 1
