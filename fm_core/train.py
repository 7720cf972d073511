"""Synthetic pretraining of DynamicsFM (single process or torch.distributed DDP under torchrun).

    python -m fm_core.train --config fm_core/configs/pretrain_default.toml --out runs/pretrain \
        [--set section.key=value ...] [--resume]
    torchrun --nproc_per_node=2 -m fm_core.train --config ... --out ...

Outputs in ``--out``: ``last.pt`` (periodic, with optimizer state for ``--resume``), ``final.pt`` (model
only), ``metrics.csv``, ``metrics.json``, ``loss_curve.png``, ``config.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from fm_core.checkpoint import read_checkpoint, save_checkpoint
from fm_core.cli_types import add_options, add_set_option
from fm_core.config import FullConfig, load_config
from fm_core.data import (
    BatchSpec,
    Generator,
    SyntheticStream,
    batch_to,
    make_loader,
    masked_huber_loss,
)
from fm_core.model import DynamicsFM, ModelConfig, count_parameters
from fm_core.schedule import warmup_cosine
from fm_core.train_configs import PretrainOptions
from fm_core.train_report import plot_loss_curve, write_metrics


def param_hash(model: torch.nn.Module) -> str:
    """sha256 over all parameters and buffers (float32 bytes), for cross-rank / determinism checks."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _dist_setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    rank = dist.get_rank()
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def batch_spec(cfg: FullConfig, mc: ModelConfig) -> BatchSpec:
    d = cfg.data
    return BatchSpec(batch_size=d.batch_size, seq_len=d.seq_len, patch=mc.patch, n_max=mc.n_max,
                     m_max=mc.m_max, noise_std=d.noise_std, mask_prob=d.mask_prob, min_context=d.min_context,
                     context_mask=d.context_mask, normalize=d.normalize)


def rkhs_config_dict(cfg: FullConfig, mc: ModelConfig) -> dict[str, Any]:
    """The [rkhs] section with n_max/m_max filled from the model config (so shapes always agree)."""
    r = dict(cfg.rkhs)
    r.setdefault("n_max", mc.n_max)
    r.setdefault("m_max", mc.m_max)
    return r


