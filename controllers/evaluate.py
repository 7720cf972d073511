"""The paper experiment: the foundation model fine-tuned on 2 / 10 / 100 % of a rig's training trajectories
against a specialist transformer (same architecture, from scratch), ridge regression, an FFN and a small
transformer, over several seeds; plus the zero-shot foundation model. See docs/experiment.md.

``rigfm evaluate [--rigs cartpole,furuta] [--fractions 0.02,0.1,1.0] [--seeds 5] [--quick] [--out results/]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from controllers.collect import CollectOptions, collect
from controllers.eval_config import EvalConfig, EvaluateError, config_from_args
from controllers.eval_report import BASELINES, aggregate, write_outputs
from fm_core.angle_features import SinCosCodec, SinCosPredictor, rig_angle_codec
from fm_core.baselines import PersistencePredictor, Predictor, fit_model, zero_shot
from fm_core.metrics import channel_scale, metric_windows, prediction_errors
from fm_core.train_configs import MODELS, Budget
from hardware.dataset_build import build_dataset


def angle_codec(rig: str, td: Any) -> SinCosCodec:
    """The (sin, cos) codec of the rig's pendulum angle; ``EvaluateError`` if the data lacks that state."""
    try:
        return rig_angle_codec(rig, td)
    except ValueError as exc:
        raise EvaluateError(str(exc)) from None


# ------------------------------------------------------------------------------------------- data
def prepare_data(rig: str, cfg: EvalConfig) -> Path:
    """The rig's dataset: ``cfg.data[rig]`` if given, else collected (``controllers.collect``) and built."""
    if rig in cfg.data:
        p = Path(cfg.data[rig])
        if not p.exists():
            raise EvaluateError(f"--data for {rig}: {p} does not exist")
        return p

    work = Path(cfg.work or Path(cfg.out) / "_work")
    runs_dir = work / f"{rig}_runs"
    out = work / f"{rig}.npz"
    collect(
        CollectOptions(
            rig=rig,
            runs=cfg.runs,
            duration_s=cfg.duration_s,
            out=runs_dir,
            seed=0,
            rate_hz=cfg.collect_rate_hz,
            progress=False,
        )
    )
    build_dataset([runs_dir], out, window=cfg.window, stride=cfg.window, seed=0)
    return out


def load_splits(path: Path, cfg: EvalConfig) -> tuple[Any, Any, Any, Any]:
    """(trajectory set, train, val, test) with checks that every split exists and is long enough."""
    from fm_core.trajfile import load_trajectories, split_trajectories

    ts = load_trajectories(path)
    try:
        tr, va, te = (split_trajectories(ts, s) for s in ("train", "val", "test"))
    except ValueError as exc:
        raise EvaluateError(f"{path}: {exc}") from None
    need = cfg.context + cfg.horizon
    if ts.x.shape[1] < need:
        raise EvaluateError(
            f"{path}: trajectories have T={ts.x.shape[1]} steps; context+horizon={need} needed"
        )
    return ts, tr, va, te


# ------------------------------------------------------------------------------------------- metrics
def metric_setup(tr: Any, te: Any, cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test windows x, u, scale): the inputs of the shared metric (``fm_core.metrics``), as ``rigfm score``
    builds them from the same file: windows of context + horizon steps, train-split std in raw units."""
    xw, uw = metric_windows(te.x, te.u, cfg.context + cfg.horizon)
    return xw, uw, channel_scale(tr.x)


def score(
    pred: Predictor,
    xw: np.ndarray,
    uw: np.ndarray,
    x_std: np.ndarray,
    context: int,
    skip: int,
    batch: int = 128,
) -> dict[str, Any]:
    """One-step (teacher-forced) and multi-step (open-loop from ``context`` steps) MSE of ``pred`` on the
    windows, by :func:`fm_core.metrics.prediction_errors` (the definition ``rigfm score`` uses)."""
    one, roll = [], []
    for b in range(0, len(xw), batch):
        x, u = xw[b : b + batch], uw[b : b + batch]
        one.append(pred.one_step(x, u))
        roll.append(pred.rollout(x[:, :context], u[:, : context - 1], u[:, context - 1 : -1]))
    res = prediction_errors(np.concatenate(one), np.concatenate(roll), xw, x_std, context, skip)
    return {k: res[k] for k in ("one_step_mse", "multi_step_mse", "per_step_mse", "per_channel_multi")}


def long_context(td: Any, cfg: EvalConfig) -> int:
    """Context steps of the long-context zero-shot row: ``zero_shot_context_s`` at the data's dt, at most
    what a test trajectory holds before the horizon and what the model's positions allow."""
    want = int(round(cfg.zero_shot_context_s / float(td.dt or 0.01)))
    return max(cfg.context, min(want, td.x.shape[1] - cfg.horizon, cfg.zero_shot_max_len - cfg.horizon))


