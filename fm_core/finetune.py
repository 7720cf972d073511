"""Fine-tuning (or training from scratch) on trajectory files, rollouts and MSE evaluation.

Python API (used by the evaluation engineer)::

    model, history = finetune(init, train_set, val_set, FinetuneConfig(...))  # init: ckpt path/model/None
    pred = rollout(model, x_ctx (B,L,n), u_ctx (B,L-1,m), u_future (B,H,m))   # -> (B,H,n), physical units
    scores = evaluate_mse(model, test_set, context=32, horizon=32)            # normalised-unit MSEs

``train_set`` / ``val_set``: anything with ``x (K,T,n)`` and ``u (K,T,m)`` arrays (e.g. a
``fm_core.trajfile.TrajectorySet`` or ``TrajData``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fm_core.checkpoint import load_checkpoint, save_checkpoint
from fm_core.data import BatchSpec, make_batch, masked_huber_loss, windows_to_batch
from fm_core.lora import add_lora, merge_lora
from fm_core.metrics import metric_windows, prediction_errors
from fm_core.model import DynamicsFM, ModelConfig, SystemModel
from fm_core.schedule import EarlyStopping, warmup_cosine
from fm_core.train_configs import FinetuneConfig
from fm_core.trajfile import TrajData, as_trajdata, normalisation_stats, subsample


# ---------------------------------------------------------------------------------------------- data helpers
def increment_scale(td: TrajData, model: DynamicsFM) -> np.ndarray:
    """Per-channel std of the one-step increments x[t+1] - x[t] in the model's normalised units (floored)."""
    n = td.x.shape[-1]
    d = np.diff(td.x.astype(np.float64), axis=1).reshape(-1, n) / model.x_std[:n].cpu().numpy()
    return np.maximum(d.std(0), 1e-4)


def _normalised_padded(model: DynamicsFM, td: TrajData) -> tuple[np.ndarray, np.ndarray]:
    c = model.cfg
    n, m = td.x.shape[-1], td.u.shape[-1]
    xm, xs = model.x_mean[:n].cpu().numpy(), model.x_std[:n].cpu().numpy()
    um, us = model.u_mean[:m].cpu().numpy(), model.u_std[:m].cpu().numpy()
    x = np.zeros(td.x.shape[:2] + (c.n_max,), np.float32)
    u = np.zeros(td.u.shape[:2] + (c.m_max,), np.float32)
    x[..., :n] = (td.x - xm) / xs
    u[..., :m] = (td.u - um) / us
    return x, u


def _sample_windows(rng: np.random.Generator, x: np.ndarray, u: np.ndarray, b: int, length: int):
    k, t = x.shape[:2]
    ti = rng.integers(0, k, size=b)
    si = rng.integers(0, t - length + 1, size=b)
    idx = si[:, None] + np.arange(length)[None, :]
    return x[ti[:, None], idx], u[ti[:, None], idx]


