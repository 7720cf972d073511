"""DynamicsFM: a causal transformer that predicts x[t+1] from sliding patch tokens of [x, u, obs].

Token t is the concatenation of the last ``patch`` steps' features ``[x (n_max), u (m_max), obs]`` (oldest
first, zero-padded at the front) plus the channel masks ``[state_mask (n_max), input_mask (m_max)]``.
Systems with fewer channels are zero-padded to ``n_max`` / ``m_max``; the masks tell the model which channels
exist. Hidden states (``obs == 0``) are zeroed before they enter a token, inputs always stay.

Tensor layouts (see docs/model.md): the streaming cache is two plain tensors ``k, v`` of shape
``(n_layers, B, n_heads, S, d_head)``; the position of the next token is ``S``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fm_core.train_configs import known_keys


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of :class:`DynamicsFM`."""

    n_max: int = 6
    """Widest state the model accepts; narrower systems are zero-padded and masked."""
    m_max: int = 2
    """Widest input, padded and masked the same way."""
    patch: int = 2
    """Time steps per token."""
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 8
    d_ff: int = 512
    max_len: int = 256
    """Longest sequence in time steps (context + horizon)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelConfig.{f.name} must be a positive int, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig: d_model={self.d_model} not divisible by n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ValueError(f"ModelConfig.d_model must be even (sinusoidal positions), got {self.d_model}")

    @property
    def step_features(self) -> int:
        """Features of one time step: x, u and the obs flag."""
        return self.n_max + self.m_max + 1

    @property
    def token_features(self) -> int:
        """Features of one token: ``patch`` steps plus the channel masks."""
        return self.patch * self.step_features + self.n_max + self.m_max

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys raise ValueError naming them."""
        return cls(**{k: int(v) if isinstance(v, float) and v.is_integer() else v
                      for k, v in known_keys(cls, d).items()})


class StreamCache(NamedTuple):
    """Streaming KV cache: ``k``, ``v`` of shape (n_layers, B, n_heads, S, d_head); next position is S."""

    k: Tensor
    v: Tensor

    @property
    def pos(self) -> int:
        return int(self.k.shape[3])


class ResidualBlock(nn.Module):
    """Linear -> GELU -> Linear plus a linear skip (the template's embedding/head block)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        self.skip = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x))) + self.skip(x)


def sinusoidal_positions(pos: Tensor, d_model: int) -> Tensor:
    """Sinusoidal encoding of float positions ``pos`` (...,) -> (..., d_model); computed on the fly."""
    half = d_model // 2
    inv_freq = torch.exp(
        torch.arange(half, dtype=torch.float32, device=pos.device) * (-math.log(10000.0) / half)
    )
    ang = pos.to(torch.float32).unsqueeze(-1) * inv_freq
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class CausalSelfAttention(nn.Module):
    """Explicit multi-head attention (export friendly; no nn.MultiheadAttention)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def _heads(self, t: Tensor) -> Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Full causal attention over (B,T,d); also returns k, v (B,H,T,dh) for cache priming."""
        b, t, d = h.shape
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.d_head))
        idx = torch.arange(t, device=h.device)
        future = idx.unsqueeze(0) > idx.unsqueeze(1)  # (T,T): key index > query index
        scores = scores.masked_fill(future, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v
        return self.out(att.transpose(1, 2).reshape(b, t, d)), k, v

    def step(self, h: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One new token h (B,1,d) attending to the cache (B,H,S,dh) and itself."""
        b, _, d = h.shape
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        k_all = torch.cat([k_cache, k], dim=2)
        v_all = torch.cat([v_cache, v], dim=2)
        scores = q @ k_all.transpose(-2, -1) * (1.0 / math.sqrt(self.d_head))
        att = torch.softmax(scores, dim=-1) @ v_all
        return self.out(att.transpose(1, 2).reshape(b, 1, d)), k_all, v_all


