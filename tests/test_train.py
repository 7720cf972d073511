"""Pretraining: batch semantics, determinism, overfitting, checkpoints, resume after a kill, config errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fm_core.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from fm_core.config import ConfigError, load_config
from fm_core.data import BatchSpec, SyntheticStream, make_batch, make_loader, masked_huber_loss
from fm_core.model import DynamicsFM, ModelConfig
from fm_core.rkhs import RKHSConfig, generate_batch
from fm_core.train import param_hash, pretrain

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "fm_core" / "configs" / "smoke.toml"
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=64)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _spec(**kw) -> BatchSpec:
    base = dict(batch_size=16, seq_len=20, patch=2, n_max=6, m_max=2, noise_std=0.0, mask_prob=0.5)
    base.update(kw)
    return BatchSpec(**base)


def test_batch_masking_semantics():
    spec = _spec()
    cfg = RKHSConfig()
    raw = generate_batch(np.random.default_rng(5), spec.batch_size, spec.seq_len + spec.patch, cfg)
    b = make_batch(np.random.default_rng(5), spec, cfg)
    lead, t = spec.patch - 1, spec.seq_len
    assert b["x"].shape == (16, t + lead, 6) and b["target"].shape == (16, t, 6)
    # targets are the clean next states x[lead + j + 1]
    clean_next = raw.x[:, spec.patch :] * b["state_mask"].numpy()[:, None]
    np.testing.assert_array_equal(b["target"].numpy(), clean_next)
    for i in range(16):
        L = int(b["ctx_len"][i])
        obs = b["obs"][i, lead:]
        assert torch.all(obs[:L] == 1) and torch.all(obs[L:] == 0), "obs = 1 exactly before context length"
        assert torch.all(b["hidden"][i] == (1 - obs)), "hidden marks the positions with obs = 0"
        assert torch.all(b["x"][i][b["obs"][i] == 0] == 0), "hidden states are zeroed"
        n, m = int(raw.n[i]), int(raw.m[i])
        assert b["state_mask"][i].tolist() == [1.0] * n + [0.0] * (6 - n)
        assert b["input_mask"][i].tolist() == [1.0] * m + [0.0] * (2 - m)
        # inputs stay at hidden positions (long-horizon prediction is conditioned on the planned inputs)
        np.testing.assert_array_equal(b["u"][i, lead:].numpy(), raw.u[i, lead : lead + t])
    assert (b["ctx_len"] < t).any() and (b["ctx_len"] == t).any(), "both masked and full-context samples"
    # history step: either the real previous step (r = 0) or zeroed (r = 1, like the inference front padding)
    hist_obs = b["obs"][:, 0]
    assert set(hist_obs.tolist()) == {0.0, 1.0}
    zeroed = hist_obs == 0
    assert torch.all(b["u"][zeroed, 0] == 0) and torch.all(b["x"][zeroed, 0] == 0)


def test_noise_only_on_observed_real_channels():
    spec = _spec(noise_std=0.1, mask_prob=1.0)
    clean = make_batch(np.random.default_rng(3), _spec(mask_prob=1.0), RKHSConfig())
    noisy = make_batch(np.random.default_rng(3), spec, RKHSConfig())
    diff = (noisy["x"] - clean["x"]).abs()
    obs = clean["obs"].unsqueeze(-1) * clean["state_mask"].unsqueeze(1)
    assert diff[obs > 0].mean() > 0.01
    assert torch.all(diff[obs == 0] == 0)
    torch.testing.assert_close(noisy["target"], clean["target"])


def test_stream_is_reproducible_and_independent_of_workers():
    spec = _spec(batch_size=4, seq_len=8)
    a = [b["x"] for _, b in zip(range(4), SyntheticStream(spec, {}, seed=1), strict=False)]
    loader = make_loader(SyntheticStream(spec, {}, seed=1), num_workers=2)
    b = [bb["x"] for _, bb in zip(range(4), loader, strict=False)]
    for x1, x2 in zip(a, b, strict=True):
        torch.testing.assert_close(x1, x2)
    c = next(iter(SyntheticStream(spec, {}, seed=2)))["x"]
    assert not torch.equal(a[0], c)
    other_rank = next(iter(SyntheticStream(spec, {}, seed=1, rank=1)))["x"]
    assert not torch.equal(a[0], other_rank), "ranks must see different data"


def test_overfits_one_tiny_batch():
    torch.manual_seed(0)
    model = DynamicsFM(TINY)
    b = make_batch(np.random.default_rng(0), _spec(batch_size=2, seq_len=12), RKHSConfig())
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)

    def loss_fn():
        pred = model(b["x"], b["u"], b["obs"], b["state_mask"], b["input_mask"], lead=1)
        return masked_huber_loss(pred, b["target"], b["state_mask"], b["hidden"])

    with torch.no_grad():
        first = float(loss_fn())
    for _ in range(150):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(loss_fn())
    assert last < first / 10, (first, last)


def _smoke(*extra: str):
    return load_config(SMOKE, list(extra))


def test_pretrain_is_deterministic_by_seed_and_writes_outputs(tmp_path):
    s1 = pretrain(_smoke("train.steps=6"), tmp_path / "a", progress=False)
    s2 = pretrain(_smoke("train.steps=6"), tmp_path / "b", progress=False)
    s3 = pretrain(_smoke("train.steps=6", "train.seed=1"), tmp_path / "c", progress=False)
    assert s1["param_hash"] == s2["param_hash"]
    assert s1["param_hash"] != s3["param_hash"]
    for f in ("final.pt", "last.pt", "metrics.csv", "metrics.json", "loss_curve.png", "config.json"):
        assert (tmp_path / "a" / f).is_file(), f
    assert (tmp_path / "a" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    hist = json.loads((tmp_path / "a" / "metrics.json").read_text())["history"]
    assert hist[-1]["step"] == 6 and np.isfinite(hist[-1]["val_loss"])


def test_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    model = DynamicsFM(TINY).eval()
    model.set_normalization([1.0, 2.0], [3.0, 4.0], [0.5], [2.0])
    meta = {"n": 2, "m": 1, "rig": "test", "state_names": ["a", "b"]}
    path = save_checkpoint(tmp_path / "m.pt", model, meta)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "rigfm-ckpt-v1" and raw["meta"]["x_std"][:2] == [3.0, 4.0]
    loaded, meta = load_checkpoint(path)
    assert meta["state_names"] == ["a", "b"] and meta["n"] == 2
    x, u, obs = torch.randn(2, 9, 2), torch.randn(2, 9, 1), torch.ones(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded.for_system(2, 1)(x, u, obs), model.for_system(2, 1)(x, u, obs))
    assert param_hash(loaded) == param_hash(model)
    # broken files give errors naming the file and field
    bad = dict(raw, format="other")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt.*'format'"):
        read_checkpoint(tmp_path / "bad.pt")
    nan_sd = {k: v.clone() for k, v in raw["state_dict"].items()}
    nan_sd["head.fc2.bias"][0] = float("nan")
    torch.save(dict(raw, state_dict=nan_sd), tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"state_dict\.head\.fc2\.bias.*NaN"):
        load_checkpoint(tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX file passed as checkpoint
    with pytest.raises(CheckpointError, match=r"model\.onnx: not a torch checkpoint"):
        load_checkpoint(tmp_path / "model.onnx")
    truncated = (tmp_path / "bad.pt").read_bytes()[:100]  # a zip header, then nothing: an interrupted copy
    (tmp_path / "cut.pt").write_bytes(truncated)
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot load checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    cfg = _smoke("train.steps=20", "train.ckpt_every=10")
    full = pretrain(cfg, tmp_path / "full", progress=False)

    def crashing(rng, batch, T, rk):
        crashing.calls += 1
        if crashing.calls > 16:  # 2 validation batches + 14 training batches, then "power loss"
            raise KeyboardInterrupt("simulated kill")
        return generate_batch(rng, batch, T, RKHSConfig.from_dict(rk))

    crashing.calls = 0
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "run", generator=crashing, progress=False)
    ck = read_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["train_state"]["step"] == 10 and not (tmp_path / "run" / "final.pt").exists()
    resumed = pretrain(cfg, tmp_path / "run", resume=True, progress=False)
    assert resumed["steps"] == 20
    assert resumed["param_hash"] == full["param_hash"]


def test_sigkill_then_resume_cli(tmp_path):
    """A real process killed with SIGKILL mid-run resumes from its last checkpoint and completes."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fm_core.train", "--config", str(SMOKE), "--out", str(out), "--no-progress",
            "--set", "train.steps=100000", "--set", "train.ckpt_every=5", "--set", "train.val_every=1000"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "last.pt").exists():
            time.sleep(0.2)
        assert (out / "last.pt").exists(), "no checkpoint written"
        time.sleep(0.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    step_killed = read_checkpoint(out / "last.pt")["train_state"]["step"]
    target = step_killed + 7
    args2 = args[:-4] + ["--set", f"train.steps={target}", "--set", "train.ckpt_every=5", "--resume"]
    res = subprocess.run(args2, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {out / 'last.pt'} at step {step_killed}" in res.stderr
    summary = json.loads(res.stdout)
    assert summary["steps"] == target and summary["completed"]
    assert (out / "final.pt").is_file()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key \[train\] 'lrate'"):
        _smoke("train.lrate=1")
    with pytest.raises(ConfigError, match=r"\[data\] batch_size must be an integer"):
        _smoke("data.batch_size=1.5")
    with pytest.raises(ConfigError, match=r"\[model\].*unknown key"):
        _smoke("model.width=3")
    with pytest.raises(ConfigError, match=r"\[rkhs\].*num_centres"):
        _smoke("rkhs.num_centres=0")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=1")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_config(bad)


def _cli(argv: list[str]) -> int:
    import argparse

    from fm_core import train_commands

    p = argparse.ArgumentParser()
    train_commands.register(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_pretrain_and_generate(tmp_path, capsys):
    rc = _cli(["pretrain", "--config", str(SMOKE), "--set", "train.steps=3", "--out", str(tmp_path / "p"),
               "--no-progress"])
    assert rc == 0 and (tmp_path / "p" / "final.pt").is_file()
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    bad = ["pretrain", "--config", str(SMOKE), "--set", "train.nope=1", "--out", str(tmp_path / "q")]
    assert _cli(bad) == 2
    assert "unknown key [train] 'nope'" in capsys.readouterr().err
    rc = _cli(["generate", "--out", str(tmp_path / "corpus"), "--trajectories", "10", "--shard-size", "4",
               "--set", "T=16"])
    assert rc == 0
    from fm_core.rkhs import read_corpus

    corpus = read_corpus(tmp_path / "corpus")
    assert corpus.x.shape == (10, 16, 6)
    assert _cli(["generate", "--out", str(tmp_path / "c2"), "--set", "num_centres=0"]) == 2
    assert "num_centres" in capsys.readouterr().err


def test_angle_variant_config_differs_from_the_mechanical_one_only_in_the_angle_share():
    mech = load_config(ROOT / "fm_core" / "configs" / "pretrain_mechanical.toml")
    ang = load_config(ROOT / "fm_core" / "configs" / "pretrain_angle.toml")
    assert ang.model == mech.model and ang.data == mech.data and ang.train == mech.train
    assert {k: v for k, v in ang.rkhs.items() if k != "angle_fraction"} == mech.rkhs
    assert RKHSConfig(**ang.rkhs).angle_fraction == 0.5
    spec = BatchSpec(batch_size=16, seq_len=16, patch=2, n_max=6, m_max=2)
    b = SyntheticStream(spec, rkhs=ang.rkhs, seed=0).batch(0)
    assert all(torch.isfinite(t).all() for t in b.values() if isinstance(t, torch.Tensor))


def test_mechanical_variant_config_differs_from_the_default_only_in_the_prior():
    base = load_config(ROOT / "fm_core" / "configs" / "pretrain_default.toml")
    mech = load_config(ROOT / "fm_core" / "configs" / "pretrain_mechanical.toml")
    assert mech.model == base.model and mech.data == base.data and mech.train == base.train
    assert RKHSConfig(**base.rkhs).mechanical_fraction == 0.0
    assert RKHSConfig(**mech.rkhs).mechanical_fraction == 0.5
    spec = BatchSpec(batch_size=16, seq_len=16, patch=2, n_max=6, m_max=2)
    b = SyntheticStream(spec, rkhs=mech.rkhs, seed=0).batch(0)
    assert all(torch.isfinite(t).all() for t in b.values() if isinstance(t, torch.Tensor))


def test_warm_start_from_a_checkpoint_and_named_errors(tmp_path):
    """[train] init: starts from the checkpoint's weights, fresh optimiser; bad inits are named."""
    pretrain(_smoke("train.steps=4"), tmp_path / "a", progress=False)
    src = tmp_path / "a" / "final.pt"
    cfg = _smoke("train.steps=1", f"train.init={str(src)!r}", "train.lr=1e-12", "train.warmup_steps=0")
    pretrain(cfg, tmp_path / "b", progress=False)
    a, b = read_checkpoint(src)["state_dict"], read_checkpoint(tmp_path / "b" / "final.pt")["state_dict"]
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-6  # lr ~0: the same weights
    pretrain(_smoke("train.steps=1", "train.lr=1e-12", "train.warmup_steps=0"), tmp_path / "r",
             progress=False)
    r = read_checkpoint(tmp_path / "r" / "final.pt")["state_dict"]  # the same run without init: random init
    assert max(float((a[k].float() - r[k].float()).abs().max()) for k in a) > 1e-3
    with pytest.raises(ValueError, match="init: checkpoint not found"):
        pretrain(_smoke("train.steps=1", "train.init='nope.pt'"), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="has another \\[model\\].*d_model"):
        pretrain(_smoke("train.steps=1", f"train.init={str(src)!r}", "model.d_model=48"), tmp_path / "d",
                 progress=False)


def test_one_schedule_warmup_then_cosine_to_the_floor():
    from fm_core.schedule import lr_factor, warmup_cosine

    assert [lr_factor(s, 4, 20, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20, 0.1) == 1.0 and math.isclose(lr_factor(12, 4, 20, 0.1), 0.55)
    assert math.isclose(lr_factor(20, 4, 20, 0.1), 0.1) and math.isclose(lr_factor(99, 4, 20, 0.1), 0.1)
    assert lr_factor(0, 0, 10, 0.0) == 1.0  # no warm-up
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, 4, 20, 0.1)
    seen = []
    for _ in range(21):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * lr_factor(s, 4, 20, 0.1) for s in range(21)])


def test_early_stopping_keeps_the_best_weights_and_names_why_it_stopped(monkeypatch):
    from fm_core import schedule
    from fm_core.schedule import EarlyStopping

    net = torch.nn.Linear(1, 1)
    stop = EarlyStopping(net, patience=2, max_minutes=0, min_delta=0.01)
    seen = []
    for step, (w, v) in enumerate([(1.0, 0.5), (2.0, 0.3), (3.0, 0.295), (4.0, 0.4)], start=1):
        net.weight.data.fill_(w)
        seen.append(stop.update(step, v))
    assert seen == [False, False, False, True] and stop.stop_reason == "patience"
    assert stop.best == 0.3 and stop.best_step == 2  # 0.295 is not better by more than min_delta
    stop.restore_best()
    assert float(net.weight) == 2.0
    timed = EarlyStopping(net, patience=99, max_minutes=1.0, min_delta=0.0, initial=1.0)
    assert not timed.update(1, 0.5) and timed.stop_reason == "step_cap"
    t = timed.t0
    monkeypatch.setattr(schedule.time, "time", lambda: t + 61.0)
    assert timed.timed_out() and timed.stop_reason == "time_cap"
