"""`rigfm pretrain`, `rigfm finetune`, `rigfm generate` (torch is imported inside the handlers only)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fm_core.cli_types import (
    SEED,
    add_options,
    add_set_option,
    int_range,
    option_argv,
    option_values,
    options_from_args,
    parse_kv,
)
from fm_core.train_configs import FinetuneConfig, PretrainOptions

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default.pt"


def register(subparsers) -> None:
    """Add pretrain / finetune / generate to the umbrella parser."""
    p = subparsers.add_parser("pretrain", help="pretrain the foundation model on synthetic RKHS dynamics")
    add_options(p, PretrainOptions)
    add_set_option(p, "override a config value, e.g. --set train.steps=200", parse=False)
    p.add_argument("--nproc", type=int_range(1, 1024), default=1,
                   help="DDP processes (relaunches itself under torchrun; gloo on CPU, nccl on GPU)")
    p.set_defaults(func=_pretrain)

    f = subparsers.add_parser("finetune", help="fine-tune (or train from scratch) on a trajectory .npz file")
    f.add_argument("--init", default=str(DEFAULT_WEIGHTS),
                   help="initial checkpoint (default: the shipped fm_core/weights/default.pt), or 'none' to "
                        "train a specialist from scratch")
    f.add_argument("--data", required=True, help="trajectory .npz (fm_core.trajfile; splits train/val)")
    f.add_argument("--replay", default=None, metavar="DATA",
                   help="trajectory .npz whose train split is mixed into every batch (--replay-mix): the "
                        "data the --init model was fitted on, so an update on a short run keeps what that "
                        "run cannot show")
    add_options(f, FinetuneConfig)
    add_set_option(f, "FinetuneConfig field override, e.g. --set batch_size=16", parse=False)
    f.add_argument("--out", default="runs/ft", help="output dir (finetuned.pt, history.json)")
    f.add_argument("--context", type=int_range(1, 65_536), default=32,
                   help="context steps for the test evaluation")
    f.add_argument("--horizon", type=int_range(1, 65_536), default=32,
                   help="rollout horizon for the test evaluation")
    f.add_argument("--angle-features", choices=("auto", "raw", "sincos"), default="auto",
                   help="pendulum angle as logged, or as (sin, cos) (an exported sincos model still takes "
                        "and returns raw states); auto (default): as the --init checkpoint has it, raw "
                        "for --init none")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_finetune)

    g = subparsers.add_parser("generate", help="write a sharded synthetic RKHS corpus")
    g.add_argument("--out", required=True, help="output directory for the shards")
    g.add_argument("--trajectories", type=int_range(1, 10**9), default=10000, help="number of trajectories")
    g.add_argument("--shard-size", type=int_range(1, 10**9), default=1000, help="trajectories per shard")
    g.add_argument("--seed", type=SEED, default=0)
    add_set_option(g, "RKHSConfig field override, e.g. --set T=512", parse=False)
    g.set_defaults(func=_generate)


def _pretrain(args: argparse.Namespace) -> int:
    from fm_core.config import ConfigError, load_config

    try:
        load_config(args.config, args.overrides)  # validate before spawning anything
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fwd = option_argv(options_from_args(PretrainOptions, args))
    for o in args.overrides:
        fwd += ["--set", o]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", "-m", "fm_core.train", *fwd]
        return subprocess.call(cmd)
    from fm_core.train import main

    return main(fwd)


# what a fine-tuned checkpoint's recipe fixes about the model: re-fine-tuning it (the flywheel) keeps these
# unless given with --set (a masked-trained model stays masked, an autoregressive one autoregressive)
RECIPE_KEYS = ("rollout_mode", "increment_scale", "noise_std", "mask_prob", "loss_scale")


def inherited_recipe(init: str | None, given: set[str]) -> dict:
    """The ``RECIPE_KEYS`` of the init checkpoint's own fine-tuning config that ``given`` does not set ({} for
    a pretrained or missing checkpoint)."""
    if not init or not Path(init).is_file():
        return {}
    from fm_core.checkpoint import load_checkpoint

    train = (load_checkpoint(init)[1].get("train") or {})
    conf = train.get("config") if train.get("kind") == "finetune" else None
    if not isinstance(conf, dict):
        return {}
    return {k: conf[k] for k in RECIPE_KEYS if k in conf and k not in given}


def resolve_angle_features(choice: str, init: str | None) -> str:
    """``auto`` -> the layout of the init checkpoint (``sincos`` if it records angle channels, else ``raw``).

    An explicit choice that differs from the init checkpoint's is allowed (the model re-learns what its
    state channels mean) and said on stderr."""
    if init is None:
        return "raw" if choice == "auto" else choice
    from fm_core.checkpoint import load_checkpoint

    _, meta = load_checkpoint(init)
    has = "sincos" if meta.get("angle_channels") else "raw"
    if choice == "auto":
        return has
    if choice != has:
        print(f"note: --init {init} was trained with angle features {has!r}; fine-tuning it with {choice!r} "
              "changes what its state channels mean (it re-learns them)", file=sys.stderr)
    return choice


DEFAULT_REPLAY_MIX = 0.5


def _replay_set(path: str, train: Any) -> Any:
    """The train split of the replay file, checked against the fine-tuning data's layout."""
    from fm_core.trajfile import load_trajectories, split_trajectories

    rp = split_trajectories(load_trajectories(path), "train")
    if list(rp.state_names) != list(train.state_names) or list(rp.input_names) != list(train.input_names):
        raise ValueError(f"--replay {path}: states {rp.state_names} / inputs {rp.input_names} differ from "
                         f"--data's {train.state_names} / {train.input_names}")
    if rp.dt and train.dt and abs(rp.dt - train.dt) > 1e-9:
        raise ValueError(f"--replay {path}: dt {rp.dt} differs from --data's {train.dt}")
    return rp


