"""Logged runs (MCAP) -> fine-tuning trajectory dataset (fm_core.trajfile format).

Steps per run: read /state, /command, /mode, /fault (truncated parts are read up to their last good chunk);
put states on the host clock (device clock unwrapped, fitted to the host clock: jitter-free sample times);
resample onto the model's dt grid (states: linear interpolation; commands: zero-order hold); mark invalid
grid points (device flags in the exclusion mask, e-stop/fault/dry-run modes, around /fault records, state
gaps, no recent command); cut windows inside valid stretches; split train/val/test BY RUN (with fewer runs
than splits: contiguous time blocks inside each run, reported)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hardware.log_reader import LogFileError, read_topics

STATE_NAMES = {
    "cartpole": ["p", "theta", "p_dot", "theta_dot"],
    "furuta": ["theta", "alpha", "theta_dot", "alpha_dot"],
}
INPUT_NAMES = ["voltage"]
EXCLUDED_MODES = ("estop", "fault", "safe")  # plus every "dry-*" mode: commands were not sent


def default_exclude_flags(input_source: str = "command") -> int:
    """Device status bits that make a sample unusable (hardware.protocol.StatusFlags): e-stop latched or
    input active, watchdog tripped, limit hit, latching fault, a discarded frame (a command may be lost);
    with commanded inputs also a clamped command (applied != commanded). Benign bits (motor enabled,
    connected, configured, loop overrun) are kept."""
    from hardware.protocol import StatusFlags as F

    mask = F.ESTOP_LATCHED | F.ESTOP_INPUT | F.WATCHDOG_TRIPPED | F.LIMIT_HIT | F.FAULT | F.RX_ERROR
    if input_source == "command":
        mask |= F.VOLTAGE_CLAMPED
    return int(mask)
DEVICE_CLOCK_WRAP_US = 1 << 32
SPLITS = ("train", "val", "test")
_TOPICS = {"/state", "/command", "/mode", "/fault"}


class DatasetBuildError(ValueError):
    """Bad input to the dataset build (the message names the file, run or option)."""


@dataclass
class RunData:
    """One run's logged series on the host clock (seconds since the run's first state)."""

    run_id: str
    files: list[Path]
    rig: str
    metadata: dict[str, Any]
    t0_ns: int
    t_state: np.ndarray  # (N,)
    x: np.ndarray  # (N, n)
    flags: np.ndarray  # (N,) int64
    applied: np.ndarray | None  # (N,) firmware-applied voltage when logged, else None
    t_cmd: np.ndarray  # (M,)
    u_cmd: np.ndarray  # (M,)
    modes: list[tuple[float, str]]  # (time, new mode)
    faults: list[tuple[float, str]]  # (time, code)
    clock: str = "device"
    warnings: list[str] = field(default_factory=list)


@dataclass
class Segment:
    """A stretch of valid grid points of one run."""

    run_id: str
    t_start: float  # grid time of the first point (s since the run's first state)
    x: np.ndarray  # (L, n)
    u: np.ndarray  # (L, 1)
    t0_ns: float = 0.0  # host time of the run's first state (ns): absolute time = t0_ns + t_start


# ----------------------------------------------------------------------------------------- reading
def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Files as given; directories expand to the *.mcap files below them."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.mcap"))
            if not found:
                raise DatasetBuildError(f"{p}: directory contains no .mcap files")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise DatasetBuildError(f"{p}: no such file or directory")
    return out


def _read_file(path: Path) -> tuple[Any, dict[str, list[tuple[int, int, dict]]]]:
    """Scan one file: ``{topic: [(file_order, log_time_ns, record), ...]}`` for the topics used here."""
    return read_topics(path, _TOPICS, file_order=True)


def load_runs(paths: list[str | Path], skipped: list[str] | None = None) -> list[RunData]:
    """Read and group log files by run id (rotated parts joined; a recovered copy replaces its original).

    Unreadable or empty files (not MCAP, no messages) and runs without /state or /command messages are
    skipped, each with a line in ``skipped`` naming it; DatasetBuildError when nothing usable is left."""
    parts: dict[tuple[str, int], tuple[Path, Any, dict]] = {}
    warnings: dict[str, list[str]] = defaultdict(list)
    skipped = skipped if skipped is not None else []
    files = expand_inputs(paths)
    for path in files:
        try:
            scan, recs = _read_file(path)
        except LogFileError as exc:
            skipped.append(f"{exc} (skipped)")
            continue
        if scan.messages == 0:
            skipped.append(f"{path}: no messages (an empty log part; skipped)")
            continue
        meta = scan.run_metadata()
        run_id = str(meta.get("run_id") or path.stem.removesuffix(".recovered"))
        part = int(meta.get("part", 0))
        if not scan.complete:
            warnings[run_id].append(
                f"{path}: truncated; using {scan.messages} readable messages "
                "(run `rigfm logs check --recover`)"
            )
        for err in scan.errors:
            if scan.complete:
                warnings[run_id].append(f"{path}: {err}")
        key = (run_id, part)
        if key in parts:  # e.g. x.mcap (truncated) and x.recovered.mcap: keep the fuller one
            other = parts[key]
            if sum(map(len, other[2].values())) >= sum(map(len, recs.values())):
                continue
        parts[key] = (path, meta, recs)
    grouped: dict[str, list] = defaultdict(list)
    for (run_id, _part), item in sorted(parts.items()):
        grouped[run_id].append(item)
    runs = []
    for run_id, items in grouped.items():
        missing = [t for t in ("/state", "/command") if not any(recs.get(t) for _, _, recs in items)]
        if missing:
            names = ", ".join(str(it[0]) for it in items)
            skipped.append(f"run {run_id} ({names}): no {' and '.join(missing)} messages (skipped)")
            continue
        runs.append(_assemble(run_id, items, warnings[run_id]))
    if not runs:
        raise DatasetBuildError(
            (f"no usable run in {len(files)} file(s): " + "; ".join(skipped)) if skipped else "no runs given"
        )
    rigs = {r.rig for r in runs}
    if len(rigs) > 1:
        raise DatasetBuildError(
            "runs from different rigs cannot go into one dataset: "
            + ", ".join(f"{r.run_id}={r.rig}" for r in runs)
        )
    return runs


def _assemble(run_id: str, items: list, warnings: list[str]) -> RunData:
    files = [it[0] for it in items]
    meta = items[0][1]
    merged: dict[str, list] = defaultdict(list)
    for k, (_, _, recs) in enumerate(items):  # parts in order; file order made global across parts
        for topic, lst in recs.items():
            merged[topic] += [(k * 10**12 + o, t, r) for o, t, r in lst]
    names = ", ".join(map(str, files))
    for topic in ("/state", "/command"):
        if not merged[topic]:
            raise DatasetBuildError(f"run {run_id} ({names}): no {topic} messages")
    rig = str(meta.get("rig", "unknown"))
    # frames logged between control ticks carry the held velocity estimate: the data uses the frames the
    # loop estimated from (logs without the field: every frame)
    states = [st for st in merged["/state"] if st[2].get("estimated", True)]
    try:
        s_order = np.array([o for o, _, _ in states], dtype=np.int64)
        log_t = np.array([t for _, t, _ in states], dtype=np.int64)
        host_t = np.array([r["host_time_ns"] for _, _, r in states], dtype=np.int64)
        dev_t = np.array([r["device_time_us"] for _, _, r in states], dtype=np.int64)
        pos = [r["positions"] for _, _, r in states]
        vel = [r["velocities"] for _, _, r in states]
        flags = np.array([r["flags"] for _, _, r in states], dtype=np.int64)
        applied = None
        if all("applied_voltage" in r for _, _, r in states):
            applied = np.array([np.nan if r["applied_voltage"] is None else r["applied_voltage"]
                                for _, _, r in states], dtype=np.float64)
        x = np.array([list(p) + list(v) for p, v in zip(pos, vel, strict=False)], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetBuildError(f"run {run_id} ({names}): malformed /state record: {exc!r}") from exc
    if x.ndim != 2:
        raise DatasetBuildError(f"run {run_id} ({names}): /state positions/velocities change length")
    try:
        cmds = merged["/command"]
        c_order = np.array([o for o, _, _ in cmds], dtype=np.int64)
        t_cmd_ns = np.array([r["host_time_ns"] for _, _, r in cmds], dtype=np.int64)
        u_cmd = np.array([np.nan if r["voltage"] is None else r["voltage"] for _, _, r in cmds], dtype=float)
        modes = [(o, r["host_time_ns"], str(r.get("mode", ""))) for o, _, r in merged["/mode"]]
        faults = [(o, r["host_time_ns"], str(r.get("code", ""))) for o, _, r in merged["/fault"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetBuildError(
            f"run {run_id} ({names}): malformed /command, /mode or /fault record: {exc!r}"
        ) from exc

    # log format v2: every host time, MCAP log times included, is on one clock (hardware.log_clock; in a
    # lock-step simulation the simulated one). v1: the driver stamped states with time.monotonic_ns() while
    # commands and MCAP log times used time.time_ns(): then the states' log times stand in
    host_ok = bool(np.median(np.abs(host_t - log_t)) < 1e9)
    one_clock = host_ok and str(meta.get("log_format", "")) >= "rigfm-log-v2"
    ref_t = host_t if host_ok else log_t
    origin = int(ref_t.min())  # ns since the epoch exceed float64's integers: work relative to an origin
    dev_ns = np.concatenate([[0], np.cumsum(np.diff(dev_t) % DEVICE_CLOCK_WRAP_US)]).astype(np.float64) * 1e3
    rate = _clock_rate(dev_ns, (ref_t - origin).astype(np.float64))
    t0_abs = 0
    if rate is None or 0.98 < rate < 1.02:
        # real time: states on the host clock (device clock fitted to it), the rest at their host times
        t_state_ns, clock = _device_to_host(dev_t, ref_t - origin)
        clock += " fitted to " + (
            "host_time_ns (one log clock)" if one_clock else
            "host_time_ns" if host_ok else "MCAP log time (host_time_ns is another clock)"
        )
        t0 = float(np.min(t_state_ns))
        t0_abs = origin + int(round(t0))

        def when(order: np.ndarray, host_ns: np.ndarray) -> np.ndarray:
            # 1 us early: a command stamped at the instant of a grid point counts at that point
            return (host_ns - origin).astype(np.float64) / 1e9 - t0 / 1e9 - 1e-6
    else:
        # not real time (lock-step simulation): device time for states; every other record takes the time
        # of the last state logged before it (the loop logs a state, then the command computed from it)
        t_state_ns, t0 = dev_ns, 0.0
        clock = f"device (device clock runs {rate:.3g}x the host clock: commands aligned by log order)"

        def when(order: np.ndarray, host_ns: np.ndarray) -> np.ndarray:
            k = np.clip(np.searchsorted(s_order, order) - 1, 0, None)
            return (t_state_ns[k] - t0) / 1e9 - 1e-6

    t_state = (t_state_ns - t0) / 1e9
    so = np.argsort(t_state, kind="stable")
    t_cmd = when(c_order, t_cmd_ns)
    co = np.argsort(t_cmd, kind="stable")

    def events(lst: list) -> list[tuple[float, str]]:
        if not lst:
            return []
        ts = when(np.array([o for o, _, _ in lst]), np.array([h for _, h, _ in lst], dtype=np.int64))
        return sorted(zip(ts.tolist(), [v for _, _, v in lst], strict=True))

    return RunData(
        run_id=run_id,
        files=files,
        rig=rig,
        metadata=meta,
        t0_ns=t0_abs,
        t_state=t_state[so],
        x=x[so],
        flags=flags[so],
        applied=None if applied is None else applied[so],
        t_cmd=t_cmd[co],
        u_cmd=u_cmd[co],
        modes=events(modes),
        faults=events(faults),
        clock=clock,
        warnings=warnings,
    )


def _clock_rate(dev_ns: np.ndarray, ref_ns: np.ndarray) -> float | None:
    """Rate of the device clock relative to the host clock (None when too few samples to tell)."""
    if dev_ns.size < 10 or dev_ns[-1] - dev_ns[0] < 1e8 or ref_ns[-1] == ref_ns[0]:
        return None
    return float((ref_ns[-1] - ref_ns[0]) / (dev_ns[-1] - dev_ns[0]))


def _device_to_host(dev_us: np.ndarray, host_ns: np.ndarray) -> tuple[np.ndarray, str]:
    """Sample times on the host clock from the (wrapping) device clock: a linear fit per continuous piece,
    offset to the low envelope of the host receive times (minimum transport latency). Falls back to the
    host times where the device clock is unusable."""
    n = dev_us.size
    if n < 3:
        return host_ns.astype(np.float64), "host"
    d = np.diff(dev_us) % DEVICE_CLOCK_WRAP_US
    dev = np.concatenate([[0], np.cumsum(d)]).astype(np.float64) * 1e3  # ns
    host = host_ns.astype(np.float64)
    # a piece breaks where the device clock disagrees with the host clock by > 50 ms (reset, reboot)
    breaks = np.flatnonzero(np.abs(np.diff(dev) - np.diff(host)) > 50e6) + 1
    out = np.empty(n)
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, n], strict=False):
        dv, hv = dev[a:b], host[a:b]
        if b - a < 3 or dv[-1] <= dv[0]:
            out[a:b] = hv
            continue
        slope, icpt = np.polyfit(dv - dv[0], hv - hv[0], 1)
        if not 0.99 < slope < 1.01:
            out[a:b] = hv
            continue
        fit = hv[0] + icpt + slope * (dv - dv[0])
        if np.ptp(hv - fit) < 2e3:  # host times already jitter-free (a lock-step simulation): keep them
            out[a:b] = hv
            continue
        out[a:b] = fit + np.quantile(hv - fit, 0.02)
    return out, "device"


# ----------------------------------------------------------------------------------------- resampling
def valid_segments(
    run: RunData,
    dt: float,
    exclude_flags: int,
    max_gap_s: float,
    max_cmd_age_s: float,
    fault_guard_s: float,
    input_source: str = "command",
) -> tuple[list[Segment], dict[str, int]]:
    """Resample ``run`` on the dt grid and return its valid stretches plus counts of excluded grid points.

    ``input_source``: "command" (zero-order hold of /command voltages) or "applied" (zero-order hold of the
    firmware-applied voltage logged in /state ``applied_voltage``)."""
    t = run.t_state
    grid = np.arange(0.0, t[-1] + 1e-12, dt)
    counts = {"grid": int(grid.size)}
    i = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, t.size - 1)  # state at or before
    j = np.clip(i + 1, 0, t.size - 1)
    span = t[j] - t[i]
    w = np.where(span > 0, (grid - t[i]) / np.where(span > 0, span, 1.0), 0.0)
    w = np.clip(w, 0.0, 1.0)
    x = run.x[i] + (run.x[j] - run.x[i]) * w[:, None]
    bad: dict[str, np.ndarray] = {}
    bad["state_gap"] = (span > max_gap_s) | (grid > t[-1])
    bad["flags"] = ((run.flags[i] | run.flags[j]) & exclude_flags) != 0
    bad["nonfinite_state"] = ~np.all(np.isfinite(x), axis=1)
    k = np.searchsorted(run.t_cmd, grid, side="right") - 1  # zero-order hold
    has_cmd = k >= 0
    kk = np.clip(k, 0, None)
    u = np.where(has_cmd, run.u_cmd[kk], np.nan)
    age = np.where(has_cmd, grid - run.t_cmd[kk], np.inf)
    if input_source == "command":
        bad["no_input"] = (~has_cmd) | (age > max_cmd_age_s) | ~np.isfinite(u)
    else:
        if run.applied is None:
            raise DatasetBuildError(
                f"run {run.run_id} ({', '.join(map(str, run.files))}): --input applied needs "
                "/state applied_voltage, which this run did not log"
            )
        u = run.applied[i]  # the voltage applied over the sample at or before the grid time
        bad["no_input"] = ~np.isfinite(u)
    mode_bad = np.zeros(grid.size, dtype=bool)
    mode_times = [m[0] for m in run.modes]
    if run.modes:
        mi = np.searchsorted(np.asarray(mode_times), grid, side="right") - 1
        names = np.array([m[1] for m in run.modes] + ["idle"])  # index -1 -> initial mode
        cur = names[mi]
        mode_bad = np.isin(cur, EXCLUDED_MODES) | np.char.startswith(cur.astype(str), "dry-")
    bad["mode"] = mode_bad
    fault_bad = np.zeros(grid.size, dtype=bool)
    for tf, _code in run.faults:
        fault_bad |= np.abs(grid - tf) <= fault_guard_s
    bad["fault"] = fault_bad
    invalid = np.zeros(grid.size, dtype=bool)
    for name, mask in bad.items():
        counts[name] = int(mask.sum())
        invalid |= mask
    counts["valid"] = int((~invalid).sum())
    segments = []
    for a, b in _true_runs(~invalid):
        segments.append(Segment(run.run_id, float(grid[a]), x[a:b], u[a:b, None], float(run.t0_ns)))
    return segments, counts


def _true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the True stretches of a boolean array."""
    m = np.concatenate([[False], mask, [False]]).astype(np.int8)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=False))


