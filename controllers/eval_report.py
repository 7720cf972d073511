"""Writing the evaluation's outputs: per-rig tables and plots, summary.md with the verdict, results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

ORDER = ("fm0", "fm", "specialist", "small_tf", "ffn", "linreg", "sindy", "fm0_long", "persistence")
LABELS = {
    "fm": "FM (fine-tuned)",
    "fm0": "FM zero-shot",
    "fm0_long": "FM zero-shot, long context",
    "persistence": "Persistence (hold last state), long context",
    "specialist": "Specialist (FM arch, scratch)",
    "linreg": "Linear regression (ridge)",
    "ffn": "FFN (MLP)",
    "small_tf": "Small transformer",
    "sindy": "SINDy with control",
}

# every model the fine-tuned FM must beat at every fraction (verdict question 2)
BASELINES = ("specialist", "linreg", "ffn", "small_tf", "sindy")


def aggregate(rig_res: dict[str, Any]) -> dict[tuple[str, float], dict[str, float]]:
    """(model, fraction) -> mean/std over seeds of both metrics (std with ddof=0; 0 for one seed)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rig_res["runs"]:
        groups.setdefault((r["model"], float(r["fraction"])), []).append(r)
    out = {}
    for key, rows in groups.items():
        agg: dict[str, float] = {"n": len(rows)}
        for k in ("one_step_mse", "multi_step_mse"):
            v = np.array([row[k] for row in rows], dtype=float)
            # a diverged seed (inf) makes mean and std inf (numpy's std would be NaN)
            std = float(v.std()) if np.isfinite(v).all() else float("inf")
            agg[f"{k}_mean"], agg[f"{k}_std"] = float(v.mean()), std
        out[key] = agg
    return out



def _fmt(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:.4g}" if n <= 1 else f"{mean:.4g} ± {std:.2g}"


