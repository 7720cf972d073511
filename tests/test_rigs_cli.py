"""`rigfm rig-info`: prints parameters, limits and linearisation eigenvalues; bad input gives exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from controllers.cli import main


@pytest.mark.parametrize("rig", ["cartpole", "furuta"])
def test_rig_info_text(rig, capsys):
    assert main(["rig-info", rig]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{rig} ({rig}) from {rig}.toml")
    assert "pendulum_mass" in out and "voltage_max" in out and "counts/rev" in out
    assert "linearisation at upright: eigenvalues" in out
    assert "controllability rank 4" in out


def test_rig_info_json_in_a_fresh_process_without_torch():
    code = ("import sys; from controllers.cli import main; rc = main(['rig-info', 'furuta', '--json']); "
            "assert 'torch' not in sys.modules, 'rig-info pulled torch'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    eig = np.array(info["eigenvalues_upright"])
    assert np.sum(eig[:, 0] > 1e-9) == 1  # exactly one unstable eigenvalue at upright
    assert info["controllability_rank_upright"] == 4
    assert info["encoders"]["counts_per_rev"] == [2048, 2048]
    assert info["physics"]["pendulum_mass"] == pytest.approx(0.024)


def test_rig_info_overrides_and_errors(capsys):
    assert main(["rig-info", "cartpole", "--json", "--set", "pole_mass_scale=2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["physics"]["pendulum_mass"] == pytest.approx(0.46)
    # `rigfm run` spells plant keys plant.NAME; the bare-key commands take that spelling too
    assert main(["rig-info", "cartpole", "--json", "--set", "plant.pole_mass_scale=2"]) == 0
    assert json.loads(capsys.readouterr().out)["physics"]["pendulum_mass"] == pytest.approx(0.46)
    assert main(["rig-info", "segway"]) == 2
    assert "unknown rig 'segway'" in capsys.readouterr().err
    assert main(["rig-info", "cartpole", "--set", "bogus=1"]) == 2
    assert "unknown override 'bogus'" in capsys.readouterr().err
    assert main(["rig-info", "cartpole", "--set", "friction_scale"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
