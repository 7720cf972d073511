"""Fine-tuning from trajectory files, head-only mode, fractions, rollouts, evaluation, CLI and bad input."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from fm_core import train_commands
from fm_core.checkpoint import load_checkpoint
from fm_core.config import load_config
from fm_core.finetune import FinetuneConfig, evaluate_mse, finetune, rollout
from fm_core.train import pretrain
from fm_core.trajfile import TrajectoryFileError, load_trajectories, save_trajectories, split_trajectories

TINY = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=64)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _simulate(k: int, t: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A damped driven pendulum on a cart-like offset: n = 4, m = 1, physical-looking scales."""
    rng = np.random.default_rng(seed)
    dt = 0.02
    x = np.zeros((k, t, 4))
    u = np.cumsum(rng.normal(0, 0.5, (k, t, 1)), axis=1).clip(-6, 6)
    s = np.stack([rng.uniform(-0.2, 0.2, k), rng.uniform(2.5, 3.8, k), np.zeros(k), np.zeros(k)], 1)
    for i in range(t):
        x[:, i] = s
        acc = 0.8 * u[:, i, 0] - 2.0 * s[:, 2]
        th_acc = -9.81 * np.sin(s[:, 1]) - 0.3 * s[:, 3] + 0.5 * acc * np.cos(s[:, 1])
        s = s + dt * np.stack([s[:, 2], s[:, 3], acc, th_acc], 1)
    return x.astype(np.float32), u.astype(np.float32)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    x, u = _simulate(30, 80, 0)
    split = ["train"] * 20 + ["val"] * 5 + ["test"] * 5
    path = tmp_path_factory.mktemp("data") / "rig.npz"
    save_trajectories(path, x, u, 0.02, ["p", "theta", "p_dot", "theta_dot"], ["voltage"], split,
                      [f"run{i}" for i in range(30)], "cartpole")
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(load_config(None, [f"model.{k}={v}" for k, v in TINY.items()] + [
            "train.steps=15", "data.batch_size=8", "data.seq_len=32", "data.num_workers=0",
            "data.val_batches=1", "train.warmup_steps=3"]), out, progress=False)
    finally:
        torch.set_num_threads(old)
    return out / "final.pt"


def _cfg(**kw) -> FinetuneConfig:
    base = dict(steps=30, val_every=10, batch_size=8, seq_len=24, val_windows=8, patience=100, model=TINY)
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_sets_normalisation_and_improves(data_file, pretrained):
    ts = load_trajectories(data_file)
    train, val = split_trajectories(ts, "train"), split_trajectories(ts, "val")
    model, hist = finetune(pretrained, train, val, _cfg(steps=40, lr=1e-3))
    flat = train.x.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(model.x_mean[:4].numpy(), flat.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.x_std[:4].numpy(), flat.std(0), rtol=1e-4)
    assert model.x_std[4:].tolist() == [1.0, 1.0], "padded channels stay identity"
    vals = [h["val_loss"] for h in hist]
    assert vals[-1] < vals[0], vals
    info = model.finetune_info
    assert math.isclose(info["best_val_loss"], min(vals)), "the best model (by val loss) is returned"
    scores = evaluate_mse(model, split_trajectories(ts, "test"), context=16, horizon=16)
    assert np.isfinite(scores["one_step_mse"]) and np.isfinite(scores["multi_step_mse"])
    assert len(scores["per_step_mse"]) == 16 and scores["windows"] == 5 * 2


def test_head_mode_freezes_the_transformer(data_file, pretrained):
    ts = load_trajectories(data_file)
    init, _ = load_checkpoint(pretrained)
    model, _ = finetune(pretrained, split_trajectories(ts, "train"), split_trajectories(ts, "val"),
                        _cfg(mode="head", steps=10, val_every=5, lr=1e-2))
    a, b = init.state_dict(), model.state_dict()
    for k in a:
        if k.startswith("blocks.") or k.startswith("ln_f."):
            assert torch.equal(a[k], b[k]), f"{k} must stay frozen"
    assert not torch.equal(a["head.fc2.weight"], b["head.fc2.weight"])
    assert not torch.equal(a["embed.fc1.weight"], b["embed.fc1.weight"])