def _masks(model: DynamicsFM, n: int, m: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    c = model.cfg
    sm = np.zeros((b, c.n_max), np.float32)
    im = np.zeros((b, c.m_max), np.float32)
    sm[:, :n], im[:, :m] = 1.0, 1.0
    return sm, im


def _replay_data(replay_set: Any, cfg: FinetuneConfig, n: int, m: int) -> TrajData | None:
    """Replay trajectories, checked against the training layout, when ``cfg.replay_mix`` > 0; else None."""
    if cfg.replay_mix <= 0:
        return None
    if replay_set is None:
        raise ValueError("FinetuneConfig.replay_mix > 0 needs replay trajectories (rigfm finetune --replay)")
    rp = as_trajdata(replay_set, "replay_set")
    if rp.x.shape[-1] != n or rp.u.shape[-1] != m:
        raise ValueError(f"replay_set has n={rp.x.shape[-1]}, m={rp.u.shape[-1]}; train_set has n={n}, m={m}")
    return rp


def _mix_synthetic(
    rng: np.random.Generator, b: dict[str, torch.Tensor], model: DynamicsFM, spec: BatchSpec, k: int,
) -> dict[str, torch.Tensor]:
    """Append ``k`` synthetic RKHS windows (per-sample normalised, their own increment scales) to a rig batch;
    the rig rows keep the model's ``dx_scale``."""
    from fm_core.rkhs import RKHSConfig

    c = model.cfg
    syn = make_batch(rng, spec, RKHSConfig(n_max=c.n_max, m_max=c.m_max, mechanical_fraction=0.5,
                                           angle_fraction=0.5))
    rows = b["x"].shape[0]
    out = dict(b)
    out["dx_scale"] = model.dx_scale.detach().unsqueeze(0).expand(rows, -1)
    for key in ("x", "u", "obs", "target", "hidden", "state_mask", "input_mask", "dx_scale"):
        out[key] = torch.cat([out[key], syn[key].to(out[key].dtype)], 0)
    return out


def _mask_horizon(
    rng: np.random.Generator, b: dict[str, torch.Tensor], mask_prob: float, lo_hi: tuple[int, int], lead: int,
) -> None:
    """In place: with probability ``mask_prob`` hide token positions >= L, L ~ U{lo..hi}."""
    bs, t = b["hidden"].shape
    masked = rng.random(bs) < mask_prob
    ctx = np.where(masked, rng.integers(lo_hi[0], lo_hi[1] + 1, size=bs), t)
    hidden = torch.from_numpy((np.arange(t)[None, :] >= ctx[:, None]).astype(np.float32))
    b["hidden"] = hidden
    b["obs"][:, lead:] = b["obs"][:, lead:] * (1.0 - hidden)
    b["x"] = b["x"] * b["obs"].unsqueeze(-1)
    b["ctx_len"] = torch.from_numpy(ctx.astype(np.int64))


# ---------------------------------------------------------------------------------------------- training
def _train_loss(
    model: DynamicsFM, b: dict[str, torch.Tensor], cfg: FinetuneConfig, lead: int
) -> torch.Tensor:
    """Huber loss of one batch, plus ``cfg.pushforward`` passes that see the previous pass's predictions.

    Pass k > 0 replaces every observed input state after the first token step by the (detached) prediction
    of pass k-1, so the model learns from histories that carry its own one-step errors (the pushforward
    trick), the situation of an autoregressive rollout. With ``cfg.loss_scale == "increment"`` the error is
    measured in units of ``dx_scale`` (per channel), as the window baselines measure theirs.
    """
    dx = b.get("dx_scale")
    scale = None
    if cfg.loss_scale == "increment":
        scale = model.dx_scale if dx is None else dx.unsqueeze(1)
    x_in = b["x"]
    total = 0.0
    for k in range(cfg.pushforward + 1):
        pred = model(x_in, b["u"], b["obs"], b["state_mask"], b["input_mask"], lead=lead, dx_scale=dx)
        tgt = b["target"]
        pr = pred if scale is None else pred / scale
        tg = tgt if scale is None else tgt / scale
        total = total + masked_huber_loss(pr, tg, b["state_mask"], b["hidden"], cfg.huber_delta,
                                          cfg.hidden_weight)
        if k < cfg.pushforward:
            # pred[:, j] is the prediction of input step j + lead + 1
            fed = pred.detach()[:, : x_in.shape[1] - lead - 1] * b["obs"][:, lead + 1 :, None]
            x_in = torch.cat([x_in[:, : lead + 1], fed], 1)
    return total / (cfg.pushforward + 1)


def _init_model(init: Any, cfg: FinetuneConfig) -> tuple[DynamicsFM, dict[str, Any]]:
    if init is None:
        torch.manual_seed(cfg.seed)
        return DynamicsFM(ModelConfig.from_dict(cfg.model)), {"init": None}
    if isinstance(init, DynamicsFM):
        return copy.deepcopy(init), {"init": "<model>"}
    model, meta = load_checkpoint(init)
    return model, {"init": str(init), "init_train": meta.get("train", {}), "init_n": meta.get("n"),
                   "init_m": meta.get("m")}


def keeps_normalisation(cfg: FinetuneConfig, info: dict[str, Any], n: int, m: int) -> bool:
    """Whether fine-tuning keeps the init model's normalisation and increment scale (``cfg.normalisation``:
    ``keep``; ``auto`` and an init checkpoint that was itself fine-tuned on a system of the same n and m)
    instead of refitting them to the training data."""
    if cfg.normalisation == "keep":
        if info.get("init") is None:
            raise ValueError("FinetuneConfig.normalisation='keep' needs an init model (none given: training "
                             "from scratch)")
        return True
    return (cfg.normalisation == "auto" and (info.get("init_train") or {}).get("kind") == "finetune"
            and info.get("init_n") == n and info.get("init_m") == m)


def finetune(
    init: str | Path | DynamicsFM | None, train_set: Any, val_set: Any | None,
    cfg: FinetuneConfig | None = None, progress: bool = False, replay_set: Any | None = None,
) -> tuple[DynamicsFM, list[dict[str, Any]]]:
    """Fine-tune ``init`` (checkpoint path / model) or train from scratch (``None``) on trajectories.

    Normalisation buffers are set from the (subsampled) training trajectories, unless ``cfg.normalisation``
    keeps the init's (:func:`keeps_normalisation`). With ``replay_set`` and ``cfg.replay_mix`` > 0, that
    share of every batch is drawn from the replay trajectories (same state layout). Early stopping on the
    validation loss (fixed seeded windows); the best model (by val loss) is returned in eval mode.
    Returns (model, history) where history rows are {"step", "train_loss", "val_loss", "elapsed_s"}.
    """
    cfg = cfg or FinetuneConfig()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    tr = subsample(as_trajdata(train_set, "train_set"), cfg.fraction, cfg.seed)
    va = as_trajdata(val_set, "val_set") if val_set is not None else None
    model, info = _init_model(init, cfg)
    c = model.cfg
    n, m = tr.x.shape[-1], tr.u.shape[-1]
    if n > c.n_max or m > c.m_max:
        raise ValueError(f"train_set has n={n}, m={m}; the model allows n_max={c.n_max}, m_max={c.m_max}")
    if va is not None and (va.x.shape[-1] != n or va.u.shape[-1] != m):
        raise ValueError(f"val_set has n={va.x.shape[-1]}, m={va.u.shape[-1]}; train_set has n={n}, m={m}")
    rp = _replay_data(replay_set, cfg, n, m)
    if not keeps_normalisation(cfg, info, n, m):
        model.set_normalization(**normalisation_stats(tr))
        if cfg.increment_scale:
            model.set_increment_scale(increment_scale(tr, model))
    p = c.patch
    t_len = tr.x.shape[1]
    if t_len < p + 2:
        raise ValueError(f"train_set trajectories have T={t_len} steps; need at least {p + 2}")
    seq = max(1, min(cfg.seq_len, t_len - p, c.max_len))
    if rp is not None:  # replay windows are as long as the training ones
        seq = max(1, min(seq, rp.x.shape[1] - p))
    spec = BatchSpec(batch_size=cfg.batch_size, seq_len=seq, patch=p, n_max=c.n_max, m_max=c.m_max,
                     noise_std=cfg.noise_std, mask_prob=cfg.mask_prob, min_context=1, context_mask=True)
    n_syn = int(round(cfg.synthetic_mix * cfg.batch_size))
    n_syn = min(n_syn, cfg.batch_size - 1)
    syn_spec = replace(spec, batch_size=n_syn, mask_prob=0.0, normalize=True) if n_syn else None
    if n_syn:
        spec = replace(spec, batch_size=cfg.batch_size - n_syn)
    xtr, utr = _normalised_padded(model, tr)
    sm, im = _masks(model, n, m, spec.batch_size)
    n_rep = min(int(round(cfg.replay_mix * spec.batch_size)), spec.batch_size - 1) if rp is not None else 0
    xrp, urp = _normalised_padded(model, rp) if n_rep else (None, None)

    val_batches = []
    val_roll: tuple[np.ndarray, np.ndarray] | None = None
    if va is not None and cfg.val_rollout is not None:
        vc, vh = cfg.val_rollout
        if va.x.shape[1] < vc + vh:
            raise ValueError(f"val_set has T={va.x.shape[1]} steps; val_rollout context+horizon={vc + vh}")
        val_roll = metric_windows(va.x, va.u, vc + vh)
    elif va is not None:
        xva, uva = _normalised_padded(model, va)
        vseq = max(1, min(seq, va.x.shape[1] - p))
        vspec = BatchSpec(**{**asdict(spec), "seq_len": vseq, "batch_size": cfg.val_windows,
                             "noise_std": 0.0})
        vrng = np.random.default_rng([cfg.seed, 99])
        wx, wu = _sample_windows(vrng, xva, uva, cfg.val_windows, vseq + p)
        vsm, vim = _masks(model, n, m, cfg.val_windows)
        val_batches.append(windows_to_batch(vrng, wx, wu, vsm, vim, vspec))

    if cfg.mode == "head":
        for name, prm in model.named_parameters():
            prm.requires_grad = name.startswith(("embed.", "head."))
    elif cfg.mode == "lora":
        add_lora(model, cfg.lora_rank)
    params = [q for q in model.parameters() if q.requires_grad]
    anchor = [q.detach().clone() for q in params] if cfg.l2sp > 0 else []
    opt = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay > 0
           else torch.optim.Adam(params, lr=cfg.lr))
    model.set_dropout(cfg.dropout)
    ema = None
    if cfg.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    net = model if ema is None else ema.module  # what is validated and returned
    sched = warmup_cosine(opt, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    rng = np.random.default_rng([cfg.seed, 1])

    def val_loss() -> float:
        net.eval()
        if val_roll is not None:
            vx, vu = val_roll
            vc = cfg.val_rollout[0]  # type: ignore[index]
            roll = ROLLOUT_MODES[cfg.rollout_mode]
            pr = roll(net.for_system(n, m), vx[:, :vc], vu[:, : vc - 1], vu[:, vc - 1 : -1])
            net.train()
            err = prediction_errors(None, pr.detach().numpy(), vx, net.x_std[:n].numpy(), vc)
            return err["multi_step_mse"]
        with torch.no_grad():
            tot = 0.0
            for b in val_batches:
                pred = net(b["x"], b["u"], b["obs"], b["state_mask"], b["input_mask"], lead=p - 1)
                tot += float(masked_huber_loss(pred, b["target"], b["state_mask"], b["hidden"],
                                               cfg.huber_delta, cfg.hidden_weight))
        net.train()
        return tot / len(val_batches)

    has_val = bool(val_batches) or val_roll is not None
    history: list[dict[str, Any]] = []
    stopper = EarlyStopping(net, cfg.patience, cfg.max_minutes, min_delta=1e-6,
                            initial=val_loss() if has_val else math.inf)
    history.append({"step": 0, "train_loss": None, "val_loss": stopper.best if has_val else None,
                    "elapsed_s": 0.0})
    lo_hi = None
    if cfg.mask_context is not None:
        lo_hi = (min(cfg.mask_context[0], seq), min(cfg.mask_context[1], seq))
        spec = replace(spec, mask_prob=0.0)  # masking applied below with the configured context range
    run, run_n = 0.0, 0
    t0 = time.time()
    model.train()
    pbar = None
    if progress:
        from tqdm import tqdm

        pbar = tqdm(total=cfg.steps, desc=f"finetune[{cfg.mode}]", dynamic_ncols=True)
    try:
        for step in range(1, cfg.steps + 1):
            wx, wu = _sample_windows(rng, xtr, utr, spec.batch_size - n_rep, seq + p)
            if n_rep:
                rx, ru = _sample_windows(rng, xrp, urp, n_rep, seq + p)
                wx, wu = np.concatenate([wx, rx]), np.concatenate([wu, ru])
            b = windows_to_batch(rng, wx, wu, sm, im, spec)
            if lo_hi is not None:
                _mask_horizon(rng, b, cfg.mask_prob, lo_hi, p - 1)
            if n_syn:
                b = _mix_synthetic(rng, b, model, syn_spec, n_syn)
            loss = _train_loss(model, b, cfg, p - 1)
            if anchor:
                loss = loss + cfg.l2sp * sum(((q - a) ** 2).sum() for q, a in zip(params, anchor,
                                                                                    strict=True))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite fine-tuning loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            run += float(loss.detach())
            run_n += 1
            if pbar is not None:
                pbar.update(1)
            if step % cfg.val_every == 0 or step == cfg.steps:
                row = {"step": step, "train_loss": run / run_n, "val_loss": None,
                       "elapsed_s": round(time.time() - t0, 3)}
                run, run_n = 0.0, 0
                if has_val:
                    row["val_loss"] = v = val_loss()
                    stop = stopper.update(step, v)
                else:
                    stop = stopper.timed_out()
                history.append(row)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{row['train_loss']:.4g}", val=f"{row['val_loss']}")
                if stop:
                    break
    finally:
        if pbar is not None:
            pbar.close()
    if has_val:
        stopper.restore_best()
    if ema is not None:
        model.load_state_dict(net.state_dict())
    if cfg.mode == "lora":
        merge_lora(model)
    for prm in model.parameters():
        prm.requires_grad = True
    model.eval()
    model.set_dropout(0.0)
    model.rollout_mode = cfg.rollout_mode  # type: ignore[attr-defined]
    model.finetune_info = {  # type: ignore[attr-defined]
        "best_step": stopper.best_step if has_val else history[-1]["step"],
        "best_val_loss": stopper.best if has_val else None, "steps_run": history[-1]["step"],
        "n_train_trajectories": int(tr.x.shape[0]), "replay_rows_per_batch": n_rep,
        "stop_reason": stopper.stop_reason,
        "train_s": round(time.time() - t0, 3), "n": n, "m": m,
    }
    return model, history


# ---------------------------------------------------------------------------------------------- inference
def _system(model: DynamicsFM | SystemModel, n: int, m: int) -> SystemModel:
    if isinstance(model, SystemModel):
        if (model.n, model.m) != (n, m):
            raise ValueError(f"model is fixed to n={model.n}, m={model.m}; data has n={n}, m={m}")
        return model
    return model.for_system(n, m)


def _t(a: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a, dtype=np.float32))
    return t


