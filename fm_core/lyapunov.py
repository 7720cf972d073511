"""Maximal Lyapunov exponent of a one-step map by Jacobian-vector products, and the PDEDER penalty on the
latent one-step map of DynamicsFM (docs/model.md, "Lyapunov penalty").

:func:`max_lyapunov` works on any batched one-step map ``x[i+1] = step(x[i])``: one tangent vector is pushed
through the map with ``torch.func.jvp``, renormalised after every step, and the log growth is averaged, so
the estimate is ``(1/k) log |J_k ... J_1 v| / |v|`` (it tends to the top exponent, natural log per step). It
is differentiable (the penalty's gradient flows through the trajectory and the Jacobians).

:func:`latent_lyapunov` is that estimate for the model's autoregressive rollout: context tokens are
encoded once (``forward_with_cache``); then the one-step map takes the state window of the last ``patch``
steps (the newest one a prediction), builds the next token from it and the given inputs, runs it through
the blocks against the KV cache of every earlier token (``step_tensors``) and appends the predicted state.
The cache, the inputs and the position are held fixed in each step's Jacobian (they are the map's context);
the growth is measured in the token-embedding (latent) space ``embed(token(window))``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp

__all__ = ["exact_layer_norms", "latent_lyapunov", "latent_map", "max_lyapunov"]

Step = Callable[[Tensor, Any], tuple[Tensor, Any]]
_TENSOR = object()  # marks where a context tensor goes back


@contextmanager
def exact_layer_norms(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.LayerNorm`` of ``module`` runs as plain ops (mean, var, rsqrt).

    The same function, but differentiating a forward-mode (jvp) tangent of ``F.layer_norm`` in reverse mode
    gives wrong gradients in torch 2.13 (the fused kernel's saved statistics carry no history; pytorch
    issue #196700 reports the forward-over-forward case); the plain ops differentiate exactly."""
    norms = [mod for mod in module.modules() if isinstance(mod, torch.nn.LayerNorm)]

    def plain(mod: torch.nn.LayerNorm) -> Callable[[Tensor], Tensor]:
        dims = tuple(range(-len(mod.normalized_shape), 0))

        def forward(x: Tensor) -> Tensor:
            xc = x - x.mean(dims, keepdim=True)
            y = xc * torch.rsqrt((xc * xc).mean(dims, keepdim=True) + mod.eps)
            if mod.weight is not None:
                y = y * mod.weight
            return y + mod.bias if mod.bias is not None else y

        return forward

    for mod in norms:
        mod.forward = plain(mod)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for mod in norms:
            del mod.forward  # back to the class's (fused) forward


def _norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


def _per_sample(scale: Tensor, like: Tensor) -> Tensor:
    return scale.reshape(-1, *([1] * (like.dim() - 1)))