def test_fraction_subsamples_and_scratch_training_works(data_file):
    ts = load_trajectories(data_file)
    model, hist = finetune(None, split_trajectories(ts, "train"), split_trajectories(ts, "val"),
                           _cfg(fraction=0.1, steps=10, val_every=5))
    assert model.finetune_info["n_train_trajectories"] == 2
    assert hist[-1]["step"] == 10 and all(np.isfinite(h["val_loss"]) for h in hist)
    m2, _ = finetune(None, split_trajectories(ts, "train"), None, _cfg(fraction=0.1, steps=10, val_every=5))
    torch.testing.assert_close(m2.x_mean, model.x_mean)  # same seed -> same subsample


def test_rollout_is_causal_in_the_planned_inputs(data_file, pretrained):
    model, _ = load_checkpoint(pretrained)
    ts = load_trajectories(data_file)
    x, u = ts.x[:3], ts.u[:3]
    L, H = 10, 12
    pred = rollout(model, x[:, :L], u[:, : L - 1], u[:, L - 1 : L - 1 + H])
    assert pred.shape == (3, H, 4)
    u2 = u.copy()
    u2[:, L - 1 + 5] += 3.0
    pred2 = rollout(model, x[:, :L], u[:, : L - 1], u2[:, L - 1 : L - 1 + H])
    torch.testing.assert_close(pred2[:, :5], pred[:, :5])
    assert (pred2[:, 5:] - pred[:, 5:]).abs().max() > 1e-5
    # the one-pass rollout equals the masked full forward of the fixed-system module
    sys_model = model.for_system(4, 1)
    xx = torch.cat([torch.as_tensor(x[:, :L]), torch.zeros(3, H - 1, 4)], 1)
    uu = torch.as_tensor(u[:, : L - 1 + H])
    obs = torch.cat([torch.ones(3, L), torch.zeros(3, H - 1)], 1)
    with torch.no_grad():
        torch.testing.assert_close(sys_model(xx, uu, obs)[:, L - 1 :], pred)
    single = rollout(model, x[0, :L], u[0, : L - 1], u[0, L - 1 : L - 1 + H])
    torch.testing.assert_close(single, pred[0])
    with pytest.raises(ValueError, match=r"u_ctx must be \(B,L-1,m\)"):
        rollout(model, x[:, :L], u[:, :L], u[:, L : L + H])


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    train_commands.register(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_finetune_cli_writes_checkpoint_with_meta(data_file, pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    rc = _cli(["finetune", "--init", str(pretrained), "--data", str(data_file), "--fraction", "0.5",
               "--mode", "full", "--steps", "10", "--set", "val_every=5", "--set", "seq_len=24",
               "--set", "batch_size=8", "--out", str(out), "--context", "16", "--horizon", "16",
               "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_train_trajectories"] == 10 and np.isfinite(report["test"]["multi_step_mse"])
    raw = torch.load(out / "finetuned.pt", weights_only=True)
    meta = raw["meta"]
    assert (meta["n"], meta["m"], meta["rig"], meta["dt"]) == (4, 1, "cartpole", 0.02)
    assert meta["state_names"] == ["p", "theta", "p_dot", "theta_dot"] and meta["input_names"] == ["voltage"]
    assert meta["train"]["config"]["fraction"] == 0.5
    assert (out / "loss_curve.png").is_file() and (out / "history.json").is_file()


def test_bad_training_files_give_clear_errors(tmp_path, capsys, pretrained):
    x, u = _simulate(4, 20, 1)
    x[1, 3, 2] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, x=x, u=u, dt=0.02, state_names=np.array(["a", "b", "c", "d"]), input_names=np.array(["v"]),
             split=np.array(["train", "train", "val", "test"]), source=np.array(["r0", "r1", "r2", "r3"]),
             rig=np.array("cartpole"), format_version=np.int64(1))
    with pytest.raises(TrajectoryFileError) as ei:
        load_trajectories(bad)
    assert "nan.npz" in str(ei.value) and "'x'" in str(ei.value)
    assert _cli(["finetune", "--init", "none", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nan.npz" in err and "x" in err
    # wrong dims handed to the Python API
    with pytest.raises(ValueError, match=r"train_set: field 'x' must be \(K,T,n\)"):
        finetune(None, argparse.Namespace(x=np.zeros((5, 4)), u=np.zeros((5, 1))), None, _cfg())
    with pytest.raises(ValueError, match="n=7.*n_max=6"):
        finetune(pretrained, argparse.Namespace(x=np.zeros((2, 20, 7)), u=np.zeros((2, 20, 1))), None, _cfg())
    with pytest.raises(ValueError, match="fraction"):
        FinetuneConfig(fraction=0.0)


def test_metric_matched_masking_hides_every_step_after_the_context():
    from fm_core.data import BatchSpec, windows_to_batch
    from fm_core.finetune import _mask_horizon

    rng = np.random.default_rng(0)
    spec = BatchSpec(batch_size=64, seq_len=20, patch=2, n_max=6, m_max=2, mask_prob=0.0)
    x = rng.normal(size=(64, 22, 6)).astype(np.float32)
    u = rng.normal(size=(64, 22, 2)).astype(np.float32)
    sm, im = np.ones((64, 6), np.float32), np.ones((64, 2), np.float32)
    b = windows_to_batch(rng, x, u, sm, im, spec)
    assert float(b["hidden"].sum()) == 0.0
    _mask_horizon(rng, b, 1.0, (5, 8), lead=1)
    ctx = b["ctx_len"].numpy()
    assert ctx.min() >= 5 and ctx.max() <= 8 and len(set(ctx.tolist())) > 1
    for i, c in enumerate(ctx):
        assert b["hidden"][i, :c].sum() == 0 and bool((b["hidden"][i, c:] == 1).all())
        assert bool((b["obs"][i, 1 + c :] == 0).all()) and bool((b["x"][i, 1 + c :] == 0).all())
        assert bool((b["obs"][i, 1 : 1 + c] == 1).all()) and bool((b["x"][i, 1 : 1 + c] != 0).all())
    b2 = windows_to_batch(rng, x, u, sm, im, spec)
    _mask_horizon(rng, b2, 0.0, (5, 8), lead=1)
    assert float(b2["hidden"].sum()) == 0.0 and bool((b2["ctx_len"] == 20).all())


def test_val_rollout_early_stopping_scores_the_open_loop_rollout(data_file, pretrained):
    from fm_core.metrics import metric_windows
    from fm_core.trajfile import normalisation_stats

    ts = load_trajectories(data_file)
    train, val = split_trajectories(ts, "train"), split_trajectories(ts, "val")
    cfg = _cfg(steps=20, lr=1e-3, mask_prob=1.0, mask_context=(10, 10), val_rollout=(10, 14))
    model, hist = finetune(pretrained, train, val, cfg)
    # step 0 is the pretrained model with the train normalisation: recompute its val rollout MSE by hand
    init, _ = load_checkpoint(pretrained)
    init.set_normalization(**normalisation_stats(train))
    vx, vu = metric_windows(val.x, val.u, 24)
    assert vx.shape == (5 * 3, 24, 4)
    pr = rollout(init, vx[:, :10], vu[:, :9], vu[:, 9:-1]).numpy()
    want = float(np.mean(((pr - vx[:, 10:]) / init.x_std[:4].numpy()) ** 2))
    assert math.isclose(hist[0]["val_loss"], want, rel_tol=1e-4)
    vals = [h["val_loss"] for h in hist]
    assert math.isclose(model.finetune_info["best_val_loss"], min(vals))
    with pytest.raises(ValueError, match="val_rollout context\\+horizon=90"):
        finetune(pretrained, train, val, _cfg(val_rollout=(40, 50)))
    with pytest.raises(ValueError, match="mask_context"):
        FinetuneConfig(mask_context=(0, 5))
    with pytest.raises(ValueError, match="mask_prob"):
        FinetuneConfig(mask_prob=1.5)


def test_refinetuning_keeps_the_init_checkpoints_recipe_unless_set(data_file, pretrained, tmp_path, capsys):
    """The flywheel re-fine-tunes a rig model: an autoregressive, increment-scaled one stays so (a note says
    so); --set overrides a key; a pretrained init inherits nothing."""
    common = ["--data", str(data_file), "--steps", "4", "--set", "val_every=2", "--set", "seq_len=24",
              "--set", "batch_size=4", "--context", "8", "--horizon", "8", "--no-progress"]
    v1 = tmp_path / "v1"
    assert _cli(["finetune", "--init", str(pretrained), *common, "--set", "rollout_mode=ar",
                 "--set", "increment_scale=true", "--set", "noise_std=0.03", "--set", "mask_prob=0",
                 "--out", str(v1)]) == 0
    assert "continuing" not in capsys.readouterr().err
    v2 = tmp_path / "v2"
    assert _cli(["finetune", "--init", str(v1 / "finetuned.pt"), *common, "--set", "noise_std=0.01",
                 "--out", str(v2)]) == 0
    err = capsys.readouterr().err
    assert "continuing the --init checkpoint's fine-tuning recipe" in err and "rollout_mode=ar" in err
    conf = torch.load(v2 / "finetuned.pt", weights_only=True)["meta"]["train"]["config"]
    assert (conf["rollout_mode"], conf["increment_scale"], conf["mask_prob"]) == ("ar", True, 0)
    assert conf["noise_std"] == 0.01  # given with --set: not inherited


def test_l2sp_keeps_the_weights_near_the_pretrained_ones_and_ema_returns_the_average(data_file, pretrained):
    ts = load_trajectories(data_file)
    train = split_trajectories(ts, "train")
    init, _ = load_checkpoint(pretrained)

    def dist(model) -> float:
        with torch.no_grad():
            return float(sum(((a - b) ** 2).sum() for a, b in zip(model.parameters(), init.parameters(),
                                                                    strict=True)))

    free, _ = finetune(pretrained, train, None, _cfg(steps=30, lr=3e-3))
    pulled, _ = finetune(pretrained, train, None, _cfg(steps=30, lr=3e-3, l2sp=1e3))
    assert dist(pulled) < 0.5 * dist(free)
    # the average starts at the first step's weights; with a decay of ~1 it stays there: the model returned
    # is the one-step model (the first step is the same under every schedule length: warm-up), not the last
    one, _ = finetune(pretrained, train, None, _cfg(steps=1, lr=3e-3))
    last, _ = finetune(pretrained, train, None, _cfg(steps=3, lr=3e-3))
    avg, _ = finetune(pretrained, train, None, _cfg(steps=3, lr=3e-3, ema=1.0 - 1e-9))
    for a, b in zip(avg.parameters(), one.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert dist(last) > dist(avg)
    with pytest.raises(ValueError, match="ema"):
        FinetuneConfig(ema=1.0)
    with pytest.raises(ValueError, match="l2sp"):
        FinetuneConfig(l2sp=-1.0)


def test_dropout_acts_only_while_training_and_weight_decay_shrinks_the_weights(data_file, pretrained):
    ts = load_trajectories(data_file)
    train = split_trajectories(ts, "train")
    model, _ = load_checkpoint(pretrained)
    fixed = model.for_system(4, 1)
    x, u = torch.as_tensor(train.x[:2, :20]), torch.as_tensor(train.u[:2, :20])
    obs = torch.ones(2, 20)
    model.set_dropout(0.5)
    model.train()
    assert not torch.allclose(fixed(x, u, obs), fixed(x, u, obs))  # two different dropout masks
    model.eval()
    torch.testing.assert_close(fixed(x, u, obs), fixed(x, u, obs))
    model.set_dropout(0.0)
    model.train()
    torch.testing.assert_close(fixed(x, u, obs), fixed(x, u, obs))

    def norm(m) -> float:
        return float(sum((q.detach() ** 2).sum() for q in m.parameters()))

    plain, _ = finetune(pretrained, train, None, _cfg(steps=20, lr=3e-3))
    decayed, _ = finetune(pretrained, train, None, _cfg(steps=20, lr=3e-3, weight_decay=50.0))
    assert norm(decayed) < 0.8 * norm(plain)
    dropped, _ = finetune(pretrained, train, None, _cfg(steps=3, lr=3e-3, dropout=0.3))
    assert all(b.drop.p == 0.0 for b in dropped.blocks)  # the returned model carries no training setting
    with pytest.raises(ValueError, match="dropout"):
        FinetuneConfig(dropout=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        FinetuneConfig(weight_decay=float("nan"))
    with pytest.raises(ValueError, match="dropout must be in"):
        model.set_dropout(-0.1)


def test_refinetuning_a_rig_model_keeps_its_normalisation(data_file, pretrained, tmp_path):
    """A flywheel update fits a rig model on a short run that covers a narrow slice of the state space: the
    model keeps the scales it was fitted with (auto, for a fine-tuned init), unless told to refit ("data");
    a pretrained init always gets the data's; "keep" without an init is a clear error."""
    from fm_core.finetune import save_finetuned

    ts = load_trajectories(data_file)
    train, val = split_trajectories(ts, "train"), split_trajectories(ts, "val")
    v1, hist = finetune(pretrained, train, val, _cfg(steps=10, val_every=5, increment_scale=True))
    ckpt = save_finetuned(tmp_path / "v1.pt", v1, train, hist, _cfg(increment_scale=True))
    narrow = split_trajectories(ts, "train")
    narrow.x = narrow.x[:, :, :] * 0.05 + np.array([0.0, np.pi, 0.0, 0.0], np.float32)  # a balance-like slice
    kept, _ = finetune(ckpt, narrow, val, _cfg(steps=4, val_every=2, increment_scale=True))
    for buf in ("x_mean", "x_std", "u_mean", "u_std", "dx_scale"):
        torch.testing.assert_close(getattr(kept, buf), getattr(v1, buf), msg=f"{buf} must be kept")
    refit, _ = finetune(ckpt, narrow, val, _cfg(steps=4, val_every=2, increment_scale=True,
                                                 normalisation="data"))
    np.testing.assert_allclose(refit.x_std[:4].numpy(), narrow.x.reshape(-1, 4).std(0), rtol=1e-4)
    fresh, _ = finetune(pretrained, narrow, val, _cfg(steps=4, val_every=2))
    np.testing.assert_allclose(fresh.x_std[:4].numpy(), narrow.x.reshape(-1, 4).std(0), rtol=1e-4)
    with pytest.raises(ValueError, match="normalisation='keep' needs an init model"):
        finetune(None, narrow, val, _cfg(steps=2, normalisation="keep"))
    with pytest.raises(ValueError, match="normalisation must be one of"):
        _cfg(normalisation="fresh")


def test_replay_keeps_the_fit_on_the_data_the_model_was_fitted_on(data_file, pretrained, tmp_path, capsys):
    """An update on a short run that shows little (here: the system held still) forgets the dynamics unless
    the original data is replayed in every batch; the CLI's --replay takes the replay file's train split
    (mix 0.5 by default) and refuses a file of another layout."""
    ts = load_trajectories(data_file)
    train, val, test = (split_trajectories(ts, s) for s in ("train", "val", "test"))
    v1, _ = finetune(pretrained, train, val, _cfg(steps=40, lr=1e-3))
    quiet = split_trajectories(ts, "train")
    quiet.x = np.repeat(quiet.x[:, :1], quiet.x.shape[1], axis=1)
    cfg = _cfg(steps=40, lr=3e-3, normalisation="keep")
    forgot, _ = finetune(v1, quiet, None, cfg)
    kept, _ = finetune(v1, quiet, None, _cfg(steps=40, lr=3e-3, normalisation="keep", replay_mix=0.5),
                       replay_set=train)
    assert kept.finetune_info["replay_rows_per_batch"] == 4
    err_forgot = evaluate_mse(forgot, test, context=16, horizon=16)["multi_step_mse"]
    err_kept = evaluate_mse(kept, test, context=16, horizon=16)["multi_step_mse"]
    assert err_kept < 0.8 * err_forgot, (err_kept, err_forgot)
    with pytest.raises(ValueError, match="replay_mix > 0 needs replay trajectories"):
        finetune(v1, quiet, None, _cfg(steps=2, replay_mix=0.5))

    common = ["--init", str(pretrained), "--data", str(data_file), "--steps", "4", "--set", "val_every=2",
              "--set", "seq_len=24", "--set", "batch_size=4", "--context", "8", "--horizon", "8",
              "--no-progress"]
    assert _cli(["finetune", *common, "--replay", str(data_file), "--out", str(tmp_path / "r")]) == 0
    meta = torch.load(tmp_path / "r" / "finetuned.pt", weights_only=True)["meta"]["train"]
    assert meta["replay"] == str(data_file) and meta["config"]["replay_mix"] == 0.5
    other = tmp_path / "other.npz"
    x, u = _simulate(6, 80, 1)
    save_trajectories(other, x[..., :3], u, 0.02, ["p", "theta", "p_dot"], ["voltage"], ["train"] * 6,
                      [f"r{i}" for i in range(6)], "cartpole")
    capsys.readouterr()
    assert _cli(["finetune", *common, "--replay", str(other), "--out", str(tmp_path / "bad")]) == 2
    assert "--replay" in capsys.readouterr().err
