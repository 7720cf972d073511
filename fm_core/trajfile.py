"""Trajectory dataset files (``.npz``, numpy only): rig data collection, datasets from logs, fine-tuning.

Fields of a file (format_version 1; format_version 2 adds the optional provenance fields below):

=================  =================  ==============================================================
``x``              float32 (K,T,n)    states, K trajectories of T samples
``u``              float32 (K,T,m)    inputs (``u[:, t]`` is applied from sample t to t+1); m may be 0
``dt``             float64 ()         sample period in seconds (> 0)
``state_names``    str (n,)           one name per state channel
``input_names``    str (m,)           one name per input channel
``split``          str (K,)           "train" | "val" | "test" per trajectory
``source``         str (K,)           run / log id per trajectory (never split across train/val/test)
``rig``            str ()             rig name, e.g. "cartpole"
``format_version`` int64 ()           1, or 2 when the provenance fields are present
=================  =================  ==============================================================

Provenance (format_version 2, all four or none; ``rigfm dataset build`` writes them):

=================  =================  ==============================================================
``run_id``         str (K,)           logged run id (``source`` may carry a ``#split`` suffix)
``episode``        int64 (K,)         episode index: one continuous valid stretch of one run (and split)
``frame_index``    int64 (K,)         frame of the window's first sample within its episode (sample t
                                      is frame ``frame_index + t``)
``timestamp``      float64 (K,)       host wall time of the window's first sample (s since the Unix
                                      epoch, the log's clock); sample t is at ``timestamp + t * dt``
=================  =================  ==============================================================

Every problem raises ``TrajectoryFileError`` whose message names the file and the field.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from fm_core.metrics import channel_scale

FORMAT_VERSION = 2  # written when the provenance fields are present; 1 otherwise (both are read)
SUPPORTED_VERSIONS = (1, 2)
SPLITS = ("train", "val", "test")
FIELDS = ("x", "u", "dt", "state_names", "input_names", "split", "source", "rig", "format_version")
PROVENANCE = ("run_id", "episode", "frame_index", "timestamp")


class TrajectoryFileError(ValueError):
    """A trajectory file (or the arrays to be saved) is invalid; the message names the file and the field."""


@dataclass
class TrajData:
    """Trajectories in memory: x (K,T,n), u (K,T,m) float32 and what they describe. The one container of
    training, evaluation and scoring; :class:`TrajectorySet` (a loaded file) adds splits and provenance."""

    x: np.ndarray
    u: np.ndarray
    dt: float | None = None
    state_names: list[str] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)
    rig: str = ""

    #: the fields with one entry per trajectory (indexed by :meth:`take`)
    per_trajectory: ClassVar[tuple[str, ...]] = ("x", "u")

    def take(self, idx: np.ndarray) -> Self:
        """The trajectories ``idx`` (index array or boolean mask), same type and metadata."""
        return replace(self, **{k: (None if getattr(self, k) is None else getattr(self, k)[idx])
                                for k in self.per_trajectory})


@dataclass(kw_only=True)
class TrajectorySet(TrajData):
    """Trajectories loaded from one or more files (see module docstring for the fields)."""

    dt: float
    split: np.ndarray
    source: np.ndarray
    paths: tuple[Path, ...] = ()
    run_id: np.ndarray | None = None  # provenance (format_version 2), see the module docstring
    episode: np.ndarray | None = None
    frame_index: np.ndarray | None = None
    timestamp: np.ndarray | None = None

    per_trajectory: ClassVar[tuple[str, ...]] = ("x", "u", "split", "source", *PROVENANCE)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def n(self) -> int:
        return int(self.x.shape[2])

    @property
    def m(self) -> int:
        return int(self.u.shape[2])

    @property
    def T(self) -> int:
        return int(self.x.shape[1])

    @property
    def has_provenance(self) -> bool:
        """Whether run id, episode, frame index and timestamp are known (format_version 2)."""
        return self.episode is not None

    def frame_indices(self) -> np.ndarray:
        """(K, T) frame index of every sample within its episode."""
        if self.frame_index is None:
            raise ValueError(f"{self._name()}: no frame indices (format_version 1 file; rebuild it with "
                             "rigfm dataset build)")
        return self.frame_index[:, None] + np.arange(self.T)[None, :]

    def timestamps(self) -> np.ndarray:
        """(K, T) host wall time of every sample (s since the Unix epoch)."""
        if self.timestamp is None:
            raise ValueError(f"{self._name()}: no timestamps (format_version 1 file; rebuild it with "
                             "rigfm dataset build)")
        return self.timestamp[:, None] + self.dt * np.arange(self.T)[None, :]

    def subset(self, split: str | Iterable[str]) -> TrajectorySet:
        """The trajectories of one or more splits: ``ts.subset("train")``, ``ts.subset(["val", "test"])``."""
        wanted = {split} if isinstance(split, str) else set(split)
        unknown = sorted(wanted - set(SPLITS))
        if unknown:
            raise ValueError(f"TrajectorySet.subset: unknown split(s) {unknown}; known: {list(SPLITS)}")
        return self.take(np.isin(self.split, sorted(wanted)))

    def save(self, path: str | Path) -> Path:
        """Write this set with ``save_trajectories``."""
        prov = {k: getattr(self, k) for k in PROVENANCE} if self.has_provenance else {}
        return save_trajectories(path, self.x, self.u, self.dt, self.state_names, self.input_names,
                                 self.split, self.source, self.rig, **prov)

    def _name(self) -> str:
        return ", ".join(str(p) for p in self.paths) or "<TrajectorySet>"


def _err(where: str, field: str, why: str) -> TrajectoryFileError:
    return TrajectoryFileError(f"{where}: field '{field}' {why}")


def _str_array(where: str, field: str, value: object, ndim: int) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim != ndim:
        raise _err(where, field, f"must be a {ndim}-d string array, got shape {a.shape}")
    if a.size and a.dtype.kind not in "US":
        raise _err(where, field, f"must hold strings, got dtype {a.dtype}")
    return a.astype(str) if a.size else a.astype("U1")


def _mixed_source(source: np.ndarray, split: np.ndarray) -> tuple[str, list[str]] | None:
    """The first source that appears in more than one split (one source must never span splits)."""
    seen: dict[str, set[str]] = {}
    for src, lab in zip(source.tolist(), split.tolist(), strict=True):
        seen.setdefault(src, set()).add(lab)
    for src, labs in seen.items():
        if len(labs) > 1:
            return src, sorted(labs)
    return None


def _validate(where: str, data: dict[str, object]) -> TrajectorySet:
    """Check all fields (``where`` names the file) and build the TrajectorySet."""
    for f in FIELDS:
        if f not in data:
            raise _err(where, f, "is missing")
    version = np.asarray(data["format_version"])
    if version.ndim != 0 or version.dtype.kind not in "iu" or int(version) not in SUPPORTED_VERSIONS:
        raise _err(where, "format_version",
                   f"is {data['format_version']!r}, this reader supports {list(SUPPORTED_VERSIONS)}")
    x = np.asarray(data["x"])
    u = np.asarray(data["u"])
    for name, a in (("x", x), ("u", u)):
        if a.ndim != 3:
            raise _err(where, name, f"must be 3-d (K,T,channels), got ndim {a.ndim} shape {a.shape}")
        if a.dtype.kind not in "fiu":
            raise _err(where, name, f"must be numeric, got dtype {a.dtype}")
    if u.shape[:2] != x.shape[:2]:
        raise _err(where, "u", f"shape {u.shape} does not match x {x.shape} in (K,T)")
    state_names = _str_array(where, "state_names", data["state_names"], 1)
    input_names = _str_array(where, "input_names", data["input_names"], 1)
    if state_names.shape[0] != x.shape[2]:
        raise _err(where, "state_names",
                   f"has {state_names.shape[0]} names but x has n={x.shape[2]} channels")
    if input_names.shape[0] != u.shape[2]:
        raise _err(where, "input_names",
                   f"has {input_names.shape[0]} names but u has m={u.shape[2]} channels")
    if x.shape[2] < 1:
        raise _err(where, "x", "must have at least one state channel")
    try:
        dt = float(np.asarray(data["dt"]))
    except (TypeError, ValueError):
        raise _err(where, "dt", f"must be a number, got {data['dt']!r}") from None
    if not (math.isfinite(dt) and dt > 0):
        raise _err(where, "dt", f"must be finite and > 0, got {dt}")
    k = x.shape[0]
    split = _str_array(where, "split", data["split"], 1)
    source = _str_array(where, "source", data["source"], 1)
    for name, a in (("split", split), ("source", source)):
        if a.shape[0] != k:
            raise _err(where, name, f"has {a.shape[0]} entries but there are K={k} trajectories")
    bad = sorted(set(split.tolist()) - set(SPLITS))
    if bad:
        raise _err(where, "split", f"has unknown label(s) {bad}; allowed: {list(SPLITS)}")
    rig = np.asarray(data["rig"])
    if rig.ndim != 0 or rig.dtype.kind not in "US":
        raise _err(where, "rig", f"must be a single string, got {data['rig']!r}")
    x = x.astype(np.float32, copy=False)
    u = u.astype(np.float32, copy=False)
    names = {"x": state_names, "u": input_names}
    for name, a in (("x", x), ("u", u)):
        finite = np.isfinite(a)
        if not finite.all():
            i, t, c = (int(v) for v in np.argwhere(~finite)[0])
            raise _err(where, name, f"has NaN/Inf at trajectory {i}, time step {t} (channel {c} "
                                    f"'{names[name][c]}'; {int((~finite).sum())} bad values in total)")
    mixed = _mixed_source(source, split)
    if mixed:
        raise _err(where, "split", f"mixes source {mixed[0]!r} across splits {mixed[1]}")
    prov = _provenance(where, data, k, int(version))
    return TrajectorySet(x=x, u=u, dt=dt, state_names=state_names.tolist(), input_names=input_names.tolist(),
                         split=split, source=source, rig=str(rig), **prov)


def _provenance(where: str, data: dict[str, object], k: int, version: int) -> dict[str, np.ndarray]:
    """The format-2 fields (all or none), checked: shapes (K,), dtypes, finite timestamps."""
    present = [f for f in PROVENANCE if data.get(f) is not None]
    if not present:
        return {}
    if version < 2:
        raise _err(where, present[0], "needs format_version 2")
    missing = [f for f in PROVENANCE if f not in present]
    if missing:
        raise _err(where, missing[0], f"is missing (the provenance fields {list(PROVENANCE)} come together)")
    out: dict[str, np.ndarray] = {"run_id": _str_array(where, "run_id", data["run_id"], 1)}
    for f, kinds, dtype in (("episode", "iu", np.int64), ("frame_index", "iu", np.int64),
                            ("timestamp", "fiu", np.float64)):
        a = np.asarray(data[f])
        if a.ndim != 1 or (a.size and a.dtype.kind not in kinds):
            raise _err(where, f, f"must be a 1-d {dtype.__name__} array, got shape {a.shape} dtype {a.dtype}")
        out[f] = a.astype(dtype)
    for f, a in out.items():
        if a.shape[0] != k:
            raise _err(where, f, f"has {a.shape[0]} entries but there are K={k} trajectories")
    if (out["episode"] < 0).any() or (out["frame_index"] < 0).any():
        raise _err(where, "episode" if (out["episode"] < 0).any() else "frame_index", "has negative values")
    if not np.isfinite(out["timestamp"]).all():
        raise _err(where, "timestamp", "has NaN/Inf")
    return out


def save_trajectories(
    path: str | Path, x: np.ndarray, u: np.ndarray, dt: float, state_names: Sequence[str],
    input_names: Sequence[str], split: Sequence[str] | np.ndarray, source: Sequence[str] | np.ndarray,
    rig: str, run_id: Sequence[str] | np.ndarray | None = None, episode: np.ndarray | None = None,
    frame_index: np.ndarray | None = None, timestamp: np.ndarray | None = None,
) -> Path:
    """Validate and write a trajectory file (atomically: temp file + rename). Returns the path.

    With the provenance fields (all four) the file is format_version 2, else 1."""
    p = Path(path)
    prov = {"run_id": run_id, "episode": episode, "frame_index": frame_index, "timestamp": timestamp}
    given = {k: v for k, v in prov.items() if v is not None}
    version = FORMAT_VERSION if given else 1
    data = {"x": np.asarray(x), "u": np.asarray(u), "dt": dt,
            "state_names": np.array(list(state_names), dtype=str),
            "input_names": np.array(list(input_names), dtype=str).reshape(-1),
            "split": np.asarray(split), "source": np.asarray(source).astype(str), "rig": np.array(str(rig)),
            "format_version": np.int64(version), **{k: np.asarray(v) for k, v in given.items()}}
    ts = _validate(f"{p} (saving)", data)
    extra = {k: getattr(ts, k) for k in PROVENANCE} if ts.has_provenance else {}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, x=ts.x, u=ts.u, dt=np.float64(ts.dt),
                            state_names=np.array(ts.state_names, str),
                            input_names=np.array(ts.input_names, str).reshape(-1), split=ts.split,
                            source=ts.source, rig=np.array(ts.rig), format_version=np.int64(version), **extra)
    os.replace(tmp, p)
    return p


def _not_npz(path: Path) -> str | None:
    """Why ``path`` is not an .npz archive (None when it is a zip file, as every .npz is)."""
    if zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(b"\x93NUMPY"):
        kind = "a single-array .npy file"
    elif not head:
        kind = "an empty file"
    elif all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        kind = "a text file"
    else:
        kind = "not a zip archive"
    return f"{path}: not a numpy .npz archive ({kind}); expected a trajectory file from `rigfm dataset build`"


def _load_one(path: Path) -> TrajectorySet:
    if not path.is_file():
        raise TrajectoryFileError(f"{path}: trajectory file not found")
    why = _not_npz(path)
    if why is not None:
        raise TrajectoryFileError(why)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable archive becomes a TrajectoryFileError
        raise TrajectoryFileError(f"{path}: cannot read trajectory file: {exc}") from None
    ts = _validate(str(path), data)
    ts.paths = (path,)
    return ts


def load_trajectories(path: str | Path | Sequence[str | Path]) -> TrajectorySet:
    """Load and validate one file, or several (concatenated; names, dt, rig and T must agree)."""
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    if not paths:
        raise TrajectoryFileError("load_trajectories: no files given")
    sets = [_load_one(p) for p in paths]
    first = sets[0]
    for s in sets[1:]:
        where = s.paths[0]
        for name in ("state_names", "input_names", "rig"):
            if getattr(s, name) != getattr(first, name):
                raise _err(str(where), name, f"{getattr(s, name)!r} differs from {first.paths[0]}'s "
                                             f"{getattr(first, name)!r}")
        if not math.isclose(s.dt, first.dt, rel_tol=1e-9):
            raise _err(str(where), "dt", f"{s.dt} differs from {first.paths[0]}'s {first.dt}")
        if s.T != first.T:
            raise _err(str(where), "x", f"has T={s.T} steps but {first.paths[0]} has T={first.T}")
    if len(sets) == 1:
        return first
    prov: dict[str, np.ndarray] = {}
    if all(s.has_provenance for s in sets):  # episodes renumbered so that each file's stay distinct
        offsets = np.cumsum([0] + [int(s.episode.max()) + 1 if len(s) else 0 for s in sets[:-1]])
        prov = {"run_id": np.concatenate([s.run_id for s in sets]),
                "episode": np.concatenate([s.episode + o for s, o in zip(sets, offsets, strict=True)]),
                "frame_index": np.concatenate([s.frame_index for s in sets]),
                "timestamp": np.concatenate([s.timestamp for s in sets])}
    out = TrajectorySet(x=np.concatenate([s.x for s in sets]), u=np.concatenate([s.u for s in sets]),
                        dt=first.dt, state_names=first.state_names, input_names=first.input_names,
                        split=np.concatenate([s.split for s in sets]),
                        source=np.concatenate([s.source for s in sets]), rig=first.rig, paths=tuple(paths),
                        **prov)
    mixed = _mixed_source(out.source, out.split)
    if mixed:
        raise _err(out._name(), "split", f"mixes source {mixed[0]!r} across splits {mixed[1]} "
                                         "(the files disagree)")
    return out


def split_by_source(
    sources: Sequence[str] | np.ndarray, fractions: Sequence[float] | dict[str, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> np.ndarray:
    """Assign "train"/"val"/"test" per trajectory so that every source (run) lands in exactly one split.

    Sources are shuffled (``seed``) and cut at the cumulative trajectory-count ``fractions`` (train, val, test
    or a dict); each split with a positive fraction gets at least one source when there are enough sources.
    """
    if isinstance(fractions, dict):
        unknown = sorted(set(fractions) - set(SPLITS))
        if unknown:
            raise ValueError(f"split_by_source: unknown split(s) {unknown}; known: {list(SPLITS)}")
        fr = np.array([float(fractions.get(s, 0.0)) for s in SPLITS])
    else:
        fr = np.asarray(list(fractions), dtype=np.float64)
        if fr.shape != (3,):
            raise ValueError(f"split_by_source: fractions must be (train, val, test), got {fractions!r}")
    if not (np.isfinite(fr).all() and (fr >= 0).all() and abs(fr.sum() - 1.0) < 1e-6):
        raise ValueError(f"split_by_source: fractions must be >= 0 and sum to 1, got {fr.tolist()}")
    src = np.asarray(sources).astype(str)
    if src.ndim != 1:
        raise ValueError(f"split_by_source: sources must be 1-d, got shape {src.shape}")
    uniq, inverse, counts = np.unique(src, return_inverse=True, return_counts=True)
    if uniq.size == 0:
        return np.zeros(0, dtype="U5")
    order = np.random.default_rng(seed).permutation(uniq.size)
    mid = (np.cumsum(counts[order]) - counts[order] / 2.0) / counts.sum()
    label = np.minimum(np.searchsorted(np.cumsum(fr), mid, side="right"), 2)
    # give every split with a positive fraction at least one source (taken from the most populated split)
    for s in np.flatnonzero(fr > 0):
        if (label == s).any():
            continue
        sizes = np.bincount(label, minlength=3)
        donor = int(np.argmax(np.where(fr > 0, sizes, -1)))
        if sizes[donor] <= 1:
            break
        members = np.flatnonzero(label == donor)
        label[members[-1] if s > donor else members[0]] = s
    per_source = np.empty(uniq.size, dtype=np.int64)
    per_source[order] = label
    return np.asarray(SPLITS)[per_source[inverse]]


# ---------------------------------------------------------------------------------------------- in memory
def as_trajdata(ts: Any, name: str = "set") -> TrajData:
    """A :class:`TrajData` (or TrajectorySet) as it is; any object with x (K,T,n), u (K,T,m) validated into
    one (float32, finite); errors name the field."""
    if isinstance(ts, TrajData):
        return ts
    try:
        x = np.asarray(ts.x, dtype=np.float32)
        u = np.asarray(ts.u, dtype=np.float32)
    except AttributeError as exc:
        raise ValueError(f"{name}: needs fields 'x' and 'u' ({exc})") from None
    if x.ndim != 3 or u.ndim != 3 or x.shape[:2] != u.shape[:2]:
        raise ValueError(f"{name}: field 'x' must be (K,T,n) and 'u' (K,T,m) with equal K,T; "
                         f"got {x.shape} and {u.shape}")
    for fname, arr in (("x", x), ("u", u)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: field {fname!r} contains NaN/Inf")
    names = getattr(ts, "state_names", None)
    if names is None:
        names = getattr(ts, "names", [])
    dt = getattr(ts, "dt", None)
    return TrajData(x=x, u=u, dt=None if dt is None else float(np.asarray(dt)),
                    state_names=[str(s) for s in list(names)],
                    input_names=[str(s) for s in list(getattr(ts, "input_names", []))],
                    rig=str(getattr(ts, "rig", "") or ""))


def split_trajectories(ts: TrajectorySet, split: str) -> TrajectorySet:
    """The trajectories of one split ("train" / "val" / "test"); ValueError when it has none."""
    sub = ts.subset(split)
    if not len(sub):
        raise ValueError(f"no trajectories with split == {split!r} (have {sorted(set(ts.split.tolist()))})")
    return sub


def subsample(td: TrajData, fraction: float, seed: int) -> TrajData:
    """Seeded random subset of ceil(fraction*K) (at least 1) trajectories, order kept (the experiment's
    fractions: every model of one (fraction, seed) sees the same trajectories)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subsample: fraction must be in (0, 1], got {fraction}")
    k = td.x.shape[0]
    keep = max(1, int(math.ceil(fraction * k - 1e-9)))
    if keep >= k:
        return td
    return td.take(np.sort(np.random.default_rng([seed, 7]).choice(k, size=keep, replace=False)))


def normalisation_stats(td: TrajData) -> dict[str, list[float]]:
    """Per-channel mean and std of x and u over all steps (std floored as
    :func:`fm_core.metrics.channel_scale` floors it, so a constant channel stays finite)."""
    out = {}
    for key, arr in (("x", td.x), ("u", td.u)):
        out[f"{key}_mean"] = arr.reshape(-1, arr.shape[-1]).astype(np.float64).mean(0).tolist()
        out[f"{key}_std"] = channel_scale(arr).tolist()
    return out