@torch.no_grad()
def rollout(model: DynamicsFM | SystemModel, x_ctx: Any, u_ctx: Any, u_future: Any) -> torch.Tensor:
    """Masked open-loop rollout in ONE forward pass (physical units).

    x_ctx (B,L,n): observed states x[0..L-1]; u_ctx (B,L-1,m): inputs u[0..L-2] between them;
    u_future (B,H,m): planned inputs u[L-1..L+H-2] (u_future[j] is applied before x[L+j]).
    Returns (B,H,n): predictions of x[L..L+H-1]. Unbatched (L,n)/(L-1,m)/(H,m) inputs give (H,n).
    """
    x_ctx, u_ctx, u_future = _t(x_ctx), _t(u_ctx), _t(u_future)
    squeeze = x_ctx.dim() == 2
    if squeeze:
        x_ctx, u_ctx, u_future = x_ctx[None], u_ctx[None], u_future[None]
    if x_ctx.dim() != 3 or u_ctx.dim() != 3 or u_future.dim() != 3:
        raise ValueError("rollout: x_ctx, u_ctx, u_future must all be batched (B,·,·) or all unbatched")
    b, L, n = x_ctx.shape
    m = u_future.shape[-1]
    h = u_future.shape[1]
    if L < 1 or h < 1:
        raise ValueError(f"rollout: need L >= 1 context steps and H >= 1 planned inputs, got L={L}, H={h}")
    if tuple(u_ctx.shape) != (b, L - 1, m):
        raise ValueError(f"rollout: u_ctx must be (B,L-1,m)=({b},{L - 1},{m}), got {tuple(u_ctx.shape)}")
    if u_future.shape[0] != b:
        raise ValueError(f"rollout: u_future batch {u_future.shape[0]} != x_ctx batch {b}")
    sys = _system(model, n, m)
    total = L + h - 1
    x = torch.cat([x_ctx, torch.zeros(b, h - 1, n)], 1)
    u = torch.cat([u_ctx, u_future], 1)
    obs = torch.zeros(b, total)
    obs[:, :L] = 1.0
    pred = sys(x, u, obs)[:, L - 1 :]
    return pred[0] if squeeze else pred