def cut_windows(seg_x: np.ndarray, seg_u: np.ndarray, window: int, stride: int) -> tuple[np.ndarray, ...]:
    """Windows (K, window, .) of one segment; a segment shorter than the window gives none."""
    starts = range(0, seg_x.shape[0] - window + 1, stride)
    xs = [seg_x[s : s + window] for s in starts]
    us = [seg_u[s : s + window] for s in starts]
    n, m = seg_x.shape[1], seg_u.shape[1]
    if not xs:
        return np.zeros((0, window, n)), np.zeros((0, window, m))
    return np.stack(xs), np.stack(us)


# ----------------------------------------------------------------------------------------- splitting
def parse_split(text: str | tuple[float, ...]) -> tuple[float, float, float]:
    """"0.8,0.1,0.1" -> fractions (normalised; each >= 0)."""
    try:
        vals = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError as exc:
        raise DatasetBuildError(f"--split {text!r}: expected three numbers like 0.8,0.1,0.1") from exc
    if len(vals) != 3 or any(v < 0 or not math.isfinite(v) for v in vals) or sum(vals) <= 0:
        raise DatasetBuildError(f"--split {text!r}: expected three non-negative numbers like 0.8,0.1,0.1")
    s = sum(vals)
    return vals[0] / s, vals[1] / s, vals[2] / s