class DecoderBlock(nn.Module):
    """Pre-LayerNorm decoder block: x + attn(LN(x)); x + FFN(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(0.0)  # residual dropout, a training-time setting (DynamicsFM.set_dropout)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.attn(self.ln1(h))
        h = h + self.drop(a)
        return h + self.drop(self.ff(self.ln2(h))), k, v

    def step(self, h: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.attn.step(self.ln1(h), k_cache, v_cache)
        h = h + a
        return h + self.ff(self.ln2(h)), k, v


def _tracing() -> bool:
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling())


def _s(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class DynamicsFM(nn.Module):
    """The foundation model. ``forward`` works in normalised units on channel-padded tensors.

    Per-channel normalisation buffers ``x_mean, x_std (n_max)``, ``u_mean, u_std (m_max)`` are used by
    :meth:`for_system` (identity after synthetic pretraining, dataset statistics after fine-tuning).
    """

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        self.embed = ResidualBlock(cfg.token_features, cfg.d_ff, cfg.d_model)
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg.d_model, cfg.n_heads, cfg.d_ff) for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = ResidualBlock(cfg.d_model, cfg.d_ff, cfg.n_max)
        self.register_buffer("x_mean", torch.zeros(cfg.n_max))
        self.register_buffer("x_std", torch.ones(cfg.n_max))
        self.register_buffer("u_mean", torch.zeros(cfg.m_max))
        self.register_buffer("u_std", torch.ones(cfg.m_max))
        # scale of the head's increment output per channel, in normalised units (1 = the head predicts the
        # normalised increment itself; fine-tuning sets it to the data's one-step increment std)
        self.register_buffer("dx_scale", torch.ones(cfg.n_max))

    # ------------------------------------------------------------------ tokens
    def step_features(
        self, x: Tensor, u: Tensor, obs: Tensor, state_mask: Tensor, input_mask: Tensor
    ) -> Tensor:
        """Per-step features [x*mask (hidden -> 0), u*mask, obs] of shape (B,T,n_max+m_max+1)."""
        xo = torch.where(obs.unsqueeze(-1) > 0.5, x, torch.zeros_like(x)) * state_mask.unsqueeze(-2)
        uo = u * input_mask.unsqueeze(-2)
        return torch.cat([xo, uo, obs.unsqueeze(-1)], dim=-1)

    def tokens(self, feat: Tensor, state_mask: Tensor, input_mask: Tensor, lead: int = 0) -> Tensor:
        """Sliding patch tokens (B,T-lead,token_features) from step features (B,T,F).

        The first ``lead`` (<= patch-1) steps are history only: they fill the earliest tokens' patches.
        """
        p = self.cfg.patch
        b, t, _ = feat.shape
        t_out = t - lead
        fp = F.pad(feat, (0, 0, p - 1 - lead, 0))
        parts = [fp[:, i : i + t_out] for i in range(p)]
        masks = torch.cat([state_mask, input_mask], dim=-1).unsqueeze(1).expand(b, t_out, -1)
        return torch.cat(parts + [masks], dim=-1)

    def _masks(self, state_mask: Tensor, input_mask: Tensor, b: int) -> tuple[Tensor, Tensor]:
        sm = state_mask.to(torch.float32)
        im = input_mask.to(torch.float32)
        if sm.dim() == 1:
            sm = sm.unsqueeze(0).expand(b, -1)
        if im.dim() == 1:
            im = im.unsqueeze(0).expand(b, -1)
        return sm, im

    def _validate(self, x: Tensor, u: Tensor, obs: Tensor, sm: Tensor, im: Tensor, lead: int) -> None:
        c = self.cfg
        _check(x.dim() == 3 and x.shape[-1] == c.n_max, f"x must be (B,T,n_max={c.n_max}), got {_s(x)}")
        b, t = x.shape[0], x.shape[1]
        _check(_s(u) == (b, t, c.m_max), f"u must be (B,T,m_max)=({b},{t},{c.m_max}), got {_s(u)}")
        _check(_s(obs) == (b, t), f"obs must be (B,T)=({b},{t}), got {_s(obs)}")
        _check(_s(sm) == (b, c.n_max), f"state_mask must be (n_max,) or (B,n_max), got {_s(sm)}")
        _check(_s(im) == (b, c.m_max), f"input_mask must be (m_max,) or (B,m_max), got {_s(im)}")
        _check(0 <= lead <= c.patch - 1, f"lead must be in [0, patch-1={c.patch - 1}], got {lead}")
        _check(1 <= t - lead <= c.max_len, f"sequence length {t - lead} outside [1, max_len={c.max_len}]")

    def _readout(self, h: Tensor, feat_t: Tensor, sm: Tensor, dx_scale: Tensor | None = None) -> Tensor:
        """Head output; at observed positions it is a residual on the current state x[t].

        ``pred[t] = dx_scale * head(h[t]) + obs[t] * x[t]``: one-step prediction learns the increment in units
        of ``dx_scale``, hidden positions (obs = 0, x zeroed) predict the state itself. ``feat_t`` are the
        step features of the token steps.
        """
        n = self.cfg.n_max
        scale = self.dx_scale if dx_scale is None else dx_scale.unsqueeze(1)
        return (self.head(self.ln_f(h)) * scale + feat_t[..., :n]) * sm.unsqueeze(1)

    # ------------------------------------------------------------------ full forward
    def forward(
        self, x: Tensor, u: Tensor, obs: Tensor, state_mask: Tensor, input_mask: Tensor, lead: int = 0,
        dx_scale: Tensor | None = None,
    ) -> Tensor:
        """Predict normalised x[t+1] at every token.

        x (B,T,n_max), u (B,T,m_max), obs (B,T) -> (B,T-lead,n_max).

        ``state_mask`` / ``input_mask``: (n_max,) / (m_max,) or per-sample (B,·), 1 for real channels.
        Padded channels of the output are 0. ``dx_scale`` (B,n_max): per-sample increment scale instead of
        the buffer (synthetic pretraining, where every system has its own).
        """
        sm, im = self._masks(state_mask, input_mask, x.shape[0])
        if not _tracing():
            self._validate(x, u, obs, sm, im, lead)
        obs = obs.to(x.dtype)
        feat = self.step_features(x, u, obs, sm, im)
        h = self.embed(self.tokens(feat, sm, im, lead))
        pos = torch.arange(h.shape[1], device=h.device)
        h = h + sinusoidal_positions(pos, self.cfg.d_model)
        for blk in self.blocks:
            h, _, _ = blk(h)
        return self._readout(h, feat[:, lead:], sm, dx_scale)

    def forward_with_cache(
        self, x: Tensor, u: Tensor, obs: Tensor, state_mask: Tensor, input_mask: Tensor
    ) -> tuple[Tensor, StreamCache]:
        """Full forward (lead=0) that also returns the KV cache for continuing with :meth:`step`."""
        sm, im = self._masks(state_mask, input_mask, x.shape[0])
        if not _tracing():
            self._validate(x, u, obs, sm, im, 0)
        feat = self.step_features(x, u, obs.to(x.dtype), sm, im)
        h = self.embed(self.tokens(feat, sm, im))
        h = h + sinusoidal_positions(torch.arange(h.shape[1], device=h.device), self.cfg.d_model)
        ks, vs = [], []
        for blk in self.blocks:
            h, k, v = blk(h)
            ks.append(k)
            vs.append(v)
        return self._readout(h, feat, sm), StreamCache(torch.stack(ks), torch.stack(vs))

    # ------------------------------------------------------------------ streaming
    def empty_cache(self, batch: int, device: torch.device | str | None = None) -> StreamCache:
        """An empty cache (S = 0) for ``batch`` streams."""
        c = self.cfg
        shape = (c.n_layers, batch, c.n_heads, 0, c.d_model // c.n_heads)
        dev = device if device is not None else self.x_mean.device
        return StreamCache(torch.zeros(shape, device=dev), torch.zeros(shape, device=dev))

    def step_tensors(
        self, x_win: Tensor, u_win: Tensor, obs_win: Tensor, state_mask: Tensor, input_mask: Tensor,
        k: Tensor, v: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One streaming token from the last ``patch`` steps (normalised, channel-padded).

        x_win (B,p,n_max), u_win (B,p,m_max), obs_win (B,p); k, v (L,B,H,S,dh). Window steps that fall
        before the sequence start (index S-p+1+i < 0) are zeroed, exactly like the front padding of
        :meth:`forward`. Returns pred (B,1,n_max) and the caches grown to S+1.
        """
        p = self.cfg.patch
        b = x_win.shape[0]
        sm, im = self._masks(state_mask, input_mask, b)
        if not _tracing():
            c = self.cfg
            _check(_s(x_win) == (b, p, c.n_max), f"x_win must be (B,{p},{c.n_max}), got {_s(x_win)}")
            _check(_s(u_win) == (b, p, c.m_max), f"u_win must be (B,{p},{c.m_max}), got {_s(u_win)}")
            _check(_s(obs_win) == (b, p), f"obs_win must be (B,{p}), got {_s(obs_win)}")
            want = (c.n_layers, b, c.n_heads, k.shape[3] if k.dim() == 5 else -1, c.d_model // c.n_heads)
            _check(k.dim() == 5 and tuple(k.shape) == want and v.shape == k.shape,
                   f"cache k/v must be {want}, got {tuple(k.shape)} / {tuple(v.shape)}")
            _check(k.shape[3] < c.max_len, f"stream position {k.shape[3]} reached max_len={c.max_len}")
        s = k.shape[3]
        feat = self.step_features(x_win, u_win, obs_win.to(x_win.dtype), sm, im)  # (B,p,F)
        step_idx = torch.arange(p, device=x_win.device) + (s - p + 1)
        valid = (step_idx >= 0).to(feat.dtype).view(1, p, 1)
        feat = feat * valid
        tok = torch.cat([feat.reshape(b, 1, -1), sm.unsqueeze(1), im.unsqueeze(1)], dim=-1)
        h = self.embed(tok)
        pos = torch.zeros(1, device=x_win.device) + s
        h = h + sinusoidal_positions(pos, self.cfg.d_model)
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            h, kk, vv = blk.step(h, k[i], v[i])
            ks.append(kk)
            vs.append(vv)
        pred = self._readout(h, feat[:, p - 1 :], sm)
        return pred, torch.stack(ks), torch.stack(vs)

    def step(
        self, x_win: Tensor, u_win: Tensor, obs_win: Tensor, state_mask: Tensor, input_mask: Tensor,
        cache: StreamCache | None = None,
    ) -> tuple[Tensor, StreamCache]:
        """Streaming step in normalised units; ``cache=None`` starts a new stream."""
        if cache is None:
            cache = self.empty_cache(x_win.shape[0], x_win.device)
        pred, k, v = self.step_tensors(x_win, u_win, obs_win, state_mask, input_mask, cache.k, cache.v)
        return pred, StreamCache(k, v)

    # ------------------------------------------------------------------ physical units
    def set_dropout(self, p: float) -> None:
        """Residual dropout of every decoder block while training (0 = off; eval mode never drops)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        for block in self.blocks:
            block.drop.p = float(p)

    def set_normalization(self, x_mean: Any, x_std: Any, u_mean: Any, u_std: Any) -> None:
        """Set normalisation buffers (length n / m; the rest stays identity). std must be > 0 and finite."""
        for name, val, size in (("x_mean", x_mean, self.cfg.n_max), ("x_std", x_std, self.cfg.n_max),
                                ("u_mean", u_mean, self.cfg.m_max), ("u_std", u_std, self.cfg.m_max)):
            t = torch.as_tensor(val, dtype=torch.float32).reshape(-1)
            if t.numel() > size:
                raise ValueError(f"{name} has {t.numel()} entries, model allows at most {size}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN/Inf: {t.tolist()}")
            if name.endswith("std") and (t <= 0).any():
                raise ValueError(f"{name} must be > 0, got {t.tolist()}")
            buf = getattr(self, name)
            with torch.no_grad():
                buf.fill_(1.0 if name.endswith("std") else 0.0)
                buf[: t.numel()] = t.to(buf.device)

    def set_increment_scale(self, scale: Any) -> None:
        """Set ``dx_scale`` (length <= n_max, finite, > 0; the rest stays 1)."""
        t = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if t.numel() > self.cfg.n_max or not torch.isfinite(t).all() or (t <= 0).any():
            raise ValueError(f"dx_scale must be at most {self.cfg.n_max} finite values > 0, got {t.tolist()}")
        with torch.no_grad():
            self.dx_scale.fill_(1.0)
            self.dx_scale[: t.numel()] = t.to(self.dx_scale.device)

    def for_system(self, n: int, m: int) -> SystemModel:
        """A module with raw physical-unit I/O for a system with ``n`` states and ``m`` inputs."""
        return SystemModel(self, n, m)


class SystemModel(nn.Module):
    """DynamicsFM fixed to one system (n, m): raw physical units in and out; export friendly.

    ``forward(x (B,T,n), u (B,T,m), obs (B,T)) -> (B,T,n)``: prediction of x[t+1] at every t.
    ``step(x_win (B,p,n), u_win (B,p,m), obs_win (B,p), cache) -> (pred (B,1,n), cache)``.
    """

    def __init__(self, core: DynamicsFM, n: int, m: int) -> None:
        super().__init__()
        c = core.cfg
        if not (1 <= n <= c.n_max):
            raise ValueError(f"n={n} must be in [1, n_max={c.n_max}]")
        if not (1 <= m <= c.m_max):
            raise ValueError(f"m={m} must be in [1, m_max={c.m_max}]")
        self.core = core
        self.n, self.m = int(n), int(m)
        self.register_buffer("state_mask", (torch.arange(c.n_max) < n).float(), persistent=False)
        self.register_buffer("input_mask", (torch.arange(c.m_max) < m).float(), persistent=False)

    @property
    def patch(self) -> int:
        return self.core.cfg.patch

    def _norm(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        c, n, m = self.core.cfg, self.n, self.m
        xn = (x - self.core.x_mean[:n]) / self.core.x_std[:n]
        un = (u - self.core.u_mean[:m]) / self.core.u_std[:m]
        return F.pad(xn, (0, c.n_max - n)), F.pad(un, (0, c.m_max - m))

    def _denorm(self, pred: Tensor) -> Tensor:
        n = self.n
        return pred[..., :n] * self.core.x_std[:n] + self.core.x_mean[:n]

    def _check_io(self, x: Tensor, u: Tensor, obs: Tensor, t_name: str = "T") -> None:
        if _tracing():
            return
        n, m = self.n, self.m
        _check(x.dim() == 3 and x.shape[-1] == n, f"x must be (B,{t_name},n={n}), got {_s(x)}")
        b, t = x.shape[0], x.shape[1]
        _check(_s(u) == (b, t, m), f"u must be (B,{t_name},m)=({b},{t},{m}), got {_s(u)}")
        _check(_s(obs) == (b, t), f"obs must be (B,{t_name})=({b},{t}), got {_s(obs)}")
        _check(bool(torch.isfinite(u).all()), "u contains NaN/Inf")
        _check(bool(torch.isfinite(obs).all()), "obs contains NaN/Inf")
        seen = obs.unsqueeze(-1).expand_as(x) > 0.5
        _check(bool(torch.isfinite(x[seen]).all()), "x contains NaN/Inf at observed steps (obs = 1)")

    def forward(self, x: Tensor, u: Tensor, obs: Tensor) -> Tensor:
        self._check_io(x, u, obs)
        xn, un = self._norm(x, u)
        obs = obs.to(xn.dtype)
        # hidden states may hold anything (even NaN): zero them before normalised use
        xn = torch.where(obs.unsqueeze(-1) > 0.5, xn, torch.zeros_like(xn))
        return self._denorm(self.core(xn, un, obs, self.state_mask, self.input_mask))

    def empty_cache(self, batch: int) -> StreamCache:
        return self.core.empty_cache(batch, self.state_mask.device)

    def step_tensors(
        self, x_win: Tensor, u_win: Tensor, obs_win: Tensor, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Export-friendly streaming step on plain tensors: returns (pred (B,1,n), k', v')."""
        self._check_io(x_win, u_win, obs_win, t_name="p")
        xn, un = self._norm(x_win, u_win)
        obs_win = obs_win.to(xn.dtype)
        xn = torch.where(obs_win.unsqueeze(-1) > 0.5, xn, torch.zeros_like(xn))
        pred, k2, v2 = self.core.step_tensors(xn, un, obs_win, self.state_mask, self.input_mask, k, v)
        return self._denorm(pred), k2, v2

    def step(
        self, x_win: Tensor, u_win: Tensor, obs_win: Tensor, cache: StreamCache | None = None
    ) -> tuple[Tensor, StreamCache]:
        """Streaming step (raw units); ``cache=None`` starts a new stream at position 0."""
        if cache is None:
            cache = self.empty_cache(x_win.shape[0])
        pred, k, v = self.step_tensors(x_win, u_win, obs_win, cache.k, cache.v)
        return pred, StreamCache(k, v)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