# ------------------------------------------------------------------------------------------- one rig
def evaluate_rig(rig: str, cfg: EvalConfig, position: int = 0) -> dict[str, Any]:
    """All (model, fraction, seed) combinations for one rig; returns the raw numbers."""
    import torch
    from tqdm import tqdm

    from fm_core.checkpoint import load_checkpoint

    torch.set_num_threads(max(1, cfg.threads))
    t_rig = time.time()
    path = prepare_data(rig, cfg)
    ts, tr, va, te = load_splits(path, cfg)
    codec = angle_codec(rig, tr) if cfg.angle_features == "sincos" else None
    tr_fit, va_fit = (codec.encode_data(tr), codec.encode_data(va)) if codec else (tr, va)

    def wrap(p: Predictor) -> Predictor:
        return SinCosPredictor(p, codec) if codec else p  # type: ignore[return-value]

    xw, uw, x_std = metric_setup(tr, te, cfg)
    need_ckpt = any(m in ("fm", "specialist") for m in cfg.models)
    ckpt = None
    if need_ckpt:
        if not Path(cfg.checkpoint).exists():
            raise EvaluateError(f"pretrained checkpoint {cfg.checkpoint} does not exist (--checkpoint)")
        ckpt, _ = load_checkpoint(cfg.checkpoint)
    out: dict[str, Any] = {
        "rig": rig,
        "data": str(path),
        "state_names": list(tr.state_names) or [f"x{i}" for i in range(tr.x.shape[-1])],
        "dt": tr.dt,
        "n_trajectories": {
            "train": int(tr.x.shape[0]),
            "val": int(va.x.shape[0]),
            "test": int(te.x.shape[0]),
        },
        "trajectory_steps": int(ts.x.shape[1]),
        "test_windows": int(len(xw)),
        "x_std_train": x_std.tolist(),
        "angle_features": cfg.angle_features,
        "model_state_names": list(tr_fit.state_names),
        "runs": [],
        "example": {},
    }
    ex = int(np.argmax(uw[:, :, 0].std(axis=1)))  # plotted example: the most strongly excited test window
    out["example"]["truth"] = xw[ex].tolist()
    out["example"]["context"] = cfg.context
    if "fm" in cfg.models:
        p0 = wrap(zero_shot(ckpt, tr_fit))
        s0 = score(p0, xw, uw, x_std, cfg.context, cfg.one_step_skip)
        out["runs"].append({"model": "fm0", "fraction": 0.0, "seed": 0, **s0, "info": p0.info})
        out["example"]["fm0"] = _example(p0, xw, uw, ex, cfg.context)
        # zero-shot with a long context (the FM's in-context case) against holding the last state, on the
        # test trajectories' last zero_shot_context + horizon steps
        lc = long_context(te, cfg)
        out["zero_shot_context"] = lc
        xl, ul = te.x[:, -(lc + cfg.horizon):], te.u[:, -(lc + cfg.horizon):]
        for name, pz in (("fm0_long", p0), ("persistence", PersistencePredictor())):
            sz = score(pz, xl, ul, x_std, lc, cfg.one_step_skip)
            out["runs"].append({"model": name, "fraction": 0.0, "seed": 0, **sz, "info": pz.info})
    # seed-major order: an interrupted run still has complete tables for the seeds it finished
    jobs = [(m, f, s) for s in range(cfg.seeds) for f in cfg.fractions for m in cfg.models]
    partial = Path(cfg.out) / rig / "partial.json"
    done: dict[tuple[str, float, int], dict[str, Any]] = {}
    if cfg.resume and partial.exists():
        prev = json.loads(partial.read_text())
        if prev.get("config_key") == _config_key(cfg):
            done = {(r["model"], float(r["fraction"]), int(r["seed"])): r for r in prev["runs"]}
            out["example"].update(
                {k: v for k, v in prev.get("example", {}).items() if k not in out["example"]}
            )
    partial.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(jobs, desc=f"evaluate {rig}", position=position, dynamic_ncols=True, unit="fit")
    for m, f, s in bar:
        bar.set_postfix_str(f"{m} f={f:g} seed={s}")
        if (m, float(f), s) in done:
            out["runs"].append(done[(m, float(f), s)])
            continue
        t0 = time.time()
        pred = wrap(fit_model(m, tr_fit, va_fit, s, cfg.budget, f, ckpt=ckpt))
        sc = score(pred, xw, uw, x_std, cfg.context, cfg.one_step_skip)
        info = {k: v for k, v in pred.info.items() if isinstance(v, int | float | str | type(None))}
        report = getattr(getattr(pred, "inner", pred), "rollout_report", None)
        if report is not None:  # SINDy: test windows whose rollout hit its state envelope / diverged
            info.update(report())
        out["runs"].append(
            {"model": m, "fraction": f, "seed": s, **sc, "info": info, "wall_s": round(time.time() - t0, 2),
             "val_curve": pred.info.get("history") or []}
        )
        if s == 0 and f == max(cfg.fractions):
            out["example"][m] = _example(pred, xw, uw, ex, cfg.context)
        partial.write_text(
            json.dumps({"config_key": _config_key(cfg), "runs": out["runs"], "example": out["example"]})
        )
    bar.close()
    out["wall_s"] = round(time.time() - t_rig, 1)
    return out


