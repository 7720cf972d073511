"""Online synthetic training batches and the training loss.

Each batch is generated inside a DataLoader worker from ``fm_core.rkhs.generate_batch`` with a seed derived
from ``(seed, rank, batch_index)`` only, so the stream is reproducible and independent of the number of
workers, and ``--resume`` continues it exactly (``start_batch = step``).

A batch holds ``seq_len + patch`` steps: ``lead = patch - 1`` history steps that only fill the first token's
patch, ``seq_len`` token steps and one extra step that is the last target. Per sample:

* context masking (TimesFM style): the first ``r ~ U{0..patch-1}`` history steps are zeroed (x, u, obs), so
  the model sees every amount of front padding (``r = patch-1`` equals the zero padding used at inference);
* masked long-horizon prediction (with probability ``mask_prob``): a context length ``L`` is drawn and
  ``obs = 0`` for token positions ``>= L`` (inputs stay), otherwise all positions are observed;
* Gaussian noise (``noise_std``) on the observed input states; targets stay clean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

Generator = Callable[[np.random.Generator, int, int, Any], Any]


@dataclass
class BatchSpec:
    """What a training batch looks like (from the [data] config and the model's patch / channel sizes)."""

    batch_size: int
    seq_len: int
    patch: int
    n_max: int
    m_max: int
    noise_std: float = 0.01
    mask_prob: float = 0.5
    min_context: int = 1
    context_mask: bool = True
    normalize: bool = False


def _default_generator() -> Generator:
    from fm_core.rkhs import generate_batch

    return generate_batch


def _rkhs_config(rkhs: Any) -> Any:
    if rkhs is None or isinstance(rkhs, dict):
        from fm_core.rkhs import RKHSConfig

        return RKHSConfig.from_dict(rkhs or {})
    return rkhs


def make_batch(
    rng: np.random.Generator, spec: BatchSpec, rkhs_cfg: Any, generator: Generator | None = None,
    source: str = "synthetic batch",
) -> dict[str, Tensor]:
    """Generate one training batch (dict of float32 tensors, see module docstring)."""
    gen = generator or _default_generator()
    p, t = spec.patch, spec.seq_len
    total = t + p
    sb = gen(rng, spec.batch_size, total, rkhs_cfg)
    x = np.asarray(sb.x, dtype=np.float32)
    u = np.asarray(sb.u, dtype=np.float32)
    n = np.asarray(sb.n).astype(np.int64)
    m = np.asarray(sb.m).astype(np.int64)
    b = spec.batch_size
    if x.shape != (b, total, spec.n_max) or u.shape != (b, total, spec.m_max):
        raise ValueError(
            f"{source}: generator returned x {x.shape}, u {u.shape}; expected "
            f"({b},{total},{spec.n_max}) and ({b},{total},{spec.m_max}) (check RKHSConfig n_max/m_max)"
        )
    if not (np.isfinite(x).all() and np.isfinite(u).all()):
        raise ValueError(f"{source}: generator returned NaN/Inf in field 'x' or 'u'")
    if n.shape != (b,) or m.shape != (b,) or (n < 1).any() or (n > spec.n_max).any() or (m < 0).any() \
            or (m > spec.m_max).any():
        raise ValueError(f"{source}: generator returned invalid 'n'/'m' {n.tolist()} / {m.tolist()}")
    state_mask = (np.arange(spec.n_max)[None, :] < n[:, None]).astype(np.float32)
    input_mask = (np.arange(spec.m_max)[None, :] < m[:, None]).astype(np.float32)
    if not spec.normalize:
        return windows_to_batch(rng, x, u, state_mask, input_mask, spec)
    x, u, dx = normalise_per_sample(x, u, state_mask, input_mask)
    out = windows_to_batch(rng, x, u, state_mask, input_mask, spec)
    out["dx_scale"] = torch.from_numpy(dx)
    return out


def normalise_per_sample(
    x: np.ndarray, u: np.ndarray, state_mask: np.ndarray, input_mask: np.ndarray, floor: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sample's real channels to zero mean / unit std over time (std floored), as fine-tuning does with
    dataset statistics; also returns the per-sample one-step increment std of the normalised x (B, n_max),
    1 on padded channels."""
    def norm(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
        mean = a.mean(1, keepdims=True)
        std = np.maximum(a.std(1, keepdims=True), floor)
        return ((a - mean) / std * mask[:, None, :]).astype(np.float32)

    xn, un = norm(x, state_mask), norm(u, input_mask)
    dx = np.maximum(np.diff(xn, axis=1).std(1), floor)
    dx = np.where(state_mask > 0, dx, 1.0).astype(np.float32)
    return xn, un, dx


def windows_to_batch(
    rng: np.random.Generator, x: np.ndarray, u: np.ndarray, state_mask: np.ndarray, input_mask: np.ndarray,
    spec: BatchSpec,
) -> dict[str, Tensor]:
    """Turn clean windows into a training batch (context / long-horizon masking, input noise, targets).

    x (B, seq_len+patch, n_max), u (B, seq_len+patch, m_max): normalised, channel-padded."""
    p, t = spec.patch, spec.seq_len
    total = t + p
    b = x.shape[0]
    if x.shape[1] != total or u.shape[1] != total:
        raise ValueError(f"windows must have seq_len+patch={total} steps, got {x.shape[1]} / {u.shape[1]}")
    lead = p - 1
    x_in, u_in, target = x[:, : total - 1].copy(), u[:, : total - 1].copy(), x[:, p:].copy()
    obs = np.ones((b, total - 1), dtype=np.float32)
    # random context masking of the history steps
    if lead > 0:
        r = rng.integers(0, p, size=b) if spec.context_mask else np.full(b, lead)
        hist_zero = np.arange(lead)[None, :] < r[:, None]  # (B, lead)
        obs[:, :lead][hist_zero] = 0.0
        u_in[:, :lead][hist_zero] = 0.0
    # masked long-horizon prediction: obs = 0 at token positions >= L
    masked = rng.random(b) < spec.mask_prob
    lo = min(spec.min_context, t)
    ctx = np.where(masked, rng.integers(lo, t + 1, size=b), t)
    hidden = np.arange(t)[None, :] >= ctx[:, None]  # (B, T) token positions
    obs[:, lead:][hidden] = 0.0
    x_in = x_in * obs[..., None] * state_mask[:, None, :]
    if spec.noise_std > 0:
        x_in = x_in + spec.noise_std * rng.standard_normal(x_in.shape).astype(np.float32) \
            * obs[..., None] * state_mask[:, None, :]
    u_in = u_in * input_mask[:, None, :]
    return {
        "x": torch.from_numpy(np.ascontiguousarray(x_in, dtype=np.float32)),
        "u": torch.from_numpy(np.ascontiguousarray(u_in, dtype=np.float32)),
        "obs": torch.from_numpy(obs),
        "target": torch.from_numpy(np.ascontiguousarray(target * state_mask[:, None, :], dtype=np.float32)),
        "hidden": torch.from_numpy(hidden.astype(np.float32)),
        "state_mask": torch.from_numpy(state_mask),
        "input_mask": torch.from_numpy(input_mask),
        "ctx_len": torch.from_numpy(ctx.astype(np.int64)),
    }


def batch_rng(seed: int, rank: int, index: int, stream: int = 0) -> np.random.Generator:
    """The RNG of batch ``index`` of ``rank`` (stream 0 = training, 1 = validation)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(rank), int(index)]))


