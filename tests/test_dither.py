"""Input dither for identification runs: a held random +-V added to balance commands, never to swing-up."""

from __future__ import annotations

import numpy as np
import pytest

import rigs
from controllers.cli import build_parser
from controllers.dither import Dither
from controllers.loop import ControlLoop
from controllers.lqr import LQRController
from controllers.simrig import SimulatedRig, run_lockstep
from controllers.swingup import SwingUpController


def test_dither_adds_a_held_random_sign_to_balance_commands_only(cart):
    cfg, model = cart
    lqr = LQRController(model, 0.002, cfg=cfg)
    d = Dither(LQRController(model, 0.002, cfg=cfg), 0.5, hold_s=0.0199, seed=3)
    x = np.array([0.01, 0.02, 0.0, 0.0])
    offsets = np.array([d.compute(x, 0.002 * k).u[0] - lqr.compute(x).u[0] for k in range(500)])
    np.testing.assert_allclose(np.abs(offsets), 0.5)
    assert (offsets > 0).any() and (offsets < 0).any()
    assert np.all(offsets.reshape(-1, 10) == offsets.reshape(-1, 10)[:, :1])  # held ~20 ms = 10 ticks
    swing = Dither(SwingUpController(model, cfg, 0.002), 0.5)
    hanging = np.asarray(model.hanging(), dtype=float) + np.array([0.0, 0.1, 0.0, 0.0])
    out = swing.compute(hanging, 0.0)
    assert out.mode == "swingup" and "dither_v" not in out.info
    with pytest.raises(ValueError, match="dither amplitude"):
        Dither(lqr, float("nan"))


def test_a_dithered_balance_stays_up_and_the_flag_reaches_both_commands(cart):
    cfg, model = cart
    sim = rigs.RigSimulator(cfg, seed=0)
    sim.reset(np.array([0.0, 0.03, 0.0, 0.0]))
    rig = SimulatedRig(sim, cfg)
    loop = ControlLoop(rig, Dither(LQRController(model, 0.002, cfg=cfg), 0.5), model, cfg, rate_hz=500)
    states = np.array(run_lockstep(loop, rig, 3.0))
    assert loop.fault is None and np.abs(states[500:, 1]).max() < np.deg2rad(3.0)
    assert build_parser().parse_args(["run", "cartpole", "--virtual", "--dither", "0.5"]).dither_v == 0.5
    assert build_parser().parse_args(["flywheel", "--dither", "0.3"]).dither_v == 0.3