def _config_key(cfg: EvalConfig) -> str:
    """What must match for ``--resume`` to reuse finished fits (data, budgets, metric windows, checkpoint)."""
    keep = {
        k: v for k, v in asdict(cfg).items() if k not in ("seeds", "out", "work", "jobs", "threads", "resume")
    }
    return json.dumps(keep, sort_keys=True, default=str)


def _example(pred: Predictor, xw: np.ndarray, uw: np.ndarray, i: int, context: int) -> list[list[float]]:
    x, u = xw[i : i + 1], uw[i : i + 1]
    return pred.rollout(x[:, :context], u[:, : context - 1], u[:, context - 1 : -1])[0].tolist()


def _rig_worker(args: tuple[str, dict[str, Any], int]) -> dict[str, Any]:
    rig, cfgd, pos = args
    cfgd = dict(cfgd)
    cfgd["budget"] = Budget(**cfgd["budget"])
    return evaluate_rig(rig, EvalConfig(**cfgd), pos)


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every rig (in ``cfg.jobs`` processes), write results under ``cfg.out``; returns them."""
    bad = [m for m in cfg.models if m not in MODELS]
    if bad:
        raise EvaluateError(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    if not cfg.fractions or any(not 0 < f <= 1 for f in cfg.fractions):
        raise EvaluateError(f"--fractions must lie in (0, 1], got {cfg.fractions}")
    if cfg.seeds < 1:
        raise EvaluateError(f"--seeds must be >= 1, got {cfg.seeds}")
    t0 = time.time()
    if cfg.jobs > 1 and len(cfg.rigs) > 1:
        import multiprocessing as mp

        os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
        with mp.get_context("spawn").Pool(min(cfg.jobs, len(cfg.rigs))) as pool:
            per_rig = pool.map(_rig_worker, [(r, asdict(cfg), i) for i, r in enumerate(cfg.rigs)])
    else:
        per_rig = [evaluate_rig(r, cfg, 0) for r in cfg.rigs]
    results = {
        "config": asdict(cfg),
        "rigs": {r["rig"]: r for r in per_rig},
        "wall_s": round(time.time() - t0, 1),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results["verdict"] = verdict(results)
    write_outputs(results, Path(cfg.out))
    return results


# ------------------------------------------------------------------------------------------- verdict
def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """The experiment's questions, answered from the numbers (multi-step = open-loop rollout MSE, mean over
    seeds; ``holds`` is None where a model or fraction is missing):

    1. ``fm_lowest_every_fraction``: the fine-tuned FM has the lowest multi-step MSE of all models at every
       fraction;
    2. ``fm_data_efficient``: FM at the k-th fraction <= the best baseline at the (k+1)-th (10 % vs 100 %,
       2 % vs 10 %);
    3. ``fm_std_smaller_than_specialist``: the FM's seed-to-seed std is below the specialist's at every
       fraction;
    4. ``zero_shot_beats_persistence``: the zero-shot FM beats holding the last state on the multi-step MSE
       (long-context windows, ``fm0_long`` vs ``persistence`` rows).
    """
    rigs = list(results["rigs"])
    q1: dict[str, Any] = {}
    q2: dict[str, Any] = {}
    q3: dict[str, Any] = {}
    q4: dict[str, Any] = {}
    for rig in rigs:
        agg = aggregate(results["rigs"][rig])
        fr = sorted({f for (m, f) in agg if m == "fm"})

        def mean(m: str, f: float, agg: dict = agg) -> float:
            return agg[(m, f)]["multi_step_mse_mean"]

        def best_baseline(f: float, agg: dict = agg) -> tuple[str, float] | None:
            cands = [(m, mean(m, f)) for m in BASELINES if (m, f) in agg]
            return min(cands, key=lambda kv: kv[1]) if cands else None

        losses = []
        for f in fr:
            for m in BASELINES:
                if (m, f) in agg and not mean("fm", f) < mean(m, f):
                    losses.append({"fraction": f, "model": m, "fm_multi": mean("fm", f),
                                   "other_multi": mean(m, f)})
        if fr:
            q1[rig] = {"holds": not losses, "exceptions": losses}
        pairs = []
        all_fr = sorted({f for (m, f) in agg if m in BASELINES})
        for f in fr:
            bigger = [g for g in all_fr if g > f]
            if not bigger:
                continue
            g = min(bigger)
            bb = best_baseline(g)
            if bb is not None:
                pairs.append({"fm_fraction": f, "fm_multi": mean("fm", f), "baseline_fraction": g,
                              "baseline": bb[0], "baseline_multi": bb[1],
                              "holds": bool(mean("fm", f) <= bb[1])})
        if pairs:
            q2[rig] = {"holds": all(c["holds"] for c in pairs), "pairs": pairs}
        cmp = []
        for f in fr:
            if ("specialist", f) in agg:
                a, b = agg[("fm", f)]["multi_step_mse_std"], agg[("specialist", f)]["multi_step_mse_std"]
                cmp.append({"fraction": f, "fm_std": a, "specialist_std": b, "holds": bool(a < b)})
        if cmp:
            q3[rig] = {"holds": all(c["holds"] for c in cmp), "per_fraction": cmp}
        if ("fm0_long", 0.0) in agg and ("persistence", 0.0) in agg:
            a, b = mean("fm0_long", 0.0), mean("persistence", 0.0)
            q4[rig] = {"fm0_multi": a, "persistence_multi": b, "holds": bool(a < b),
                       "context": results["rigs"][rig].get("zero_shot_context")}

    def all_hold(d: dict[str, Any]) -> bool | None:
        return None if len(d) < len(rigs) or not d else all(v["holds"] for v in d.values())

    return {
        "fm_lowest_every_fraction": {"holds": all_hold(q1), "per_rig": q1},
        "fm_data_efficient": {"holds": all_hold(q2), "per_rig": q2},
        "fm_std_smaller_than_specialist": {"holds": all_hold(q3), "per_rig": q3},
        "zero_shot_beats_persistence": {"holds": all_hold(q4), "per_rig": q4},
    }


# ------------------------------------------------------------------------------------------- CLI
def main_evaluate(args: argparse.Namespace) -> int:
    """CLI handler of ``rigfm evaluate``: prints where the results went and the verdict."""
    try:
        cfg = config_from_args(args)
        res = run_evaluation(cfg)
    except EvaluateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"results in {cfg.out}/ (summary.md, results.json) after {res['wall_s']} s")
    for k, v in res["verdict"].items():
        print(f"  {k}: {v['holds']}")
    return 0
