"""DDP: a 2-process gloo run under torchrun; every rank must end with identical parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fm_core.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "fm_core" / "configs" / "smoke.toml"


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fm_core.train", "--config", str(SMOKE), "--out", str(out), "--no-progress",
           "--set", "train.steps=4", "--set", "train.ckpt_every=2", "--set", "train.log_every=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    h0 = (out / "param_hash_rank0.txt").read_text()
    h1 = (out / "param_hash_rank1.txt").read_text()
    assert len(h0) == 64 and h0 == h1, "DDP ranks diverged"
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["samples"] == 4 * 8 * 2, "each rank contributes its own batch"
    assert summary["param_hash"] == h0
    ck = read_checkpoint(out / "final.pt")
    assert ck["meta"]["train"]["world_size"] == 2
