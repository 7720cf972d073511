"""``rigfm dataset export --format lerobot``: the LeRobot v3.0 layout checked with pyarrow / pandas against
LeRobot's documented schema (lerobot's own ``LeRobotDataset`` cannot be imported here: it imports
torchvision, whose PyPI wheels are CUDA builds), and every exported frame traced back to the dataset."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from fm_core.trajfile import load_trajectories, save_trajectories
from hardware.dataset_build import build_dataset
from hardware.lerobot_export import ExportError, export_lerobot
from hardware.log_commands import register
from hardware.logger import RunLogger

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")

T0 = 1_800_000_000_000_000_000
META = {"rig": "cartpole", "rig_config": {"name": "cartpole", "model_dt": 0.01}, "controller": "test"}


def log_run(directory, name: str, seconds: float, gap_at: float | None = None) -> None:
    """States at 500 Hz (p = t), a command 0.5 ms after each; an e-stop second at ``gap_at``."""
    with RunLogger(directory, META, run_name=name, fsync_s=None) as log:
        log.write("/mode", {"host_time_ns": T0, "mode": "balance", "previous": "idle"})
        for k in range(int(seconds * 500)):
            t = k / 500
            th = T0 + k * 2_000_000
            log.write("/state", {"seq": k, "device_time_us": k * 2000, "host_time_ns": th,
                                 "positions": [t, math.sin(t)], "velocities": [1.0, math.cos(t)],
                                 "counts": [k, k], "flags": 0})
            log.write("/command", {"seq": k, "host_time_ns": th + 500_000, "voltage": math.cos(3 * t)})
            if gap_at is not None and k == int(gap_at * 500):
                log.write("/mode", {"host_time_ns": th, "mode": "estop", "previous": "balance"})
            if gap_at is not None and k == int((gap_at + 1) * 500):
                log.write("/mode", {"host_time_ns": th, "mode": "balance", "previous": "estop"})
            if k % 1000 == 999:
                while log.stats()["queued"] > 10_000:
                    pass


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("lerobot")
    log_run(d / "runs", "r1", 6.0, gap_at=3.0)
    log_run(d / "runs", "r2", 4.0)
    log_run(d / "runs", "r3", 4.0)
    out = d / "ds.npz"
    build_dataset([d / "runs"], out, window=50, stride=25, split="0.4,0.3,0.3", seed=0)
    return out


def test_export_writes_the_lerobot_v3_layout(dataset, tmp_path):
    rep = export_lerobot(dataset, tmp_path / "lr", task="balance the pole")
    root = tmp_path / "lr"
    info = json.loads((root / "meta" / "info.json").read_text())
    ts = load_trajectories(dataset)
    # meta/info.json: the v3.0 fields and LeRobot's default features
    assert info["codebase_version"] == "v3.0" and info["fps"] == 100 and info["robot_type"] == "cartpole"
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] is None and info["chunks_size"] == 1000 and info["total_tasks"] == 1
    feats = info["features"]
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert feats[name]["shape"] == [1]
    assert feats["observation.state"] == {"dtype": "float32", "shape": [4],
                                          "names": ["p", "theta", "p_dot", "theta_dot"]}
    assert feats["action"]["shape"] == [1] and feats["action"]["names"] == ["voltage"]
    # data: one parquet file whose columns are exactly the features, typed as declared
    data = pq.read_table(root / info["data_path"].format(chunk_index=0, file_index=0))
    assert set(data.column_names) == set(feats)
    assert data.schema.field("observation.state").type == pa.list_(pa.float32(), 4)
    assert data.schema.field("action").type == pa.float32()  # shape (1,) features are scalar columns
    for name in ("frame_index", "episode_index", "index", "task_index"):
        assert data.schema.field(name).type == pa.int64()
    assert data.num_rows == info["total_frames"] == rep["frames"]
    d = data.to_pydict()
    assert d["index"] == list(range(data.num_rows))
    # episodes: contiguous rows, frame_index from 0, timestamp = frame_index / fps (LeRobot checks 1e-4 s)
    eps = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [e["episode_index"] for e in eps] == list(range(info["total_episodes"]))
    ep_idx = np.array(d["episode_index"])
    fi = np.array(d["frame_index"])
    tstamp = np.array(d["timestamp"], dtype=np.float64)
    for e in eps:
        rows = np.arange(e["dataset_from_index"], e["dataset_to_index"])
        assert len(rows) == e["length"] and np.all(ep_idx[rows] == e["episode_index"])
        assert np.array_equal(fi[rows], np.arange(e["length"]))
        assert np.allclose(tstamp[rows], fi[rows] / 100.0, atol=1e-4)
        assert e["tasks"] == ["balance the pole"] and (e["data/chunk_index"], e["data/file_index"]) == (0, 0)
        for stat in ("min", "max", "mean", "std", "count", "q01", "q50", "q99"):
            assert len(e[f"stats/observation.state/{stat}"]) == (1 if stat == "count" else 4)
    assert eps[-1]["dataset_to_index"] == data.num_rows
    # splits: contiguous episode ranges in the order train, val, test, covering every episode
    ranges = [tuple(map(int, r.split(":"))) for r in info["splits"].values()]
    assert list(info["splits"]) == ["train", "val", "test"]
    assert ranges[0][0] == 0 and ranges[-1][1] == len(eps)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for name, (a, b) in zip(info["splits"], ranges, strict=True):
        assert {e["rigfm/split"] for e in eps[a:b]} == {name}
    # tasks.parquet: pandas frame indexed by the task text (what LeRobot's load_tasks reads)
    tasks = pd.read_parquet(root / "meta" / "tasks.parquet")
    assert tasks.index.tolist() == ["balance the pole"] and tasks["task_index"].tolist() == [0]
    # stats.json: every feature, LeRobot's statistics
    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert set(stats) == set(feats) - {"rigfm.host_time"}
    x_all = np.array(d["observation.state"])
    assert np.allclose(stats["observation.state"]["mean"], x_all.mean(0), atol=1e-5)
    assert stats["observation.state"]["count"] == [data.num_rows]
    # every frame is a dataset sample, each sample appears once (overlapping windows deduplicated)
    host = np.array(d["rigfm.host_time"])
    run_of = {e["episode_index"]: e["rigfm/run_id"] for e in eps}
    lookup = {(run_of[e], round(h, 4)): (x, u)
              for e, h, x, u in zip(ep_idx.tolist(), host, x_all, d["action"], strict=True)}
    assert len(lookup) == data.num_rows
    stamps = ts.timestamps()
    for w in range(len(ts)):
        for t in range(ts.T):
            x, u = lookup[(ts.run_id[w], round(float(stamps[w, t]), 4))]
            assert np.allclose(x, ts.x[w, t]) and math.isclose(u, float(ts.u[w, t, 0]), rel_tol=1e-6)
    assert data.num_rows < len(ts) * ts.T  # stride 25 < window 50: half the window samples are shared
    assert {e["rigfm/run_id"] for e in eps} == {"r1", "r2", "r3"}


def test_export_cli_and_its_errors(dataset, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))

    def cli(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    assert cli("dataset", "export", str(dataset), "--format", "lerobot", "-o", str(tmp_path / "a")) == 0
    assert "LeRobot v3.0" in capsys.readouterr().out
    assert cli("dataset", "export", str(dataset), "-o", str(tmp_path / "a")) == 2
    assert "exists and is not empty (give --overwrite" in capsys.readouterr().err
    assert cli("dataset", "export", str(dataset), "-o", str(tmp_path / "a"), "--overwrite") == 0
    ts = load_trajectories(dataset)
    old = save_trajectories(tmp_path / "v1.npz", ts.x, ts.u, ts.dt, ts.state_names, ts.input_names,
                            ts.split, ts.source, ts.rig)  # no provenance: trajectory format 1
    assert cli("dataset", "export", str(old), "-o", str(tmp_path / "b")) == 2
    assert "rebuild it from the logs with rigfm dataset build" in capsys.readouterr().err
    odd = save_trajectories(tmp_path / "odd.npz", ts.x, ts.u, 0.003, ts.state_names, ts.input_names,
                            ts.split, ts.source, ts.rig, ts.run_id, ts.episode, ts.frame_index, ts.timestamp)
    with pytest.raises(ExportError, match="integer fps"):
        export_lerobot(odd, tmp_path / "c")