@torch.no_grad()
def rollout_ar(model: DynamicsFM | SystemModel, x_ctx: Any, u_ctx: Any, u_future: Any) -> torch.Tensor:
    """Autoregressive open-loop rollout (physical units): every prediction is fed back as the next observed
    state, one KV-cached token per step. Same arguments and result as :func:`rollout`."""
    x_ctx, u_ctx, u_future = _t(x_ctx), _t(u_ctx), _t(u_future)
    squeeze = x_ctx.dim() == 2
    if squeeze:
        x_ctx, u_ctx, u_future = x_ctx[None], u_ctx[None], u_future[None]
    b, L, n = x_ctx.shape
    m, h = u_future.shape[-1], u_future.shape[1]
    if L < 1 or h < 1 or tuple(u_ctx.shape) != (b, L - 1, m) or u_future.shape[0] != b:
        raise ValueError(f"rollout_ar: x_ctx (B,L,n), u_ctx (B,L-1,m), u_future (B,H,m) expected, got "
                         f"{tuple(x_ctx.shape)}, {tuple(u_ctx.shape)}, {tuple(u_future.shape)}")
    sys = _system(model, n, m)
    core, p = sys.core, sys.patch
    if L + h - 1 > core.cfg.max_len:
        raise ValueError(f"rollout_ar: context + horizon - 1 = {L + h - 1} exceeds "
                         f"max_len={core.cfg.max_len}")
    u_all = torch.cat([u_ctx, u_future], 1)  # u_all[t] drives x[t] -> x[t+1]
    xn, un = sys._norm(x_ctx, u_all)
    ones = torch.ones(b, L)
    pred, cache = core.forward_with_cache(xn, un[:, :L], ones, sys.state_mask, sys.input_mask)
    xs = [xn[:, i] for i in range(L)] + [pred[:, -1]]
    out = [pred[:, -1]]
    obs_win = torch.ones(b, p)
    for j in range(1, h):
        t = L - 1 + j  # the step whose state was just predicted; its token predicts x[t+1]
        lo = t - p + 1
        xw = torch.stack([xs[i] if i >= 0 else torch.zeros_like(xs[0]) for i in range(lo, t + 1)], 1)
        uw = torch.stack([un[:, i] if i >= 0 else torch.zeros_like(un[:, 0]) for i in range(lo, t + 1)], 1)
        nxt, cache = core.step(xw, uw, obs_win, sys.state_mask, sys.input_mask, cache)
        xs.append(nxt[:, 0])
        out.append(nxt[:, 0])
    res = sys._denorm(torch.stack(out, 1))
    return res[0] if squeeze else res