def max_lyapunov(
    step: Step,
    x0: Tensor,
    n_steps: int,
    *,
    ctx: Any = None,
    measure: Callable[[Tensor, Any], Tensor] | None = None,
    v0: Tensor | None = None,
    burn_in: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Top Lyapunov exponent per sample (B,) of the batched map ``x[i+1], ctx[i+1] = step(x[i], ctx[i])``.

    ``x0 (B, ...)``: start; ``ctx``: what the map needs besides x and that is held fixed in its Jacobian
    (a tuple, or one item; returned updated for the next step; None for a plain map ``lambda x, c: (f(x),
    c)``). ``measure(x,
    ctx) -> y (B, ...)``: the coordinates the growth is measured in (default: x itself). ``v0``: the tangent
    to start from (default: standard normal from ``generator``). ``burn_in`` steps align the tangent with the
    leading direction before the ``n_steps`` whose log growth is averaged.
    """
    if n_steps < 1 or burn_in < 0:
        raise ValueError(f"max_lyapunov: n_steps must be >= 1 and burn_in >= 0, got {n_steps}, {burn_in}")
    x = x0
    if v0 is None:
        v0 = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    v = v0
    if measure is not None:  # unit length in the measured coordinates
        _, dy = jvp(lambda z: measure(z, ctx), (x,), (v,))
        v = v / _per_sample(_norm(dy).clamp_min(1e-30), v)
    else:
        v = v / _per_sample(_norm(v).clamp_min(1e-30), v)
    total = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    for i in range(burn_in + n_steps):
        c = ctx
        plain: list[Any] = []  # the non-tensor items of the next context (jvp's aux must be tensors)

        def g(z: Tensor, c: Any = c, plain: list[Any] = plain) -> tuple[tuple[Tensor, Tensor], list[Tensor]]:
            nxt, c2 = step(z, c)
            items = list(c2) if isinstance(c2, tuple) else [c2]
            plain[:] = [_TENSOR if isinstance(t, Tensor) else t for t in items]
            return (nxt, measure(nxt, c2) if measure is not None else nxt), [
                t for t in items if isinstance(t, Tensor)]

        (x, _), (dx, dy), tensors = jvp(g, (x,), (v,), has_aux=True)
        it = iter(tensors)
        items = [next(it) if t is _TENSOR else t for t in plain]
        ctx = tuple(items) if isinstance(c, tuple) else items[0]
        growth = _norm(dy).clamp_min(1e-30)
        if i >= burn_in:
            total = total + torch.log(growth)
        v = dx / _per_sample(growth, dx)
    return total / n_steps


def latent_map(
    model: Any, batch: dict[str, Tensor], context: int, samples: int, n_steps: int
) -> tuple[Step, Tensor, tuple[Any, ...], Callable[[Tensor, Any], Tensor]]:
    """The latent one-step map of ``model``'s autoregressive rollout on the first ``samples`` windows of a
    training batch: ``(step, w0, ctx0, latent)`` for :func:`max_lyapunov`.

    ``w0 (B, patch, n_max)``: the state window whose newest step ``x[context]`` is the model's prediction
    after ``context`` steps as given (the batch's first ``patch - 1`` history steps are skipped);
    ``step(w, ctx)`` appends the next prediction (inputs from the batch; ``ctx`` = KV cache, step index,
    obs flags of the window, held fixed); ``latent(w, ctx)`` is the window's token embedding. Needs
    ``context + n_steps + 1`` steps after the history; ValueError otherwise.
    """
    core = getattr(model, "module", model)  # DDP-wrapped or not
    p = core.cfg.patch
    lead = p - 1
    b = min(samples, batch["x"].shape[0])
    x, u, obs = (batch[k][:b, lead:] for k in ("x", "u", "obs"))
    sm, im = batch["state_mask"][:b], batch["input_mask"][:b]
    if context < p or context + n_steps + 1 > x.shape[1]:
        raise ValueError(f"lyapunov estimate: context={context} (>= patch {p}) + steps={n_steps} + 1 must "
                         f"fit the {x.shape[1]} steps of the batch")
    pred, cache = core.forward_with_cache(x[:, :context], u[:, :context], obs[:, :context], sm, im)
    ones = torch.ones(b, 1, dtype=obs.dtype, device=obs.device)
    w0 = torch.cat([x[:, context - p + 1 : context], pred[:, -1:]], 1)  # newest step: the prediction
    o0 = torch.cat([obs[:, context - p + 1 : context], ones], 1)

    def u_win(i: int) -> Tensor:  # inputs of the window whose newest step is context + i
        return u[:, context + i - p + 1 : context + i + 1]

    def step(w: Tensor, c: tuple[Tensor, Tensor, int, Tensor]) -> tuple[Tensor, Any]:
        k, v, i, o = c
        nxt, k2, v2 = core.step_tensors(w, u_win(i), o, sm, im, k, v)
        return torch.cat([w[:, 1:], nxt], 1), (k2, v2, i + 1, torch.cat([o[:, 1:], ones], 1))

    def latent(w: Tensor, c: tuple[Tensor, Tensor, int, Tensor]) -> Tensor:
        feat = core.step_features(w, u_win(c[2]), c[3], sm, im)
        return core.embed(core.tokens(feat, sm, im, lead=lead))

    return step, w0, (cache.k, cache.v, 0, o0), latent


def latent_lyapunov(
    model: Any,
    batch: dict[str, Tensor],
    steps: int = 8,
    context: int = 16,
    samples: int = 4,
    burn_in: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean top Lyapunov exponent (scalar, natural log per step) of ``model``'s latent one-step map
    (:func:`latent_map`) on a training batch (``fm_core.data``: normalised, channel-padded), estimated over
    ``steps`` autoregressive steps after ``burn_in``; the tangent starts on the real state channels."""
    core = getattr(model, "module", model)
    step, w0, ctx0, latent = latent_map(core, batch, context, samples, burn_in + steps)
    sm = batch["state_mask"][: w0.shape[0]]
    v0 = torch.randn(w0.shape, generator=generator).to(w0) * sm[:, None, :]
    with exact_layer_norms(core):
        lam = max_lyapunov(step, w0, steps, ctx=ctx0, measure=latent, v0=v0, burn_in=burn_in)
    return lam.mean()
