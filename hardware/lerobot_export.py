"""``rigfm dataset export --format lerobot``: a trajectory dataset (.npz from ``rigfm dataset build``) as a
LeRobot dataset, codebase version v3.0 (the layout ``lerobot.datasets.LeRobotDataset`` reads):

```
OUT/meta/info.json                          codebase_version, fps, features, totals, splits, data_path
OUT/meta/stats.json                         per feature: min, max, mean, std, count, q01 q10 q50 q90 q99
OUT/meta/tasks.parquet                      one task (pandas frame indexed by the task text, task_index)
OUT/meta/episodes/chunk-000/file-000.parquet  one row per episode: episode_index, tasks, length, data file,
                                            dataset_from_index / _to_index, stats/<feature>/<stat>, rigfm/*
OUT/data/chunk-000/file-000.parquet         one row per frame: observation.state, action, timestamp,
                                            frame_index, episode_index, index, task_index, rigfm.host_time
```

Frames come from the dataset's windows without duplicates: overlapping windows of one episode share
frames (``(episode, frame_index)``, trajfile v2 provenance), and a gap in an episode's frames (a stride
longer than the window) starts a new LeRobot episode. ``timestamp`` is LeRobot's: seconds since the
episode's first frame (``frame_index / fps``); the host wall time of each frame is kept as
``rigfm.host_time``, the run id and split per episode as ``rigfm/run_id`` and ``rigfm/split``. ``action``
is the input applied from that frame to the next (``u[t]``). Episodes are ordered train, val, test, so
``splits`` in info.json are contiguous episode ranges. Needs pyarrow and pandas (``pip install -e
".[lerobot]"``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
SPLIT_ORDER = ("train", "val", "test")


class ExportError(ValueError):
    """The dataset cannot be exported (old format, non-integer frame rate, output exists); names why."""


def _episodes(ts: Any) -> list[dict[str, Any]]:
    """Frames of each (provenance) episode, deduplicated, cut at frame gaps: a list of LeRobot episodes."""
    out = []
    T = ts.T
    for ep in np.unique(ts.episode):
        rows = np.flatnonzero(ts.episode == ep)
        frames: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        for w in rows:
            f0 = int(ts.frame_index[w])
            for t in range(T):
                frames.setdefault(f0 + t, (ts.x[w, t], ts.u[w, t], float(ts.timestamp[w] + t * ts.dt)))
        order = np.array(sorted(frames))
        cuts = np.flatnonzero(np.diff(order) != 1) + 1
        for piece in np.split(order, cuts):
            out.append({
                "x": np.stack([frames[f][0] for f in piece]).astype(np.float32),
                "u": np.stack([frames[f][1] for f in piece]).astype(np.float32),
                "host_time": np.array([frames[f][2] for f in piece], dtype=np.float64),
                "source_frame": piece.astype(np.int64),
                "source_episode": int(ep),
                "run_id": str(ts.run_id[rows[0]]),
                "split": str(ts.split[rows[0]]),
            })
    out.sort(key=lambda e: (SPLIT_ORDER.index(e["split"]), e["host_time"][0]))
    return out


def _stats(a: np.ndarray) -> dict[str, list]:
    """LeRobot's per-feature statistics over frames (axis 0)."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    out = {"min": a.min(0).tolist(), "max": a.max(0).tolist(), "mean": a.mean(0).tolist(),
           "std": a.std(0).tolist(), "count": [int(a.shape[0])]}
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = np.quantile(a, q, axis=0).tolist()
    return out


