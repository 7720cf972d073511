"""What a finished run reports: the console summary table and the JSON summary (`rigfm run`, `demo`)."""

from __future__ import annotations

from typing import Any


def final_mode(result: Any) -> str:
    """The mode the run ended in (``idle`` if it never ticked)."""
    if result.mode_changes:
        return result.mode_changes[-1][2]
    return result.modes[-1] if result.modes else "idle"


def mode_summary(result: Any, last: int = 3) -> str:
    """``127 / estop (last: balance@9.20s, fallback@9.31s, estop@9.80s)``: count, final mode, last changes."""
    ch = result.mode_changes
    tail = ", ".join(f"{b}@{t:.2f}s" for t, _, b in ch[-last:])
    return f"{len(ch)} / {final_mode(result)}" + (f" (last: {tail})" if tail else "")


def summary_table(result: Any) -> str:
    """Human-readable summary of a run."""
    s = result.stats
    rows = [("ticks", s["ticks"]), ("rate (Hz)", f"{s['rate_hz']:.1f}"),
            ("period error p50 / p99 / max (us)",
             f"{s['period_err_p50_us']:.1f} / {s['period_err_p99_us']:.1f} / {s['period_err_max_us']:.1f}"),
            ("jitter (us)", f"{s['jitter_us']:.1f}"),
            ("overruns", f"{s['overruns']} ({s['overrun_pct']:.3f} %)"),
            ("tick busy p50 / p99 (us)", f"{s['busy_p50_us']:.1f} / {s['busy_p99_us']:.1f}"),
            ("fault", result.fault or "none"),
            *([("LQR design", _design_row(result.lqr_design))] if result.lqr_design else []),
            ("mode changes / final mode", mode_summary(result))]
    est = getattr(result, "estimation", None) or {}
    if est:
        line = str(est.get("estimator"))
        if est.get("error_rms"):
            line += " (RMS error vs /truth: " + ", ".join(f"{v:.3g}" for v in est["error_rms"]) + ")"
        rows.append(("estimator", line))
    m = result.monitor
    if m:
        rows += [("pred err 1-step EWMA / window", f"{m.get('err1_ewma', float('nan')):.4f} / "
                                                   f"{m.get('err1_win', float('nan')):.4f}"),
                 ("pred err 10-step EWMA", f"{m.get('err10_ewma', float('nan')):.4f}"),
                 ("drift flag", m.get("drift"))]
    p = result.predictor
    if p:
        downs = [e for e in p.get("pred_down_events", []) if e[1] == "down"]
        rows += [("predictor requests / late / failures",
                  f"{p.get('pred_requests')} / {p.get('pred_late')} / {p.get('pred_failures')}"),
                 ("predictor down", f"at {downs[0][0]:.2f} s: {downs[0][2]}" + (
                     f" (+{len(downs) - 1} more)" if len(downs) > 1 else "") if downs else "never"),
                 ("predictor latency p50 (us)", f"{p.get('pred_latency_p50_us', float('nan')):.0f}")]
        if "mpc_plans" in p:
            rows += [("MPC plans / fallback ticks", f"{p['mpc_plans']} / {p['mpc_fallback_ticks']}")]
    if result.logger:
        lg = result.logger
        rows += [("frames logged / dropped", f"{lg.get('written')} / {lg.get('dropped')}")]
        if lg.get("error"):
            rows += [("LOGGING FAILED", f"{lg['error']} ({lg.get('write_errors')} messages lost)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _design_row(d: dict[str, Any]) -> str:
    """``learned (gain change 0.12, 1 refresh)`` or ``nominal (reason)``."""
    if d.get("source") == "learned":
        return f"learned (gain change {d.get('gain_change') or 0:.3f}, refreshes {d.get('refreshes', 0)})"
    return f"nominal ({d.get('reason') or 'not designed'})"


def result_jsonable(result: Any) -> dict[str, Any]:
    """The run summary as JSON-serialisable data (``--summary-json``, the demo's summary.json)."""
    return {"stats": result.stats, "fault": result.fault, "mode_changes": result.mode_changes,
            "mode_change_count": len(result.mode_changes), "final_mode": final_mode(result),
            "monitor": result.monitor, "predictor": result.predictor, "logger": result.logger,
            "first_fallback_after_kill_s": result.first_fallback_after_kill_s, "log_files": result.log_files,
            "rig_stats": result.rig_stats, "live_view": result.live_view, "log_error": result.log_error,
            "estimation": getattr(result, "estimation", {}),
            "lqr_design": result.lqr_design,
            "final_state": result.trajectory[-1, 2:].tolist() if len(result.trajectory) else None}
