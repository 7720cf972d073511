"""DynamicsFM: causality, masking semantics, streaming == full recompute, shapes, normalisation."""

from __future__ import annotations

import pytest
import torch

from fm_core.model import DynamicsFM, ModelConfig, StreamCache, count_parameters

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=64)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def model() -> DynamicsFM:
    torch.manual_seed(0)
    m = DynamicsFM(TINY).eval()
    m.set_normalization([0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 3.0, 1.5], [0.3], [4.0])
    return m


def _data(b: int = 3, t: int = 20, n: int = 4, m: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, n, generator=g), torch.randn(b, t, m, generator=g), torch.ones(b, t)


@torch.no_grad()
def test_causality_future_perturbation_leaves_past_unchanged(model):
    sys = model.for_system(4, 1)
    x, u, obs = _data()
    base = sys(x, u, obs)
    for k in (0, 7, 19):
        x2, u2 = x.clone(), u.clone()
        x2[:, k] += 50.0
        u2[:, k] -= 30.0
        out = sys(x2, u2, obs)
        assert torch.equal(out[:, :k], base[:, :k]), f"positions before {k} changed"
        assert (out[:, k] - base[:, k]).abs().max() > 1e-3, "perturbation at k must affect position k"


@torch.no_grad()
def test_hidden_states_are_ignored_but_inputs_are_used(model):
    sys = model.for_system(4, 1)
    x, u, obs = _data()
    obs[:, 12:] = 0.0
    base = sys(x, u, obs)
    x2 = x.clone()
    x2[:, 12:] = float("nan")  # hidden values may be anything, even NaN
    out = sys(x2, u, obs)
    assert torch.isfinite(out).all()
    assert torch.equal(out, base)
    u2 = u.clone()
    u2[:, 15] += 5.0
    out_u = sys(x, u2, obs)
    assert torch.equal(out_u[:, :15], base[:, :15])
    assert (out_u[:, 15:] - base[:, 15:]).abs().max() > 1e-3, "future inputs must steer the rollout"


@torch.no_grad()
def test_padded_channels_are_ignored_and_zero_in_output(model):
    x, u, _ = _data(b=2, t=10, n=6, m=2)
    obs = torch.ones(2, 10)
    sm = torch.tensor([1, 1, 1, 0, 0, 0.0])
    im = torch.tensor([1, 0.0])
    base = model(x, u, obs, sm, im)
    x2, u2 = x.clone(), u.clone()
    x2[..., 3:] = 99.0
    u2[..., 1] = -99.0
    out = model(x2, u2, obs, sm, im)
    assert torch.equal(out, base)
    assert torch.all(out[..., 3:] == 0)
    # the masks are information: a different channel layout gives a different prediction
    out_other = model(x, u, obs, torch.ones(6), torch.ones(2))
    assert (out_other[..., :3] - base[..., :3]).abs().max() > 1e-4


@torch.no_grad()
def test_for_system_applies_normalisation(model):
    sys = model.for_system(4, 1)
    x, u, obs = _data()
    raw = sys(x, u, obs)
    xn = (x - model.x_mean[:4]) / model.x_std[:4]
    un = (u - model.u_mean[:1]) / model.u_std[:1]
    pad_x = torch.nn.functional.pad(xn, (0, 2))
    pad_u = torch.nn.functional.pad(un, (0, 1))
    sm, im = torch.tensor([1, 1, 1, 1, 0, 0.0]), torch.tensor([1, 0.0])
    norm_out = model(pad_x, pad_u, obs, sm, im)[..., :4]
    torch.testing.assert_close(raw, norm_out * model.x_std[:4] + model.x_mean[:4])


