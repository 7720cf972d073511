"""Baseline dynamics predictors and a common predictor interface for the evaluation.

Every model is fitted with ``fit_<name>(train, val, seed, budget, fraction)`` and returns a
:class:`Predictor`:

* ``one_step(x (B,T,n), u (B,T,m)) -> (B,T-1,n)``: teacher-forced predictions of ``x[1..T-1]`` (each from the
  true history up to t and ``u[t]``).
* ``rollout(x_ctx (B,L,n), u_ctx (B,L-1,m), u_future (B,H,m)) -> (B,H,n)``: open-loop prediction of
  ``x[L..L+H-1]`` given the planned inputs (same semantics as :func:`fm_core.finetune.rollout`).

All in physical units. Models:

* ``linreg``: ridge regression of ``x[t+1] - x[t]`` on the last ``w`` steps of ``[x, u]`` (which include
  ``u[t]``), features normalised with the training subset's statistics; ridge strength picked on val from
  a small grid (closed form, no optimiser steps). Multi-step: recursive rollout.
* ``ffn``: an MLP (2 hidden layers of 128, SiLU) on the same window features, Adam, early stopping on val.
* ``small_tf``: ``DynamicsFM`` with a tiny config (d_model 32, 2 layers) trained from scratch with
  :func:`fm_core.finetune.finetune` (masked multi-step objective); rollout in one masked forward pass.
* ``specialist``: ``DynamicsFM`` with the foundation model's architecture, trained from scratch the same way.
* ``sindy``: SINDy with control (pysindy, :mod:`fm_core.sindy`): sparse polynomial x (sin, cos of the angles)
  model of ``x[t+1] - x[t]``, sparsity threshold picked on val; recursive rollout, divergence reported as inf.
* ``fm``: the pretrained foundation model fine-tuned with :func:`finetune` (``fm0``: zero-shot, no training).

Window models see the subset picked by :func:`fm_core.finetune.subsample` with the same fraction and seed
as the transformers, so every model of one (fraction, seed) trains on the same trajectories.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fm_core.finetune import ROLLOUT_MODES, finetune
from fm_core.metrics import metric_windows, prediction_errors
from fm_core.model import DynamicsFM, SystemModel
from fm_core.schedule import EarlyStopping
from fm_core.train_configs import MODELS, Budget, finetune_config
from fm_core.trajfile import TrajData, as_trajdata, normalisation_stats, subsample

SMALL_TF = {
    "n_max": 6,
    "m_max": 2,
    "patch": 2,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "d_ff": 64,
    "max_len": 256,
}


class Predictor:
    """Common interface; subclasses implement ``one_step`` and ``rollout`` in physical units."""

    name = "predictor"
    info: dict[str, Any]

    def one_step(self, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def rollout(self, x_ctx: np.ndarray, u_ctx: np.ndarray, u_future: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class PersistencePredictor(Predictor):
    """Hold the last observed state: x[t+1] = x[t]; a rollout repeats the current state."""

    name = "persistence"

    def __init__(self) -> None:
        self.info = {"params": 0, "train_s": 0.0}

    def one_step(self, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        return np.asarray(x[:, :-1], np.float32)

    def rollout(self, x_ctx: np.ndarray, u_ctx: np.ndarray, u_future: np.ndarray) -> np.ndarray:
        last = np.asarray(x_ctx[:, -1:], np.float32)
        return np.repeat(last, u_future.shape[1], axis=1)


# ------------------------------------------------------------------------------------ transformers
class TransformerPredictor(Predictor):
    """A ``DynamicsFM`` fixed to (n, m): causal one-step pass and one-pass masked rollout."""

    def __init__(
        self, name: str, model: DynamicsFM, n: int, m: int, info: dict[str, Any] | None = None
    ) -> None:
        self.name = name
        self.model = model.eval()
        self.sys: SystemModel = model.for_system(n, m)
        self.info = info or {}

    @torch.no_grad()
    def one_step(self, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        xt = torch.as_tensor(np.asarray(x[:, :-1], np.float32))
        ut = torch.as_tensor(np.asarray(u[:, :-1], np.float32))
        return self.sys(xt, ut, torch.ones(xt.shape[:2])).numpy()

    def rollout(self, x_ctx: np.ndarray, u_ctx: np.ndarray, u_future: np.ndarray) -> np.ndarray:
        roll = ROLLOUT_MODES[getattr(self.model, "rollout_mode", "masked")]
        return roll(self.sys, x_ctx, u_ctx, u_future).numpy()


def _tf_info(model: DynamicsFM, history: list[dict[str, Any]]) -> dict[str, Any]:
    fi = dict(getattr(model, "finetune_info", {}))
    fi["params"] = int(sum(p.numel() for p in model.parameters()))
    fi["train_s"] = history[-1]["elapsed_s"] if history else 0.0
    fi["history"] = [{"step": r["step"], "val_loss": r["val_loss"], "elapsed_s": r["elapsed_s"]}
                     for r in history]
    return fi


def fit_transformer(
    name: str,
    init: Any,
    train: Any,
    val: Any,
    seed: int,
    budget: Budget,
    fraction: float,
    model_cfg: dict[str, Any] | None = None,
) -> TransformerPredictor:
    """Fine-tune ``init`` (checkpoint / model) or train ``model_cfg`` from scratch (``init=None``)."""
    lr = budget.lr_scratch if init is None else budget.lr_finetune
    cfg = finetune_config(budget, fraction, seed, lr, model_cfg, init is not None)
    model, hist = finetune(init, train, val, cfg)
    tr = as_trajdata(train)
    return TransformerPredictor(name, model, tr.x.shape[-1], tr.u.shape[-1], _tf_info(model, hist))


def zero_shot(ckpt: Any, train: Any) -> TransformerPredictor:
    """The pretrained model without training; normalisation from the (whole) training split only."""
    from fm_core.checkpoint import load_checkpoint, pretrain_recipe
    from fm_core.finetune import increment_scale

    if isinstance(ckpt, DynamicsFM):
        model = copy.deepcopy(ckpt)
        recipe = getattr(ckpt, "recipe", {})
    else:
        model, meta = load_checkpoint(ckpt)
        recipe = pretrain_recipe(meta)
    tr = as_trajdata(train)
    model.set_normalization(**normalisation_stats(tr))
    if recipe.get("normalize"):  # pretrained per-sample normalised: the head predicts increments in their std
        model.set_increment_scale(increment_scale(tr, model))
    return TransformerPredictor(
        "fm0",
        model,
        tr.x.shape[-1],
        tr.u.shape[-1],
        {"params": int(sum(p.numel() for p in model.parameters())), "train_s": 0.0},
    )


# ------------------------------------------------------------------------------------ window models
class _Norm:
    def __init__(self, td: TrajData) -> None:
        stats = normalisation_stats(td)
        self.xm, self.xs = np.array(stats["x_mean"]), np.array(stats["x_std"])
        self.um, self.us = np.array(stats["u_mean"]), np.array(stats["u_std"])
        d = np.diff(td.x.astype(np.float64), axis=1).reshape(-1, td.x.shape[-1])
        self.dm, self.ds = d.mean(0), np.maximum(d.std(0), 1e-9)


def _features(xn: np.ndarray, un: np.ndarray, w: int) -> np.ndarray:
    """(B,T,n),(B,T,m) normalised -> (B,T,w*(n+m)+1): last w steps of [x,u] (front edge-padded) + bias."""
    z = np.concatenate([xn, un], -1)
    pad = np.concatenate([np.repeat(z[:, :1], w - 1, axis=1), z], 1) if w > 1 else z
    t = z.shape[1]
    cols = [pad[:, k : k + t] for k in range(w)]
    return np.concatenate(cols + [np.ones(z.shape[:2] + (1,))], -1)


class WindowPredictor(Predictor):
    """x[t+1] = x[t] + g(last w steps of [x,u]); recursive multi-step rollout."""

    def __init__(self, name: str, norm: _Norm, w: int, g: Any, info: dict[str, Any]) -> None:
        self.name, self.norm, self.w, self.g, self.info = name, norm, w, g, info

    def _delta(self, feats: np.ndarray) -> np.ndarray:
        return self.g(feats) * self.norm.ds + self.norm.dm

    def one_step(self, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        nm = self.norm
        f = _features((x - nm.xm) / nm.xs, (u - nm.um) / nm.us, self.w)[:, :-1]
        return (x[:, :-1] + self._delta(f)).astype(np.float32)

    def rollout(self, x_ctx: np.ndarray, u_ctx: np.ndarray, u_future: np.ndarray) -> np.ndarray:
        nm, w = self.norm, self.w
        xs = [np.asarray(x_ctx[:, i], np.float64) for i in range(x_ctx.shape[1])]
        us = [np.asarray(u_ctx[:, i], np.float64) for i in range(u_ctx.shape[1])]
        out = []
        for j in range(u_future.shape[1]):
            us.append(np.asarray(u_future[:, j], np.float64))
            xw = np.stack(xs[-w:], 1)
            uw = np.stack(us[-w:], 1)
            if xw.shape[1] < w:  # short context: edge-pad like the training features
                xw = np.concatenate([np.repeat(xw[:, :1], w - xw.shape[1], 1), xw], 1)
                uw = np.concatenate([np.repeat(uw[:, :1], w - uw.shape[1], 1), uw], 1)
            f = _features((xw - nm.xm) / nm.xs, (uw - nm.um) / nm.us, w)[:, -1:]
            nxt = xs[-1] + self._delta(f)[:, 0]
            xs.append(nxt)
            out.append(nxt)
        return np.stack(out, 1).astype(np.float32)


def _val_rollout_mse(pred: WindowPredictor, va: TrajData, ctx_hor: tuple[int, int]) -> float:
    """Open-loop rollout MSE on the val windows (units: the training subset's std), inf if it diverges."""
    c, h = ctx_hor
    if va.x.shape[1] < c + h:
        raise ValueError(f"val split has T={va.x.shape[1]} steps; val_rollout context+horizon={c + h}")
    vx, vu = metric_windows(va.x, va.u, c + h)
    with np.errstate(all="ignore"):
        r = pred.rollout(vx[:, :c], vu[:, : c - 1], vu[:, c - 1 : -1])
    return prediction_errors(None, r, vx, pred.norm.xs, c)["multi_step_mse"]


def _xy(td: TrajData, norm: _Norm, w: int) -> tuple[np.ndarray, np.ndarray]:
    f = _features((td.x - norm.xm) / norm.xs, (td.u - norm.um) / norm.us, w)[:, :-1]
    y = (np.diff(td.x.astype(np.float64), axis=1) - norm.dm) / norm.ds
    return f.reshape(-1, f.shape[-1]), y.reshape(-1, y.shape[-1])


def _linear(coef: np.ndarray) -> Any:
    return lambda f: f @ coef


def fit_linreg(train: Any, val: Any, seed: int, budget: Budget, fraction: float) -> WindowPredictor:
    """Ridge regression on window features; ridge strength picked on val (one-step loss, or the open-loop
    rollout MSE when ``budget.val_rollout`` is set)."""
    tr = subsample(as_trajdata(train, "train"), fraction, seed)
    va = as_trajdata(val, "val")
    norm = _Norm(tr)
    w = budget.window
    a, y = _xy(tr, norm, w)
    av, yv = _xy(va, norm, w)
    ata, aty = a.T @ a, a.T @ y
    best = None
    for lam in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0):
        reg = lam * len(a) * np.eye(ata.shape[0])
        reg[-1, -1] = 0.0  # do not shrink the bias
        coef = np.linalg.solve(ata + reg, aty)
        if budget.val_rollout is not None:
            cand = WindowPredictor("linreg", norm, w, _linear(coef), {})
            loss = _val_rollout_mse(cand, va, budget.val_rollout)
        else:
            loss = float(np.mean((av @ coef - yv) ** 2))
        if best is None or loss < best[0]:
            best = (loss, lam, coef)
    assert best is not None
    coef = best[2]
    return WindowPredictor(
        "linreg",
        norm,
        w,
        _linear(coef),
        {
            "ridge": best[1],
            "val_loss": best[0],
            "params": int(coef.size),
            "train_s": 0.0,
            "n_train_trajectories": int(tr.x.shape[0]),
        },
    )