class SyntheticStream(IterableDataset):
    """Endless reproducible stream of synthetic batches (use with ``DataLoader(batch_size=None)``).

    Worker ``w`` of ``W`` produces batch indices ``start + w, start + w + W, ...``; the DataLoader yields them
    in index order, so the stream does not depend on ``W``.
    """

    def __init__(
        self, spec: BatchSpec, rkhs: Any = None, seed: int = 0, rank: int = 0, start_batch: int = 0,
        generator: Generator | None = None, stream: int = 0,
    ) -> None:
        super().__init__()
        self.spec, self.rkhs = spec, rkhs
        self.seed, self.rank, self.start_batch, self.stream = seed, rank, start_batch, stream
        self.generator = generator

    def batch(self, index: int) -> dict[str, Tensor]:
        """Batch number ``index`` (deterministic)."""
        rng = batch_rng(self.seed, self.rank, index, self.stream)
        rk = self.rkhs if self.generator is not None else _rkhs_config(self.rkhs)
        return make_batch(rng, self.spec, rk, self.generator,
                          source=f"synthetic batch (seed={self.seed}, rank={self.rank}, index={index})")

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        i = self.start_batch + wid
        while True:
            yield self.batch(i)
            i += nw


def make_loader(ds: SyntheticStream, num_workers: int) -> DataLoader:
    """DataLoader over an already-batched stream."""
    return DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4 if num_workers > 0 else None)


def masked_huber_loss(
    pred: Tensor, target: Tensor, state_mask: Tensor, hidden: Tensor, delta: float = 1.0,
    hidden_weight: float = 1.0,
) -> Tensor:
    """Huber loss averaged over real channels (state_mask) and all positions.

    pred, target (B,T,n_max); state_mask (B,n_max); hidden (B,T) 1 at masked positions, weighted by
    ``hidden_weight`` (context positions weigh 1).
    """
    el = F.huber_loss(pred, target, reduction="none", delta=delta)
    w = (1.0 + (hidden_weight - 1.0) * hidden).unsqueeze(-1) * state_mask.unsqueeze(1)
    return (el * w).sum() / w.sum().clamp_min(1e-8)


def batch_to(batch: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