def assign_runs(sizes: dict[str, int], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Whole runs to splits: shuffled (seeded), then each run goes to the split furthest below its target;
    every split with a non-zero fraction gets at least one run."""
    rng = np.random.default_rng(seed)
    ids = sorted(sizes)
    rng.shuffle(ids)
    active = [s for s, f in zip(SPLITS, fractions, strict=False) if f > 0]
    frac = dict(zip(SPLITS, fractions, strict=False))
    total = max(sum(sizes.values()), 1)
    have = dict.fromkeys(SPLITS, 0)
    out: dict[str, str] = {}
    # seed each active split with one run (smallest runs to the smallest splits)
    by_size = sorted(ids, key=lambda r: sizes[r])
    for split in sorted(active, key=lambda s: frac[s]):
        if split == "train" and len(active) > 1:
            continue
        run = by_size.pop(0)
        out[run] = split
        have[split] += sizes[run]
    for run in [r for r in ids if r not in out]:
        split = max(active, key=lambda s: frac[s] * total - have[s])
        out[run] = split
        have[split] += sizes[run]
    return out


def time_blocks(n: int, fractions: tuple[float, float, float]) -> list[tuple[str, int, int]]:
    """Contiguous [start, stop) blocks of n points: train first, then val, then test."""
    bounds = np.round(np.cumsum([0.0, *fractions]) * n).astype(int)
    return [(s, int(a), int(b)) for s, a, b in zip(SPLITS, bounds[:-1], bounds[1:], strict=False) if b > a]


# ----------------------------------------------------------------------------------------- build
def build_dataset(
    paths: list[str | Path],
    out: str | Path,
    window: int = 256,
    stride: int | None = None,
    model_dt: float | None = None,
    split: str | tuple[float, ...] = "0.8,0.1,0.1",
    seed: int = 0,
    exclude_flags: int | None = None,
    input_source: str = "command",
    max_gap_s: float | None = None,
    max_cmd_age_s: float = 0.05,
    fault_guard_s: float | None = None,
) -> dict[str, Any]:
    """Build ``out`` (.npz, fm_core.trajfile format) from logged runs; returns a report dict.

    ``exclude_flags``: device status bits that make a sample unusable (None: ``default_exclude_flags``;
    -1: any non-zero flag). ``input_source``: "command" or "applied" (see ``valid_segments``)."""
    from fm_core.trajfile import save_trajectories

    if window < 2:
        raise DatasetBuildError(f"--window must be >= 2, got {window}")
    stride = stride or max(window // 2, 1)
    if stride < 1:
        raise DatasetBuildError(f"--stride must be >= 1, got {stride}")
    fractions = parse_split(split)
    if input_source not in ("command", "applied"):
        raise DatasetBuildError(f"--input must be 'command' or 'applied', got {input_source!r}")
    if exclude_flags is None:
        exclude_flags = default_exclude_flags(input_source)
    skipped: list[str] = []
    runs = load_runs(paths, skipped)
    rig = runs[0].rig
    dt = model_dt if model_dt is not None else _metadata_dt(runs[0]) or 0.01
    if not dt > 0:
        raise DatasetBuildError(f"--model-dt must be positive, got {dt}")
    max_gap_s = max_gap_s if max_gap_s is not None else 2.0 * dt
    fault_guard_s = fault_guard_s if fault_guard_s is not None else 2.0 * dt
    n = runs[0].x.shape[1]
    for r in runs:
        if r.x.shape[1] != n:
            raise DatasetBuildError(
                f"run {r.run_id}: state dimension {r.x.shape[1]} != {n} of run {runs[0].run_id}"
            )
    state_names = list(runs[0].metadata.get("state_names") or STATE_NAMES.get(rig, []))
    if len(state_names) != n:
        raise DatasetBuildError(
            f"run {runs[0].run_id}: rig {rig!r} has no known state names for n={n} "
            "(put 'state_names' into the run metadata)"
        )

    per_run: dict[str, Any] = {}
    segs: dict[str, list[Segment]] = {}
    for r in runs:
        s, counts = valid_segments(
            r, dt, exclude_flags, max_gap_s, max_cmd_age_s, fault_guard_s, input_source
        )
        segs[r.run_id] = s
        per_run[r.run_id] = {"files": [str(f) for f in r.files], "clock": r.clock, "points": counts,
                             "warnings": r.warnings}

    active = sum(f > 0 for f in fractions)
    by_time = len(runs) < active
    xs, us, splits, sources = [], [], [], []
    run_ids: list[str] = []
    episodes: list[int] = []
    frames: list[int] = []
    stamps: list[float] = []
    n_episodes = [0]

    def add(source: str, split_name: str, sx: np.ndarray, su: np.ndarray, run_id: str, t_first_s: float
            ) -> int:
        """Windows of one continuous stretch (= one episode; t_first_s: host time of its first point)."""
        wx, wu = cut_windows(sx, su, window, stride)
        if not len(wx):
            return 0
        starts = np.arange(0, sx.shape[0] - window + 1, stride)[: len(wx)]
        episode = n_episodes[0]
        n_episodes[0] += 1
        xs.append(wx)
        us.append(wu)
        splits.extend([split_name] * len(wx))
        sources.extend([source] * len(wx))
        run_ids.extend([run_id] * len(wx))
        episodes.extend([episode] * len(wx))
        frames.extend(starts.tolist())
        stamps.extend((t_first_s + starts * dt).tolist())
        return len(wx)

    if by_time:
        note = (
            f"only {len(runs)} run(s) for {active} splits: split by contiguous time blocks inside each run "
            "(train first, then val, then test; source ids get a #split suffix)"
        )
        for r in runs:
            valid = [(sg.x, sg.u) for sg in segs[r.run_id]]
            total = sum(len(v[0]) for v in valid)
            blocks = time_blocks(total, fractions)
            cat_x = np.concatenate([v[0] for v in valid]) if valid else np.zeros((0, n))
            cat_u = np.concatenate([v[1] for v in valid]) if valid else np.zeros((0, 1))
            seg_id = np.concatenate([np.full(len(v[0]), k) for k, v in enumerate(valid)]) if valid else []
            cat_t = (np.concatenate([sg.t0_ns / 1e9 + sg.t_start + dt * np.arange(len(sg.x))
                                     for sg in segs[r.run_id]]) if valid else np.zeros(0))
            counts = {}
            for split_name, a, b in blocks:  # windows never cross a block or a segment boundary
                cnt = 0
                for k in np.unique(seg_id[a:b]):
                    idx = np.flatnonzero(seg_id[a:b] == k) + a
                    cnt += add(f"{r.run_id}#{split_name}", split_name, cat_x[idx], cat_u[idx], r.run_id,
                               float(cat_t[idx[0]]))
                counts[split_name] = cnt
            per_run[r.run_id]["split"] = counts
    else:
        note = f"{len(runs)} runs split by run"
        sizes = {r.run_id: sum(len(cut_windows(sg.x, sg.u, window, stride)[0]) for sg in segs[r.run_id])
                 for r in runs}
        assignment = assign_runs(sizes, fractions, seed)
        for r in runs:
            cnt = sum(add(r.run_id, assignment[r.run_id], sg.x, sg.u, r.run_id, sg.t0_ns / 1e9 + sg.t_start)
                      for sg in segs[r.run_id])
            per_run[r.run_id]["split"] = {assignment[r.run_id]: cnt}

    if not splits:
        raise DatasetBuildError(
            f"no valid window of {window} steps at dt={dt} in {', '.join(r.run_id for r in runs)}: "
            + "; ".join(f"{rid}: {info['points']}" for rid, info in per_run.items())
            + " (shorter --window, or check --exclude-flags / faults / gaps)"
        )
    x = np.concatenate(xs).astype(np.float32)
    u = np.concatenate(us).astype(np.float32)
    save_trajectories(
        out,
        x=x,
        u=u,
        dt=float(dt),
        state_names=state_names,
        input_names=INPUT_NAMES,
        split=np.array(splits),
        source=np.array(sources),
        rig=rig,
        run_id=np.array(run_ids),
        episode=np.array(episodes, dtype=np.int64),
        frame_index=np.array(frames, dtype=np.int64),
        timestamp=np.array(stamps, dtype=np.float64),
    )
    windows = {s: splits.count(s) for s in SPLITS}
    empty = [name for name, f in zip(SPLITS, fractions, strict=False) if f > 0 and windows[name] == 0]
    warnings = []
    if empty:
        seconds = sum(len(sg.x) for sgs in segs.values() for sg in sgs) * dt
        warnings.append(
            f"0 {' and 0 '.join(empty)} windows: {len(runs)} run(s), {seconds:.1f} s of valid data, "
            f"--window {window} steps ({window * dt:g} s); fine-tuning has nothing to "
            f"{'validate' if 'val' in empty else 'test'} on: log more or longer runs, or use a shorter "
            "--window"
        )
    return {
        "warnings": warnings,
        "skipped": skipped,
        "out": str(out),
        "rig": rig,
        "dt": float(dt),
        "window": window,
        "stride": stride,
        "shape_x": list(x.shape),
        "shape_u": list(u.shape),
        "windows": windows,
        "episodes": n_episodes[0],
        "split_mode": "time-blocks" if by_time else "by-run",
        "input": input_source,
        "exclude_flags": exclude_flags,
        "note": note,
        "runs": per_run,
    }


def _metadata_dt(run: RunData) -> float | None:
    cfg = run.metadata.get("rig_config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model_dt"), (int, float)):
        return float(cfg["model_dt"])
    return None


__all__ = ["DatasetBuildError", "LogFileError", "build_dataset", "load_runs", "valid_segments"]