def rig_table(rig_res: dict[str, Any]) -> str:
    """Markdown table: one row per (model, fraction), mean ± std over seeds of both MSEs."""
    agg = aggregate(rig_res)
    lines = [
        "| model | data fraction | train traj. | seeds | one-step MSE | multi-step MSE | steps (best) | "
        "fit wall s | stopped by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ntr = rig_res["n_trajectories"]["train"]
    for m in ORDER:
        for f in sorted({f for (mm, f) in agg if mm == m}):
            a = agg[(m, f)]
            k = "0 (zero-shot)" if f == 0 else str(max(1, int(math.ceil(f * ntr - 1e-9))))
            rows = [r for r in rig_res["runs"] if r["model"] == m and float(r["fraction"]) == f]
            lines.append(
                f"| {LABELS[m]} | {f:g} | {k} | {a['n']} | "
                f"{_fmt(a['one_step_mse_mean'], a['one_step_mse_std'], a['n'])} | "
                f"{_fmt(a['multi_step_mse_mean'], a['multi_step_mse_std'], a['n'])} | {_compute(rows)} |"
            )
    return "\n".join(lines)


def _compute(rows: list[dict[str, Any]]) -> str:
    """Mean optimiser steps run (best step), mean fit wall time and the stop reasons over the seeds."""
    steps = [r["info"].get("steps_run") for r in rows if isinstance(r.get("info", {}).get("steps_run"), int)]
    best = [r["info"].get("best_step") for r in rows if isinstance(r.get("info", {}).get("best_step"), int)]
    wall = [float(r["wall_s"]) for r in rows if isinstance(r.get("wall_s"), int | float)]
    reasons = sorted({str(r["info"]["stop_reason"]) for r in rows if r.get("info", {}).get("stop_reason")})
    st = f"{np.mean(steps):.0f} ({np.mean(best):.0f})" if steps and best else "-"
    return f"{st} | {np.mean(wall):.0f} | {', '.join(reasons) or '-'}" if wall else f"{st} | - | -"


def verdict_md(v: dict[str, Any]) -> str:
    """The verdict section in words and numbers."""
    def yn(h: Any) -> str:
        return "n/a" if h is None else ("**YES**" if h else "**NO**")

    q1, q2, q3 = v["fm_lowest_every_fraction"], v["fm_data_efficient"], v["fm_std_smaller_than_specialist"]
    q4 = v["zero_shot_beats_persistence"]
    out = [
        "## Verdict (computed from the numbers above)",
        "",
        f"1. The fine-tuned FM has the lowest multi-step MSE of all models "
        f"({', '.join(LABELS[m] for m in BASELINES)}) at every fraction: {yn(q1['holds'])}",
    ]
    for rig, d in q1["per_rig"].items():
        if d["holds"]:
            out.append(f"   - {rig}: holds")
        else:
            exc = "; ".join(
                f"{LABELS[e['model']]}@{e['fraction']:g}: {e['other_multi']:.4g} <= FM {e['fm_multi']:.4g}"
                for e in d["exceptions"]
            )
            out.append(f"   - {rig}: fails ({exc})")
    out.append(f"2. Data efficiency: FM at a fraction is at or below the best baseline at the next larger "
               f"fraction: {yn(q2['holds'])}")
    for rig, d in q2["per_rig"].items():
        parts = "; ".join(
            f"FM@{c['fm_fraction']:g} {c['fm_multi']:.4g} vs {LABELS[c['baseline']]}"
            f"@{c['baseline_fraction']:g} {c['baseline_multi']:.4g} ({'holds' if c['holds'] else 'fails'})"
            for c in d["pairs"]
        )
        out.append(f"   - {rig}: {parts}")
    out.append(
        f"3. FM's seed-to-seed std of the multi-step MSE is smaller than the specialist's at every "
        f"fraction: {yn(q3['holds'])}"
    )
    for rig, d in q3["per_rig"].items():
        parts = ", ".join(
            f"{c['fraction']:g}: {c['fm_std']:.2g} vs {c['specialist_std']:.2g}" for c in d["per_fraction"]
        )
        out.append(f"   - {rig}: {'holds' if d['holds'] else 'fails'} ({parts})")
    out.append(f"4. Zero-shot: the FM without fine-tuning beats persistence (hold the last state) on the "
               f"multi-step MSE: {yn(q4['holds'])}")
    for rig, d in q4["per_rig"].items():
        out.append(f"   - {rig}: FM zero-shot {d['fm0_multi']:.4g} vs persistence "
                   f"{d['persistence_multi']:.4g} ({d.get('context')} context steps) -> "
                   f"{'holds' if d['holds'] else 'fails'}")
    return "\n".join(out)


def _plots(rig_res: dict[str, Any], d: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    agg = aggregate(rig_res)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("one_step_mse", "multi_step_mse"), strict=True):
        for m in ORDER[1:]:
            fr = sorted({f for (mm, f) in agg if mm == m and f > 0})
            if not fr:
                continue
            mean = np.array([agg[(m, f)][f"{metric}_mean"] for f in fr])
            std = np.array([agg[(m, f)][f"{metric}_std"] for f in fr])
            ok = np.isfinite(mean) & np.isfinite(std)  # a diverged model (inf): no point, the table says so
            if not ok.any():
                continue
            ax.errorbar(np.asarray(fr)[ok], mean[ok], yerr=std[ok], marker="o", capsize=3, label=LABELS[m])
        if ("fm0", 0.0) in agg:
            ax.axhline(agg[("fm0", 0.0)][f"{metric}_mean"], color="gray", ls="--", label=LABELS["fm0"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fraction of training trajectories")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (normalised)")
        ax.set_title(f"{rig_res['rig']}: {metric.replace('_', ' ')}")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(d / "mse_vs_fraction.png", dpi=90)
    plt.close(fig)
    files.append("mse_vs_fraction.png")

    curves = [r for r in rig_res["runs"] if r.get("val_curve") and r["seed"] == 0]
    if curves:
        fracs = sorted({float(r["fraction"]) for r in curves})
        fig, axes = plt.subplots(1, len(fracs), figsize=(4.5 * len(fracs), 3.6), squeeze=False)
        for ax, f in zip(axes[0], fracs, strict=True):
            for r in (r for r in curves if float(r["fraction"]) == f):
                pts = [(c["step"], c["val_loss"]) for c in r["val_curve"]
                       if c.get("val_loss") is not None and math.isfinite(c["val_loss"])]
                if pts:
                    st, vl = zip(*pts, strict=True)
                    ax.plot(st, vl, lw=1, label=LABELS.get(r["model"], r["model"]))
            ax.set_yscale("log")
            ax.set_xlabel("optimiser step")
            ax.set_ylabel("val rollout MSE")
            ax.set_title(f"{rig_res['rig']}: {f:g} of the data, seed 0")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(d / "val_curves.png", dpi=90)
        plt.close(fig)
        files.append("val_curves.png")

    ex = rig_res.get("example", {})
    if "truth" in ex:
        truth = np.asarray(ex["truth"])
        c = int(ex["context"])
        t = np.arange(len(truth)) * float(rig_res.get("dt") or 1.0)
        names = rig_res["state_names"]
        fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.0 * len(names)), sharex=True)
        for i, ax in enumerate(np.atleast_1d(axes)):
            ax.plot(t, truth[:, i], "k-", lw=1.5, label="truth")
            for m in ORDER:
                if m in ex:
                    p = np.asarray(ex[m], dtype=float)
                    p = np.where(np.isfinite(p), p, np.nan)  # a diverged rollout: the line stops there
                    ax.plot(t[c:], p[:, i], lw=1, label=LABELS[m])
            ax.axvline(t[c - 1], color="gray", ls=":")
            ax.set_ylabel(names[i])
        np.atleast_1d(axes)[0].legend(fontsize=6, ncol=3)
        np.atleast_1d(axes)[-1].set_xlabel("time (s); open-loop rollout right of the dotted line")
        fig.suptitle(f"{rig_res['rig']}: one test window, models at the largest fraction (seed 0)")
        fig.tight_layout()
        fig.savefig(d / "rollout_example.png", dpi=90)
        plt.close(fig)
        files.append("rollout_example.png")
    return files


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """results.json, summary.md and per rig <rig>/table.md + PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = results["config"]
    head = [
        f"# rigfm evaluation{' (QUICK CI budget: not the documented result)' if cfg.get('quick') else ''}",
        "",
        f"Finished {results['finished_utc']} after {results['wall_s']} s. Seeds: {cfg['seeds']}; fractions: "
        f"{cfg['fractions']}; metrics on held-out test runs in units normalised by the train-split std; "
        f"multi-step = open-loop rollout of {cfg['horizon']} steps after {cfg['context']} context steps "
        f"(planned inputs given). Budget: {cfg['budget']}. Checkpoint: `{cfg['checkpoint']}`.",
        "",
    ]
    if cfg.get("angle_features", "raw") != "raw":
        head[-1:-1] = [
            f"Angle features: `{cfg['angle_features']}` -- every model sees the pendulum angle as (sin, cos) "
            "and its predictions are mapped back to the unwrapped angle; the metric is in the logged units.",
        ]
    body = []
    for rig, rr in results["rigs"].items():
        d = out / rig
        d.mkdir(parents=True, exist_ok=True)
        table = rig_table(rr)
        nt = rr["n_trajectories"]
        desc = (
            f"## {rig}\n\nData: `{rr['data']}` — {nt['train']}/{nt['val']}/{nt['test']} train/val/test "
            f"trajectories of {rr['trajectory_steps']} steps (dt {rr['dt']} s), {rr['test_windows']} test "
            f"windows; {rr['wall_s']} s.\n\n"
        )
        (d / "table.md").write_text(f"# {rig}\n\n{desc.split(chr(10), 2)[2]}{table}\n")
        files = _plots(rr, d)
        body.append(desc + table + "\n\n" + " ".join(f"![{f}]({rig}/{f})" for f in files) + "\n")
    summary = "\n".join(head) + "\n" + "\n".join(body) + "\n" + verdict_md(results["verdict"]) + "\n"
    (out / "summary.md").write_text(summary)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