def _finetune(args: argparse.Namespace) -> int:
    from fm_core.checkpoint import CheckpointError
    from fm_core.finetune import evaluate_mse, finetune, save_finetuned
    from fm_core.train_report import plot_loss_curve
    from fm_core.trajfile import TrajectoryFileError, load_trajectories, split_trajectories

    try:
        kv = {**parse_kv(args.overrides), **option_values(FinetuneConfig, args, changed_only=True)}
        init = None if str(args.init).lower() == "none" else args.init
        inherited = inherited_recipe(init, set(kv))
        if inherited:
            print("note: continuing the --init checkpoint's fine-tuning recipe ("
                  + ", ".join(f"{k}={v}" for k, v in inherited.items()) + "; --set KEY=VALUE to change)",
                  file=sys.stderr)
        if args.replay and "replay_mix" not in kv:
            kv["replay_mix"] = DEFAULT_REPLAY_MIX
        cfg = FinetuneConfig.from_dict({**inherited, **kv})
        ts = load_trajectories(args.data)
        train = split_trajectories(ts, "train")
        val = split_trajectories(ts, "val")
        replay = _replay_set(args.replay, train) if args.replay else None
        raw_names = list(train.state_names)
        angles = resolve_angle_features(args.angle_features, init)
        codec = None
        if angles == "sincos":
            from fm_core.angle_features import rig_angle_codec

            codec = rig_angle_codec(train.rig, train)
            train, val = codec.encode_data(train), codec.encode_data(val)
            replay = codec.encode_data(replay) if replay is not None else None
        model, history = finetune(init, train, val, cfg, progress=not args.no_progress, replay_set=replay)
    except (ValueError, TrajectoryFileError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = save_finetuned(out / "finetuned.pt", model, train, history, cfg,
                          extra={"init": str(init), "data": str(args.data), "replay": args.replay,
                                 "angle_features": angles},
                          angle_channels=list(codec.channels) if codec else None, raw_state_names=raw_names)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    title = f"fine-tuning ({cfg.mode}, fraction {cfg.fraction}{', sin/cos angle' if codec else ''})"
    plot_loss_curve(history, out / "loss_curve.png", title=title)
    report = {"checkpoint": str(ckpt), **getattr(model, "finetune_info", {})}
    try:
        test = split_trajectories(ts, "test")
        test = codec.encode_data(test) if codec else test  # scores in the model's (sin, cos) units then
        report["test"] = evaluate_mse(model, test, args.context, args.horizon)
        report["test"]["state_space"] = angles
        report["test"].pop("per_step_mse", None)
    except ValueError as exc:
        report["test"] = f"skipped: {exc}"
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fm_core.rkhs import RKHSConfig, write_corpus

    try:
        cfg = RKHSConfig.from_dict(parse_kv(args.overrides))
        paths = write_corpus(args.out, args.trajectories, shard_size=args.shard_size, seed=args.seed, cfg=cfg)
    except (TypeError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.trajectories} trajectories (T={cfg.T}) in {len(paths)} shard(s) to {args.out}")
    return 0
