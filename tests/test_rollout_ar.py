"""The autoregressive recipe: increment-scaled head, autoregressive rollouts (torch and ONNX), pushforward
training, per-sample normalised pretraining batches, and how checkpoints record their rollout mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx_helpers import TINY, rel_err, stepped_ar_rollout

from export.onnx_export import export_checkpoint
from export.onnx_runtime import OnnxPredictor
from fm_core.checkpoint import load_checkpoint, rollout_mode_of, save_checkpoint
from fm_core.data import BatchSpec, make_batch, normalise_per_sample
from fm_core.finetune import FinetuneConfig, _train_loss, finetune, rollout, rollout_ar
from fm_core.model import DynamicsFM, ModelConfig
from fm_core.trajfile import TrajData


def _model(seed: int = 0, scale: bool = True) -> DynamicsFM:
    torch.manual_seed(seed)
    m = DynamicsFM(ModelConfig(**TINY)).eval()
    m.set_normalization([0.1, -0.2, 0.0, 0.3], [0.5, 1.5, 2.0, 0.8], [0.2], [1.3])
    if scale:
        m.set_increment_scale([0.05, 0.2, 0.02, 0.1])
    return m


def _data(b: int, lx: int, h: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(0, 0.1, (b, lx, 4)), 1).astype(np.float32)
    u = rng.normal(0, 1, (b, lx - 1 + h, 1)).astype(np.float32)
    return x, u[:, : lx - 1], u[:, lx - 1 :]


def test_ar_rollout_equals_feeding_predictions_back_through_full_windows():
    sys = _model().for_system(4, 1)
    x, uc, uf = _data(3, 7, 9)
    got = rollout_ar(sys, x, uc, uf)
    xs, u = torch.as_tensor(x), torch.as_tensor(np.concatenate([uc, uf], 1))
    for _ in range(9):
        t = xs.shape[1]
        nxt = sys(xs, u[:, :t], torch.ones(3, t))[:, -1:]
        xs = torch.cat([xs, nxt], 1)
    assert torch.allclose(got, xs[:, 7:], atol=1e-5)
    # a one-step horizon is the teacher-forced prediction, and it differs from the masked one-pass rollout
    assert torch.allclose(rollout_ar(sys, x, uc, uf[:, :1])[:, 0], xs[:, 7], atol=1e-5)
    assert not torch.allclose(rollout(sys, x, uc, uf), got, atol=1e-3)


def test_increment_scale_scales_the_head_and_old_checkpoints_load_with_scale_one(tmp_path):
    a, b = _model(scale=False), _model(scale=False)
    b.set_increment_scale([0.5, 0.5, 0.5, 0.5])
    x, uc, _ = _data(2, 6, 1)
    xa = a.for_system(4, 1)(torch.as_tensor(x), torch.as_tensor(np.pad(uc, ((0, 0), (0, 1), (0, 0)))),
                            torch.ones(2, 6))
    xb = b.for_system(4, 1)(torch.as_tensor(x), torch.as_tensor(np.pad(uc, ((0, 0), (0, 1), (0, 0)))),
                            torch.ones(2, 6))
    # pred = x + std * scale * head: halving the scale halves the increment
    assert torch.allclose(xb - torch.as_tensor(x), 0.5 * (xa - torch.as_tensor(x)), atol=1e-5)
    path = save_checkpoint(tmp_path / "old.pt", a)
    ck = torch.load(path, weights_only=True)
    del ck["state_dict"]["dx_scale"]  # a checkpoint written before the buffer existed
    torch.save(ck, path)
    old, _ = load_checkpoint(path)
    assert torch.equal(old.dx_scale, torch.ones(TINY.get("n_max", 6)))
    with pytest.raises(ValueError, match="dx_scale"):
        a.set_increment_scale([0.1, -1.0])


@pytest.mark.parametrize("exporter, with_step", [("fused", True), ("fused", False), ("torchscript", False)])
def test_onnx_ar_rollout_matches_torch(tmp_path, exporter, with_step):
    model = _model(seed=2)
    meta = {"n": 4, "m": 1, "dt": 0.01, "rig": "cartpole", "state_names": ["p", "th", "pd", "thd"],
            "input_names": ["v"], "train": {"config": {"rollout_mode": "ar"}}}
    ck = save_checkpoint(tmp_path / "ar.pt", model, meta)
    step = tmp_path / "ar_step.onnx" if with_step else None
    res = export_checkpoint(ck, tmp_path / "ar.onnx", streaming=step, exporter=exporter, context=16)
    pred = OnnxPredictor(res.full_path, res.step_path)
    assert pred.meta.rollout_mode == "ar"
    x, uc, uf = _data(1, 10, 12, seed=4)
    plans = np.concatenate([uf, -uf, 0.5 * uf])  # K = 3 plans after one history
    got = pred.rollout(x[0], uc[0], plans)
    want = rollout_ar(model.for_system(4, 1), np.repeat(x, 3, 0), np.repeat(uc, 3, 0), plans).numpy()
    assert rel_err(got, want) < 1e-4


def test_masked_checkpoint_exports_as_masked(tmp_path):
    ck = save_checkpoint(tmp_path / "m.pt", _model(), {"n": 4, "m": 1, "dt": 0.01})
    res = export_checkpoint(ck, tmp_path / "m.onnx", context=16)
    assert OnnxPredictor(res.full_path).meta.rollout_mode == "masked"


def test_rollout_mode_of_meta():
    assert rollout_mode_of({}) == "masked"
    assert rollout_mode_of({"train": {"recipe": {"mask_prob": 0.0, "normalize": True}}}) == "ar"
    assert rollout_mode_of({"train": {"recipe": {"mask_prob": 0.5}}}) == "masked"
    assert rollout_mode_of({"train": {"config": {"rollout_mode": "masked"}, "recipe": {"mask_prob": 0}}}) \
        == "masked"


def _trajs(k: int = 6, t: int = 60, seed: int = 0) -> TrajData:
    """A damped oscillator driven by random inputs (dt 0.05)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((k, t, 2), np.float32)
    u = rng.normal(0, 1, (k, t, 1)).astype(np.float32)
    x[:, 0] = rng.normal(0, 1, (k, 2))
    for i in range(t - 1):
        q, v = x[:, i, 0], x[:, i, 1]
        x[:, i + 1, 0] = q + 0.05 * v
        x[:, i + 1, 1] = v + 0.05 * (-q - 0.3 * v + u[:, i, 0])
    return TrajData(x, u, 0.05, ["q", "v"], ["u"], "osc")