def export_lerobot(dataset: str | Path, out: str | Path, task: str | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write the LeRobot v3.0 dataset of ``dataset`` (.npz) into ``out``; returns a report."""
    try:
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ExportError(f"--format lerobot needs pyarrow and pandas (pip install -e \".[lerobot]\"): {exc}"
                          ) from None
    from fm_core.trajfile import load_trajectories

    ts = load_trajectories(dataset)
    if not ts.has_provenance:
        raise ExportError(f"{dataset}: no run id / episode / frame index / timestamps (trajectory format 1); "
                          "rebuild it from the logs with rigfm dataset build")
    fps = 1.0 / ts.dt
    if abs(fps - round(fps)) > 1e-6 * fps:
        raise ExportError(f"{dataset}: dt {ts.dt} s is not 1/integer Hz; LeRobot needs an integer fps")
    fps = int(round(fps))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out}: exists and is not empty (give --overwrite to replace it)")
        shutil.rmtree(out)
    task = task or f"{ts.rig}: logged rigfm runs"
    episodes = _episodes(ts)
    n, m = ts.n, ts.m

    cols: dict[str, list] = {k: [] for k in ("observation.state", "action", "timestamp", "frame_index",
                                             "episode_index", "index", "task_index", "rigfm.host_time")}
    ep_rows: list[dict[str, Any]] = []
    index = 0
    for k, ep in enumerate(episodes):
        L = ep["x"].shape[0]
        cols["observation.state"] += list(ep["x"])
        cols["action"] += list(ep["u"])
        cols["timestamp"] += (np.arange(L) / fps).astype(np.float32).tolist()
        cols["frame_index"] += list(range(L))
        cols["episode_index"] += [k] * L
        cols["index"] += list(range(index, index + L))
        cols["task_index"] += [0] * L
        cols["rigfm.host_time"] += ep["host_time"].tolist()
        row: dict[str, Any] = {
            "episode_index": k, "tasks": [task], "length": L,
            "data/chunk_index": 0, "data/file_index": 0,
            "dataset_from_index": index, "dataset_to_index": index + L,
            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
            "rigfm/run_id": ep["run_id"], "rigfm/split": ep["split"], "rigfm/episode": ep["source_episode"],
            "rigfm/first_frame": int(ep["source_frame"][0]),
        }
        feats = {"observation.state": ep["x"], "action": ep["u"], "timestamp": np.arange(L) / fps,
                 "frame_index": np.arange(L), "episode_index": np.full(L, k),
                 "index": np.arange(index, index + L), "task_index": np.zeros(L)}
        for name, arr in feats.items():
            for stat, v in _stats(np.asarray(arr)).items():
                row[f"stats/{name}/{stat}"] = v
        ep_rows.append(row)
        index += L

    def vec(rows: list, width: int) -> pa.Array:
        """A (frames, width) feature: LeRobot stores a shape-(1,) feature as a scalar column."""
        flat = np.asarray(rows, dtype=np.float32).reshape(-1)
        if width == 1:
            return pa.array(flat, pa.float32())
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)

    data = pa.table({
        "observation.state": vec(cols["observation.state"], n),
        "action": vec(cols["action"], m) if m else pa.array([[]] * index, pa.list_(pa.float32())),
        "timestamp": pa.array(cols["timestamp"], pa.float32()),
        "frame_index": pa.array(cols["frame_index"], pa.int64()),
        "episode_index": pa.array(cols["episode_index"], pa.int64()),
        "index": pa.array(cols["index"], pa.int64()),
        "task_index": pa.array(cols["task_index"], pa.int64()),
        "rigfm.host_time": pa.array(cols["rigfm.host_time"], pa.float64()),
    })
    data_file = out / DATA_PATH.format(chunk_index=0, file_index=0)
    data_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(data, data_file)
    ep_file = out / EPISODES_PATH.format(chunk_index=0, file_index=0)
    ep_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(ep_rows), ep_file)
    pd.DataFrame({"task_index": [0]}, index=pd.Index([task])).to_parquet(out / "meta" / "tasks.parquet")

    all_x = np.concatenate([e["x"] for e in episodes])
    all_u = np.concatenate([e["u"] for e in episodes])
    stats = {"observation.state": _stats(all_x), "action": _stats(all_u),
             "timestamp": _stats(np.asarray(cols["timestamp"])),
             "frame_index": _stats(np.asarray(cols["frame_index"])),
             "episode_index": _stats(np.asarray(cols["episode_index"])),
             "index": _stats(np.asarray(cols["index"])), "task_index": _stats(np.asarray(cols["task_index"]))}
    (out / "meta" / "stats.json").write_text(json.dumps(stats, indent=2))

    splits: dict[str, str] = {}
    for name in SPLIT_ORDER:
        ks = [k for k, e in enumerate(episodes) if e["split"] == name]
        if ks:
            splits[name] = f"{ks[0]}:{ks[-1] + 1}"
    scalar = {"shape": [1], "names": None}
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": ts.rig,
        "total_episodes": len(episodes),
        "total_frames": index,
        "total_tasks": 1,
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": splits,
        "data_path": DATA_PATH,
        "video_path": None,
        "features": {
            "observation.state": {"dtype": "float32", "shape": [n], "names": list(ts.state_names)},
            "action": {"dtype": "float32", "shape": [m], "names": list(ts.input_names)},
            "timestamp": {"dtype": "float32", **scalar},
            "frame_index": {"dtype": "int64", **scalar},
            "episode_index": {"dtype": "int64", **scalar},
            "index": {"dtype": "int64", **scalar},
            "task_index": {"dtype": "int64", **scalar},
            "rigfm.host_time": {"dtype": "float64", **scalar},
        },
    }
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return {"out": str(out), "episodes": len(episodes), "frames": index, "fps": fps, "splits": splits,
            "task": task, "windows": len(ts)}