def fit_ffn(
    train: Any, val: Any, seed: int, budget: Budget, fraction: float, hidden: int = 128
) -> WindowPredictor:
    """MLP on window features, Adam with the shared budget rule, early stopping on val (one-step loss, or
    the open-loop rollout MSE when ``budget.val_rollout`` is set)."""
    import time

    tr = subsample(as_trajdata(train, "train"), fraction, seed)
    va = as_trajdata(val, "val")
    norm = _Norm(tr)
    w = budget.window
    a, y = (torch.as_tensor(v, dtype=torch.float32) for v in _xy(tr, norm, w))
    av, yv = (torch.as_tensor(v, dtype=torch.float32) for v in _xy(va, norm, w))
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(a.shape[1], hidden),
        torch.nn.SiLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.SiLU(),
        torch.nn.Linear(hidden, y.shape[1]),
    )
    opt = torch.optim.Adam(net.parameters(), lr=budget.lr_scratch)

    def g(f: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.as_tensor(f, dtype=torch.float32)).double().numpy()

    gen = torch.Generator().manual_seed(seed)
    bs = (
        budget.batch_size * budget.seq_len
    )  # same number of predicted transitions per step as the transformers
    t0 = time.time()
    stopper = EarlyStopping(net, budget.patience, budget.max_minutes, min_delta=1e-7)
    history: list[dict[str, Any]] = []
    for step in range(1, budget.steps + 1):
        idx = torch.randint(0, a.shape[0], (min(bs, a.shape[0]),), generator=gen)
        loss = torch.mean((net(a[idx]) - y[idx]) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % budget.val_every == 0 or step == budget.steps:
            net.eval()
            if budget.val_rollout is not None:
                v = _val_rollout_mse(WindowPredictor("ffn", norm, w, g, {}), va, budget.val_rollout)
            else:
                with torch.no_grad():
                    v = float(torch.mean((net(av) - yv) ** 2))
            net.train()
            history.append({"step": step, "val_loss": v, "elapsed_s": round(time.time() - t0, 3)})
            if stopper.update(step, v):
                break
    stopper.restore_best()
    net.eval()

    return WindowPredictor(
        "ffn",
        norm,
        w,
        g,
        {
            "best_step": stopper.best_step,
            "steps_run": step,
            "stop_reason": stopper.stop_reason,
            "history": history,
            "val_loss": stopper.best,
            "params": int(sum(p.numel() for p in net.parameters())),
            "train_s": round(time.time() - t0, 3),
            "n_train_trajectories": int(tr.x.shape[0]),
        },
    )


AUTO_FT_MODES = ("full", "head")  # what Budget.ft_mode = "auto" chooses between


def fit_fm(ckpt: Any, train: Any, val: Any, seed: int, budget: Budget, fraction: float) -> Predictor:
    """Fine-tune the pretrained FM with ``budget.ft_mode``; "auto" fits each of :data:`AUTO_FT_MODES` and
    keeps the one with the lowest best val loss (info: ``ft_mode``, ``val_by_mode``, ``train_s`` of both)."""
    if budget.ft_mode != "auto":
        return fit_transformer("fm", ckpt, train, val, seed, budget, fraction)
    fits = {m: fit_transformer("fm", ckpt, train, val, seed, replace(budget, ft_mode=m), fraction)
            for m in AUTO_FT_MODES}
    val_by_mode = {m: float(p.info["best_val_loss"]) for m, p in fits.items()}
    mode = min(val_by_mode, key=lambda m: val_by_mode[m])
    best = fits[mode]
    best.info.update(ft_mode=mode, val_by_mode=val_by_mode,
                     train_s=round(sum(float(p.info["train_s"]) for p in fits.values()), 3))
    return best


def fit_model(
    name: str, train: Any, val: Any, seed: int, budget: Budget, fraction: float, ckpt: Any = None
) -> Predictor:
    """Fit one of :data:`MODELS` (``fm`` needs ``ckpt``: path or loaded pretrained DynamicsFM)."""
    if name == "linreg":
        return fit_linreg(train, val, seed, budget, fraction)
    if name == "ffn":
        return fit_ffn(train, val, seed, budget, fraction)
    if name == "small_tf":
        return fit_transformer(name, None, train, val, seed, budget, fraction, SMALL_TF)
    if name == "sindy":
        from fm_core.sindy import fit_sindy  # pysindy is imported only when SINDy is fitted

        return fit_sindy(train, val, seed, budget, fraction)  # type: ignore[return-value]
    if ckpt is None:
        raise ValueError(f"model {name!r} needs the pretrained checkpoint (ckpt=...)")
    if name == "fm":
        return fit_fm(ckpt, train, val, seed, budget, fraction)
    if name == "specialist":
        cfg = ckpt.cfg if isinstance(ckpt, DynamicsFM) else _ckpt_model_cfg(ckpt)
        return fit_transformer(name, None, train, val, seed, budget, fraction, _cfg_dict(cfg))
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def _ckpt_model_cfg(ckpt: Any) -> Any:
    from fm_core.checkpoint import load_checkpoint

    return load_checkpoint(ckpt)[0].cfg


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(cfg) if is_dataclass(cfg) else dict(cfg)