def test_finetune_ar_recipe_sets_the_increment_scale_and_mode():
    tr, va = _trajs(), _trajs(3, seed=1)
    init = DynamicsFM(ModelConfig(**TINY))
    cfg = FinetuneConfig(steps=6, batch_size=4, seq_len=16, val_every=3, rollout_mode="ar", mask_prob=0.0,
                         increment_scale=True, pushforward=1, loss_scale="increment", val_rollout=(8, 8))
    model, hist = finetune(init, tr, va, cfg)
    inc = np.diff(tr.x, axis=1).reshape(-1, 2).std(0) / model.x_std[:2].numpy()
    assert np.allclose(model.dx_scale[:2].numpy(), inc, rtol=1e-4)
    assert model.rollout_mode == "ar"
    assert all(np.isfinite(r["val_loss"]) for r in hist)
    with pytest.raises(ValueError, match="pushforward"):
        FinetuneConfig(pushforward=-1)
    with pytest.raises(ValueError, match="loss_scale"):
        FinetuneConfig(loss_scale="volts")
    with pytest.raises(ValueError, match="rollout_mode"):
        FinetuneConfig(rollout_mode="beam")


def test_pushforward_pass_sees_the_previous_predictions():
    model = _model(seed=5).train()
    rng = np.random.default_rng(0)
    spec = BatchSpec(batch_size=3, seq_len=12, patch=2, n_max=6, m_max=2, noise_std=0.0, mask_prob=0.0)
    b = make_batch(rng, spec, {"n_range": (2, 4), "m_range": (1, 2)})
    base = FinetuneConfig(pushforward=0)
    l0 = _train_loss(model, b, base, lead=1)
    l1 = _train_loss(model, b, FinetuneConfig(pushforward=1), lead=1)
    # the second pass on the model's own one-step predictions has a larger error than teacher forcing
    assert l1.item() > l0.detach().item()
    l1.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_per_sample_normalised_batches():
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 3.0, (4, 50, 6)).astype(np.float32)
    u = rng.normal(-1.0, 0.2, (4, 50, 2)).astype(np.float32)
    sm = np.zeros((4, 6), np.float32)
    sm[:, :3] = 1
    im = np.zeros((4, 2), np.float32)
    im[:, :1] = 1
    xn, un, dx = normalise_per_sample(x, u, sm, im)
    assert np.allclose(xn[..., :3].mean(1), 0, atol=1e-5) and np.allclose(xn[..., :3].std(1), 1, atol=1e-4)
    assert (xn[..., 3:] == 0).all() and (un[..., 1:] == 0).all()
    assert np.allclose(dx[:, :3], np.diff(xn[..., :3], axis=1).std(1), rtol=1e-5)
    assert (dx[:, 3:] == 1).all()
    spec = BatchSpec(batch_size=4, seq_len=20, patch=2, n_max=6, m_max=2, normalize=True)
    b = make_batch(np.random.default_rng(0), spec, {"n_range": (1, 6), "m_range": (0, 2)})
    assert b["dx_scale"].shape == (4, 6) and torch.isfinite(b["dx_scale"]).all()