@torch.no_grad()
@pytest.mark.parametrize("n,m", [(4, 1), (2, 2), (6, 1)])
def test_streaming_equals_full_recompute(model, n, m):
    sys = model.for_system(n, m)
    x, u, obs = _data(b=2, t=30, n=n, m=m)
    obs[1, 18:] = 0.0  # one stream with a hidden future
    full = sys(x, u, obs)
    p = sys.patch
    pad = lambda a: torch.cat([torch.full_like(a[:, : p - 1], 7.0), a], 1)  # noqa: E731 - junk before start
    xp, up, op = pad(x), pad(u), pad(obs)
    cache = None
    outs = []
    for t in range(x.shape[1]):
        pred, cache = sys.step(xp[:, t : t + p], up[:, t : t + p], op[:, t : t + p], cache)
        outs.append(pred)
    assert isinstance(cache, StreamCache) and cache.pos == x.shape[1]
    c = model.cfg
    assert tuple(cache.k.shape) == (c.n_layers, 2, c.n_heads, 30, c.d_model // c.n_heads)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_forward_with_cache_primes_stream(model):
    x, u, _ = _data(b=2, t=12, n=6, m=2)
    obs = torch.ones(2, 12)
    sm, im = torch.ones(6), torch.ones(2)
    full = model(x, u, obs, sm, im)
    pred, cache = model.forward_with_cache(x[:, :8], u[:, :8], obs[:, :8], sm, im)
    torch.testing.assert_close(pred, full[:, :8], atol=1e-5, rtol=1e-5)
    for t in range(8, 12):
        p, cache = model.step(x[:, t - 1 : t + 1], u[:, t - 1 : t + 1], obs[:, t - 1 : t + 1], sm, im, cache)
        torch.testing.assert_close(p[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_lead_history_matches_front_padding(model):
    """lead=p-1 with zeroed history == plain forward on the sequence without the history step."""
    x, u, _ = _data(b=2, t=10, n=6, m=2)
    obs = torch.ones(2, 10)
    sm, im = torch.ones(6), torch.ones(2)
    x0, u0, o0 = x.clone(), u.clone(), obs.clone()
    x0[:, 0], u0[:, 0], o0[:, 0] = 0.0, 0.0, 0.0
    with_lead = model(x0, u0, o0, sm, im, lead=1)
    plain = model(x[:, 1:], u[:, 1:], obs[:, 1:], sm, im)
    torch.testing.assert_close(with_lead, plain)
    # real history (not zeroed) is information
    with_hist = model(x, u, obs, sm, im, lead=1)
    assert (with_hist[:, 0] - plain[:, 0]).abs().max() > 1e-4


def test_bad_shapes_raise_clear_value_errors(model):
    sys = model.for_system(4, 1)
    x, u, obs = _data()
    with pytest.raises(ValueError, match=r"x must be \(B,T,n=4\)"):
        sys(x[..., :3], u, obs)
    with pytest.raises(ValueError, match="u must be"):
        sys(x, torch.randn(3, 20, 2), obs)
    with pytest.raises(ValueError, match="obs must be"):
        sys(x, u, obs[:, :5])
    x_nan = x.clone()
    x_nan[0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN/Inf at observed steps"):
        sys(x_nan, u, obs)
    u_nan = u.clone()
    u_nan[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="u contains NaN/Inf"):
        sys(x, u_nan, obs)
    with pytest.raises(ValueError, match="max_len"):
        sys(torch.randn(1, 65, 4), torch.randn(1, 65, 1), torch.ones(1, 65))
    with pytest.raises(ValueError, match="x_win must be"):
        sys.step(torch.randn(1, 3, 4), torch.randn(1, 3, 1), torch.ones(1, 3))
    with pytest.raises(ValueError, match="n=7"):
        model.for_system(7, 1)
    with pytest.raises(ValueError, match="x_std must be > 0"):
        model.set_normalization([0.0], [0.0], [0.0], [1.0])
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_dict({"d_model": 32, "dmodel": 3})
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)


def test_default_config_size_and_token_layout():
    cfg = ModelConfig()
    assert cfg.token_features == 2 * (6 + 2 + 1) + 6 + 2
    n = count_parameters(DynamicsFM(cfg))
    assert 1_000_000 < n < 4_000_000, n