def batch_loss(
    model: torch.nn.Module, b: dict[str, torch.Tensor], cfg: FullConfig, lead: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one training batch -> (prediction, weighted Huber loss)."""
    if lead is None:
        lead = model.cfg.patch - 1
    pred = model(b["x"], b["u"], b["obs"], b["state_mask"], b["input_mask"], lead=lead,
                 dx_scale=b.get("dx_scale"))
    t = cfg.train
    loss = masked_huber_loss(pred, b["target"], b["state_mask"], b["hidden"], t.huber_delta, t.hidden_weight)
    return pred, loss


def lyapunov_penalty(model: DynamicsFM, b: dict[str, torch.Tensor], t: Any, step: int) -> torch.Tensor:
    """The PDEDER term (fm_core.lyapunov.latent_lyapunov) with the [train] lyapunov_* settings; its tangent
    is drawn from (seed, step), so a resumed run draws the same ones."""
    from fm_core.lyapunov import latent_lyapunov

    gen = torch.Generator().manual_seed(int(t.seed) * 1_000_003 + int(step))
    return latent_lyapunov(model, b, t.lyapunov_steps, t.lyapunov_context, t.lyapunov_samples,
                           t.lyapunov_burn_in, generator=gen)


@torch.no_grad()
def validate(model: DynamicsFM, batches: list[dict[str, torch.Tensor]], cfg: FullConfig) -> dict[str, float]:
    """Loss (as in training) and plain MSE on context / hidden positions over fixed validation batches."""
    was = model.training
    model.eval()
    loss = ctx_se = ctx_n = hid_se = hid_n = 0.0
    for b in batches:
        pred, lb = batch_loss(model, b, cfg)
        loss += float(lb)
        se = ((pred - b["target"]) ** 2) * b["state_mask"].unsqueeze(1)
        nch = b["state_mask"].sum(-1, keepdim=True)  # (B,1)
        hid = b["hidden"]
        ctx_se += float((se.sum(-1) * (1 - hid)).sum())
        ctx_n += float(((1 - hid) * nch).sum())
        hid_se += float((se.sum(-1) * hid).sum())
        hid_n += float((hid * nch).sum())
    model.train(was)
    k = max(1, len(batches))
    return {"val_loss": loss / k, "val_ctx_mse": ctx_se / max(ctx_n, 1.0),
            "val_hidden_mse": hid_se / max(hid_n, 1.0) if hid_n else float("nan")}


class _StopFlag:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:  # signal handler
        self.requested = True


def _warm_start(model: DynamicsFM, mc: ModelConfig, path: str) -> None:
    """Load checkpoint ``path``'s weights into ``model``; named errors for a missing file / other shape."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"[train] init: checkpoint not found: {p}")
    ck = read_checkpoint(p)
    theirs, ours = asdict(ModelConfig.from_dict(ck.get("model_config", {}))), asdict(mc)
    if theirs != ours:
        diff = sorted(k for k, v in ours.items() if theirs.get(k) != v)
        raise ValueError(f"[train] init: {p} has another [model] ({', '.join(diff)} differ)")
    res = model.load_state_dict(ck["state_dict"], strict=False)  # checkpoints before dx_scale lack only it
    bad = [k for k in res.missing_keys if not k.endswith("dx_scale")] + list(res.unexpected_keys)
    if bad:
        raise ValueError(f"[train] init: {p} does not fit the model: {', '.join(bad[:5])}")


def pretrain(
    cfg: FullConfig, out: str | Path, resume: bool = False, generator: Generator | None = None,
    progress: bool = True, config_source: str = "<dict>",
) -> dict[str, Any]:
    """Run (or resume) pretraining; returns the summary dict (also written to ``out/metrics.json``)."""
    out = Path(out)
    rank, world, device = _dist_setup()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    mc = ModelConfig.from_dict(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = DynamicsFM(mc).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    t = cfg.train
    sched = warmup_cosine(opt, t.warmup_steps, t.steps, t.min_lr_ratio)
    step, history, elapsed0 = 0, [], 0.0
    last_path = out / "last.pt"
    if t.init and not (resume and last_path.is_file()):
        _warm_start(model, mc, t.init)
    if resume and last_path.is_file():
        ck = read_checkpoint(last_path)
        ts = ck.get("train_state")
        if not isinstance(ts, dict):
            raise ValueError(f"{last_path}: no 'train_state' to resume from")
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        step, history, elapsed0 = int(ts["step"]), list(ts["history"]), float(ts["elapsed_s"])
        if rank == 0:
            print(f"resumed from {last_path} at step {step}", file=sys.stderr)
    elif resume and rank == 0:
        print(f"--resume: no {last_path}, starting fresh", file=sys.stderr)
    ddp = DDP(model) if world > 1 else model
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(
            {"config": cfg.to_dict(), "source": config_source, "world_size": world}, indent=1))

    spec = batch_spec(cfg, mc)
    rk = rkhs_config_dict(cfg, mc)
    ds = SyntheticStream(spec, rk, seed=t.seed, rank=rank, start_batch=step, generator=generator)
    val_ds = SyntheticStream(spec, rk, seed=t.seed, rank=0, generator=generator, stream=1)
    n_val = cfg.data.val_batches if rank == 0 else 0
    val_batches = [batch_to(val_ds.batch(i), device) for i in range(n_val)]
    loader = make_loader(ds, cfg.data.num_workers)

    stop = _StopFlag()
    old_handler = signal.signal(signal.SIGTERM, stop) if rank == 0 or world > 1 else None
    pbar = None
    if rank == 0 and progress:
        from tqdm import tqdm

        pbar = tqdm(total=t.steps, initial=step, desc="pretrain", dynamic_ncols=True, file=sys.stderr)
    lead = mc.patch - 1  # history steps in every training window
    step_start = step
    t0 = time.time()
    run_loss, run_n, run_lyap = 0.0, 0, 0.0

    def elapsed() -> float:
        return elapsed0 + time.time() - t0

    def save(final: bool = False) -> None:
        if rank != 0:
            return
        samples = step * spec.batch_size * world
        train_meta = {"steps": step, "samples": samples, "world_size": world, "elapsed_s": elapsed(),
                      "seed": t.seed, "config_source": config_source,
                      # what fine-tuning and zero-shot use to match pretraining (fm_core.finetune "auto")
                      "recipe": {"normalize": bool(cfg.data.normalize),
                                 "mask_prob": float(cfg.data.mask_prob)}}
        meta = {"train": train_meta}
        ts = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
              "history": history, "elapsed_s": elapsed()}
        save_checkpoint(last_path, model, meta, train_state=ts)
        if final:
            save_checkpoint(out / "final.pt", model, meta)

    it = iter(loader)
    model.train()
    stopped_early = False
    try:
        while step < t.steps:
            batch = batch_to(next(it), device)
            _, loss = batch_loss(ddp, batch, cfg, lead)
            if t.lyapunov_weight > 0:  # PDEDER: penalise the latent map's top Lyapunov exponent
                lyap = lyapunov_penalty(model, batch, t, step)
                loss = loss + t.lyapunov_weight * lyap
                run_lyap += float(lyap.detach())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {step} (rank {rank})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            step += 1
            run_loss += float(loss.detach())
            run_n += 1
            if pbar is not None:
                pbar.update(1)
            want_stop = stop.requested or (t.max_minutes > 0 and elapsed() > 60 * t.max_minutes)
            if world > 1:
                flag = torch.tensor([1.0 if want_stop else 0.0], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                want_stop = bool(flag.item() > 0)
            if rank == 0 and (step % t.log_every == 0 or step == t.steps or want_stop):
                row: dict[str, Any] = {"step": step, "samples": step * spec.batch_size * world,
                                       "elapsed_s": round(elapsed(), 2), "lr": sched.get_last_lr()[0],
                                       "train_loss": run_loss / max(run_n, 1)}
                if t.lyapunov_weight > 0:  # train_loss includes weight x this
                    row["lyapunov"] = run_lyap / max(run_n, 1)
                if val_batches and (step % t.val_every == 0 or step == t.steps or want_stop):
                    row.update(validate(model, val_batches, cfg))
                history.append(row)
                run_loss, run_n, run_lyap = 0.0, 0, 0.0
                if pbar is not None:
                    pbar.set_postfix(loss=f"{row['train_loss']:.4g}",
                                     val=f"{row.get('val_loss', float('nan')):.4g}")
            if step % t.ckpt_every == 0 and step < t.steps:
                save()
            if want_stop:
                stopped_early = True
                break
    finally:
        if pbar is not None:
            pbar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        del it

    # a clean time-budget stop still yields final.pt; a SIGTERM only refreshes last.pt (resume later)
    save(final=not stop.requested)
    summary: dict[str, Any] = {}
    if rank == 0:
        last = history[-1] if history else {}
        vals = [h for h in history if "val_loss" in h]
        summary = {
            "steps": step, "target_steps": t.steps, "completed": step >= t.steps, "world_size": world,
            "stopped_by": ("sigterm" if stop.requested else "max_minutes") if stopped_early else None,
            "samples": step * spec.batch_size * world, "trajectories_seen": step * spec.batch_size * world,
            "elapsed_s": round(elapsed(), 2),
            "steps_per_s_this_session": round((step - step_start) / max(time.time() - t0, 1e-9), 3),
            "params": count_parameters(model), "final_train_loss": last.get("train_loss"),
            "final_val_loss": vals[-1]["val_loss"] if vals else None,
            "final_val_ctx_mse": vals[-1]["val_ctx_mse"] if vals else None,
            "final_val_hidden_mse": vals[-1]["val_hidden_mse"] if vals else None,
            "param_hash": param_hash(model), "seed": t.seed, "config_source": config_source,
        }
        write_metrics(out, history, summary)
        if history:
            plot_loss_curve(history, out / "loss_curve.png")
    if world > 1:
        h = param_hash(model)
        (out / f"param_hash_rank{rank}.txt").write_text(h)
        dist.barrier()
        dist.destroy_process_group()
    return summary


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m fm_core.train", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, PretrainOptions)
    add_set_option(p, "override a config value, e.g. --set train.steps=200", parse=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    summary = pretrain(cfg, args.out, resume=args.resume, progress=args.progress,
                       config_source=str(args.config or "<defaults>"))
    if summary:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