def test_lora_trains_low_rank_updates_and_merges_to_the_plain_architecture():
    from fm_core.lora import add_lora, merge_lora

    torch.manual_seed(0)
    model = DynamicsFM(ModelConfig(**TINY))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = add_lora(model, rank=2)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    trained = ("embed.", "head.", "ln_f.")
    assert names and all(n.startswith(trained) or n.endswith((".a", ".b")) for n in names)
    # B starts at zero: the parametrised model computes exactly the pretrained one
    x = torch.randn(2, 6, 6)
    u = torch.randn(2, 6, 2)
    sm, im = torch.ones(6), torch.ones(2)
    ref = DynamicsFM(ModelConfig(**TINY))
    ref.load_state_dict(before)
    obs = torch.ones(2, 6)
    assert torch.allclose(model(x, u, obs, sm, im), ref(x, u, obs, sm, im), atol=1e-6)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    out = model(x, u, torch.ones(2, 6), sm, im)
    merge_lora(model)
    assert set(model.state_dict()) == set(before)  # the plain checkpoint layout again
    assert torch.allclose(model(x, u, torch.ones(2, 6), sm, im), out, atol=1e-5)
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert any(k.startswith("blocks.") and k.endswith("weight") for k in changed)
    assert not any(k.startswith("blocks.") and k.endswith("bias") for k in changed)  # biases frozen
    with pytest.raises(ValueError, match="rank"):
        add_lora(DynamicsFM(ModelConfig(**TINY)), rank=0)


@pytest.mark.parametrize("mode,mix", [("lora", 0.0), ("full", 0.5)])
def test_finetune_lora_and_synthetic_mix(mode, mix):
    tr, va = _trajs(), _trajs(3, seed=1)
    init = DynamicsFM(ModelConfig(**TINY))
    cfg = FinetuneConfig(steps=4, batch_size=4, seq_len=16, val_every=2, rollout_mode="ar", mask_prob=0.0,
                         increment_scale=True, mode=mode, lora_rank=2, synthetic_mix=mix, val_rollout=(8, 8))
    model, hist = finetune(init, tr, va, cfg)
    assert set(model.state_dict()) == set(init.state_dict())
    assert all(np.isfinite(r["val_loss"]) for r in hist)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), init.state_dict().values(),
                                                     strict=True))
    with pytest.raises(ValueError, match="synthetic_mix"):
        FinetuneConfig(synthetic_mix=1.0)