ROLLOUT_MODES = {"masked": rollout, "ar": rollout_ar}


@torch.no_grad()
def evaluate_mse(
    model: DynamicsFM | SystemModel, data: Any, context: int = 32, horizon: int = 32, max_windows: int = 4096,
) -> dict[str, Any]:
    """:func:`fm_core.metrics.prediction_errors` in the model's normalised units (its x_std as the scale) over
    the metric's windows of ``context + horizon`` steps of ``data`` (at most ``max_windows``):
    ``one_step_mse`` (teacher-forced x[t+1] over the whole window), ``multi_step_mse`` (open-loop rollout of
    ``horizon`` steps from ``context`` observed ones), ``per_step_mse`` and that function's other keys."""
    td = as_trajdata(data, "data")
    core = model.core if isinstance(model, SystemModel) else model
    n, m = td.x.shape[-1], td.u.shape[-1]
    sys = _system(model, n, m)
    length = context + horizon
    if context < 1 or horizon < 1:
        raise ValueError(f"context and horizon must be >= 1, got {context}, {horizon}")
    if td.x.shape[1] < length:
        raise ValueError(f"trajectories have T={td.x.shape[1]} steps; context+horizon={length} needed")
    if length > core.cfg.max_len:
        raise ValueError(f"context+horizon={length} exceeds model max_len={core.cfg.max_len}")
    xs, us = (a[:max_windows] for a in metric_windows(td.x, td.u, length))
    x, u = _t(xs), _t(us)
    with torch.no_grad():
        one = sys(x[:, :-1], u[:, :-1], torch.ones(x.shape[0], length - 1))
        roll_fn = ROLLOUT_MODES[getattr(core, "rollout_mode", "masked")]
        roll = roll_fn(sys, x[:, :context], u[:, : context - 1], u[:, context - 1 : length - 1])
    err = prediction_errors(one.numpy(), roll.numpy(), xs, core.x_std[:n].numpy(), context, one_step_skip=0)
    return {**err, "context": context, "horizon": horizon}


def save_finetuned(
    path: str | Path, model: DynamicsFM, train: TrajData, history: list[dict[str, Any]], cfg: FinetuneConfig,
    extra: dict[str, Any] | None = None, angle_channels: list[int] | None = None,
    raw_state_names: list[str] | None = None,
) -> Path:
    """Save a fine-tuned model with meta (n, m, names, dt, rig, normalisation, training summary).

    A model trained on (sin, cos) angles (``train`` already encoded) records the raw indices of those angles
    (``angle_channels``) and the raw state names; ``rigfm export`` then serves raw states (docs/predictor.md).
    """
    n, m = train.x.shape[-1], train.u.shape[-1]
    meta = {"n": n, "m": m, "state_names": train.state_names, "input_names": train.input_names,
            "dt": train.dt, "rig": train.rig or "unknown",
            "train": {"kind": "finetune", "config": asdict(cfg), "history": history,
                      **getattr(model, "finetune_info", {}), **(extra or {})}}
    if angle_channels:
        meta["angle_channels"] = [int(c) for c in angle_channels]
        meta["raw_state_names"] = [str(v) for v in raw_state_names or []]
    return save_checkpoint(path, model, meta)