@pytest.fixture(scope="module")
def ar_pair(tmp_path_factory):
    """A tiny ``ar`` model exported with its fused (``buffer``) step graph: (checkpoint model, full, step)."""
    d = tmp_path_factory.mktemp("ar_pair")
    model = _model(seed=3)
    meta = {"n": 4, "m": 1, "dt": 0.01, "train": {"config": {"rollout_mode": "ar"}}}
    res = export_checkpoint(save_checkpoint(d / "ar.pt", model, meta), d / "ar.onnx", streaming=d / "s.onnx",
                            context=16)
    return model, res.full_path, res.step_path


def test_in_place_rollout_buffers_are_reused_without_stale_state(ar_pair):
    import export.onnx_runtime as rt

    model, full, step = ar_pair
    pred = OnnxPredictor(full, step)
    assert pred.step_meta.step_cache == "buffer"
    sys = model.for_system(4, 1)
    # the same predictor answers requests of different shapes in a row; every answer equals torch's
    for b, lx, h in ((3, 10, 12), (1, 6, 3), (3, 10, 12), (5, 4, 20)):
        x, uc, uf = _data(b, lx, h, seed=b + h)
        got = pred.rollout_windows(x, uc, uf)
        assert rel_err(got, rollout_ar(sys, x, uc, uf).numpy()) < 1e-4
        plans = np.concatenate([uf, -uf])
        shared = pred.rollout(x[0], uc[0], plans)
        want = rollout_ar(sys, np.repeat(x[:1], 2 * b, 0), np.repeat(uc[:1], 2 * b, 0), plans).numpy()
        assert rel_err(shared, want) < 1e-4
    cache = pred._local.ar
    assert 1 <= len(cache) <= 2  # bounded: the two most recent request shapes
    # the buffered steps compute exactly what the step graph does on grown copies of the cache
    x, uc, uf = _data(4, 9, 7, seed=7)
    assert np.array_equal(pred.rollout_windows(x, uc, uf), stepped_ar_rollout(pred, x, uc, uf))
    # rows are rolled out in chunks of AR_CHUNK_ROWS: chunking changes nothing
    old = rt.AR_CHUNK_ROWS
    try:
        rt.AR_CHUNK_ROWS = 3
        chunked = pred.rollout_windows(x, uc, uf)
        chunked_shared = pred.rollout(x[0], uc[0], np.repeat(uf, 2, 0))
    finally:
        rt.AR_CHUNK_ROWS = old
    assert np.array_equal(chunked, pred.rollout_windows(x, uc, uf))
    assert np.array_equal(chunked_shared, pred.rollout(x[0], uc[0], np.repeat(uf, 2, 0)))


def test_rollout_buffers_are_per_thread(ar_pair):
    import threading

    _, full, step = ar_pair
    pred = OnnxPredictor(full, step)
    jobs = [_data(b, 8, 10, seed=b) for b in (2, 3)]
    want = [pred.rollout_windows(*job) for job in jobs]
    got: dict[int, list[np.ndarray]] = {0: [], 1: []}

    def work(i: int) -> None:
        for _ in range(20):
            got[i].append(pred.rollout_windows(*jobs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert len(got[i]) == 20 and all(np.array_equal(g, want[i]) for g in got[i])


def test_rollout_buffers_refuse_what_does_not_fit(ar_pair):
    from export.kv_slots import RolloutBuffers

    _, full, step = ar_pair
    pred = OnnxPredictor(full, step)
    rb = RolloutBuffers(pred.step_sess, pred.meta, rows=2, capacity=4)
    me = pred.meta
    k = np.zeros((me.n_layers, 2, me.n_heads, 5, me.d_head), np.float32)
    with pytest.raises(ValueError, match="exceeds the rollout capacity 4"):
        rb.load(k, k)
    with pytest.raises(ValueError, match="neither 1 nor the 2 rollout rows"):
        rb.load(k[:, :, :, :3].repeat(2, 1), k[:, :, :, :3].repeat(2, 1))
    rb.load(k[:, :1, :, :3], k[:, :1, :, :3])  # one shared history for both rows
    assert rb.step().shape == (2, me.n_model) and rb.len == 4
    with pytest.raises(ValueError, match="rollout cache full"):
        rb.step()
    with pytest.raises(ValueError, match="rows and capacity"):
        RolloutBuffers(pred.step_sess, pred.meta, rows=0, capacity=4)
