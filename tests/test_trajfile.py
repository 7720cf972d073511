"""Trajectory dataset files: round trip, validation errors naming file and field, splits, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fm_core.trajfile import (
    FORMAT_VERSION,
    TrajectoryFileError,
    TrajectorySet,
    load_trajectories,
    normalisation_stats,
    save_trajectories,
    split_by_source,
    split_trajectories,
    subsample,
)

STATES = ["p", "theta", "p_dot", "theta_dot"]
INPUTS = ["voltage"]


def _arrays(k: int = 6, t: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sources = [f"run{i // 2}" for i in range(k)]              # two trajectories per run
    split = np.array(["train", "train", "val", "val", "test", "test"] * (k // 6 + 1))[:k]
    return {"x": rng.normal(size=(k, t, 4)).astype(np.float32), "u": rng.normal(size=(k, t, 1)),
            "dt": 0.01, "state_names": STATES, "input_names": INPUTS, "split": split, "source": sources,
            "rig": "cartpole"}


def _raw(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _resave(path, tmp_path, name: str, **changes) -> str:
    data = {**_raw(path), **changes}
    data = {k: v for k, v in data.items() if v is not None}
    out = tmp_path / name
    with open(out, "wb") as fh:
        np.savez(fh, **data)
    return str(out)


def test_round_trip(tmp_path):
    a = _arrays()
    p = save_trajectories(tmp_path / "d.npz", **a)
    ts = load_trajectories(p)
    np.testing.assert_array_equal(ts.x, a["x"])
    np.testing.assert_allclose(ts.u, a["u"].astype(np.float32))
    assert ts.x.dtype == np.float32 and ts.u.dtype == np.float32
    assert ts.dt == 0.01 and ts.state_names == STATES and ts.input_names == INPUTS and ts.rig == "cartpole"
    assert ts.split.tolist() == list(a["split"]) and ts.source.tolist() == a["source"]
    assert (len(ts), ts.T, ts.n, ts.m) == (6, 20, 4, 1)
    assert int(_raw(p)["format_version"]) == 1  # no provenance fields: still the version-1 layout
    assert not ts.has_provenance and ts.episode is None
    # a set saves itself and m = 0 (no inputs) works
    ts.subset("train").save(tmp_path / "t.npz")
    assert len(load_trajectories(tmp_path / "t.npz")) == 2
    b = {**a, "u": np.zeros((6, 20, 0)), "input_names": []}
    assert load_trajectories(save_trajectories(tmp_path / "auto.npz", **b)).m == 0


def _provenance(k: int = 6) -> dict:
    return {"run_id": [f"run{i // 2}" for i in range(k)], "episode": np.arange(k) // 2,
            "frame_index": (np.arange(k) % 2) * 10, "timestamp": 1.7e9 + np.arange(k) * 0.5}


def test_provenance_round_trip_subset_and_concatenation(tmp_path):
    a = {**_arrays(), **_provenance()}
    p = save_trajectories(tmp_path / "p.npz", **a)
    assert int(_raw(p)["format_version"]) == FORMAT_VERSION == 2
    ts = load_trajectories(p)
    assert ts.has_provenance and ts.run_id.tolist() == a["run_id"]
    assert ts.episode.tolist() == [0, 0, 1, 1, 2, 2] and ts.frame_index.tolist() == [0, 10] * 3
    np.testing.assert_array_equal(ts.frame_indices()[1], np.arange(10, 30))
    np.testing.assert_allclose(ts.timestamps()[2], 1.7e9 + 1.0 + 0.01 * np.arange(20))
    val = ts.subset("val")
    assert val.episode.tolist() == [1, 1] and val.timestamp.tolist() == [1.7e9 + 1.0, 1.7e9 + 1.5]
    both = load_trajectories([p, val.save(tmp_path / "v.npz")])  # episodes of the 2nd file renumbered
    assert both.episode.tolist() == [0, 0, 1, 1, 2, 2, 4, 4]
    plain = load_trajectories([p, save_trajectories(tmp_path / "old.npz", **_arrays())])
    assert not plain.has_provenance and len(plain) == 12  # mixed with a version-1 file: dropped
    with pytest.raises(ValueError, match="no frame indices .*rigfm dataset build"):
        plain.frame_indices()


def test_provenance_fields_are_validated(tmp_path):
    base = {**_arrays(), **_provenance()}
    with pytest.raises(TrajectoryFileError, match="field 'timestamp' is missing"):
        save_trajectories(tmp_path / "a.npz", **{**base, "timestamp": None})
    with pytest.raises(TrajectoryFileError, match="field 'episode' has 5 entries but there are K=6"):
        save_trajectories(tmp_path / "b.npz", **{**base, "episode": np.arange(5)})
    with pytest.raises(TrajectoryFileError, match="field 'timestamp' has NaN"):
        save_trajectories(tmp_path / "c.npz", **{**base, "timestamp": np.full(6, np.nan)})
    p = save_trajectories(tmp_path / "ok.npz", **base)
    with pytest.raises(TrajectoryFileError, match="field 'run_id' needs format_version 2"):
        load_trajectories(_resave(p, tmp_path, "v1.npz", format_version=np.int64(1)))


def test_subset_fraction_and_normalisation(tmp_path):
    a = _arrays(k=12)
    a["x"][:, :, 1] = 3.0                                     # a constant channel -> std floored to 1
    ts = load_trajectories(save_trajectories(tmp_path / "d.npz", **a))
    tr = ts.subset("train")
    assert set(tr.split.tolist()) == {"train"} and len(tr) == 4
    assert len(ts.subset(["val", "test"])) == 8
    with pytest.raises(ValueError, match="bogus"):
        ts.subset("bogus")
    norm = normalisation_stats(tr)
    x_tr = a["x"][a["split"] == "train"].reshape(-1, 4)
    np.testing.assert_allclose(norm["x_mean"], x_tr.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(norm["x_std"])[[0, 2, 3]], x_tr.std(0)[[0, 2, 3]], rtol=1e-5)
    assert norm["x_std"][1] == pytest.approx(3e-3) and norm["x_mean"][1] == 3.0  # 1e-3 max(1, |mean|)
    assert len(norm["u_mean"]) == 1 and set(norm) == {"x_mean", "x_std", "u_mean", "u_std"}
    f1, f2, f3 = subsample(ts, 0.25, seed=1), subsample(ts, 0.25, seed=1), subsample(ts, 0.25, seed=2)
    assert isinstance(f1, TrajectorySet) and len(f1) == 3 and np.array_equal(f1.x, f2.x)
    rows = [int(np.flatnonzero((ts.x == xi).all(axis=(1, 2)))[0]) for xi in f1.x]  # fields follow the rows
    assert rows == sorted(rows) and np.array_equal(f1.split, ts.split[rows]) and np.array_equal(f1.source,
                                                                                                ts.source[rows])
    assert not np.array_equal(f1.source, f3.source) or not np.array_equal(f1.x, f3.x)
    assert len(subsample(ts, 0.01, 0)) == 1 and len(subsample(ts, 1.0, 0)) == 12
    with pytest.raises(ValueError, match="fraction"):
        subsample(ts, 0.0, 0)
    with pytest.raises(ValueError, match="no trajectories with split == 'val'"):
        split_trajectories(tr, "val")


def test_missing_field_named(tmp_path):
    p = save_trajectories(tmp_path / "d.npz", **_arrays())
    for field in ("x", "dt", "split", "rig", "format_version"):
        bad = _resave(p, tmp_path, f"no_{field}.npz", **{field: None})
        with pytest.raises(TrajectoryFileError, match=rf"no_{field}\.npz: field '{field}' is missing"):
            load_trajectories(bad)


def test_wrong_ndim_and_name_mismatch(tmp_path):
    p = save_trajectories(tmp_path / "d.npz", **_arrays())
    raw = _raw(p)
    bad = _resave(p, tmp_path, "ndim.npz", x=raw["x"][0])
    with pytest.raises(TrajectoryFileError, match=r"ndim\.npz: field 'x' must be 3-d"):
        load_trajectories(bad)
    bad = _resave(p, tmp_path, "names.npz", state_names=np.array(["a", "b"]))
    with pytest.raises(TrajectoryFileError, match=r"names\.npz: field 'state_names' has 2 names but x has"):
        load_trajectories(bad)
    bad = _resave(p, tmp_path, "inames.npz", input_names=np.array(["v", "w"]))
    with pytest.raises(TrajectoryFileError, match="field 'input_names' has 2 names but u has m=1"):
        load_trajectories(bad)
    bad = _resave(p, tmp_path, "kt.npz", u=raw["u"][:, :10])
    with pytest.raises(TrajectoryFileError, match="kt.npz: field 'u'"):
        load_trajectories(bad)
    bad = _resave(p, tmp_path, "k.npz", source=raw["source"][:3])
    with pytest.raises(TrajectoryFileError, match="field 'source' has 3 entries but there are K=6"):
        load_trajectories(bad)


def test_nan_inf_reports_trajectory_and_step(tmp_path):
    a = _arrays()
    a["x"][4, 13, 2] = np.inf
    msg = r"bad\.npz \(saving\): field 'x' has NaN/Inf at trajectory 4, time step 13 \(channel 2 'p_dot'"
    with pytest.raises(TrajectoryFileError, match=msg):
        save_trajectories(tmp_path / "bad.npz", **a)
    assert not (tmp_path / "bad.npz").exists()
    p = save_trajectories(tmp_path / "ok.npz", **_arrays())
    u = _raw(p)["u"].copy()
    u[1, 7, 0] = np.nan
    msg = r"nanu\.npz: field 'u' has NaN/Inf at trajectory 1, time step 7"
    with pytest.raises(TrajectoryFileError, match=msg):
        load_trajectories(_resave(p, tmp_path, "nanu.npz", u=u))


def test_bad_dt_split_labels_version_and_unreadable(tmp_path):
    for dt in (0.0, -0.01, float("nan")):
        with pytest.raises(TrajectoryFileError, match="field 'dt' must be finite and > 0"):
            save_trajectories(tmp_path / "dt.npz", **{**_arrays(), "dt": dt})
    a = _arrays()
    a["split"] = ["training"] + list(a["split"][1:])
    with pytest.raises(TrajectoryFileError, match=r"field 'split' has unknown label\(s\) \['training'\]"):
        save_trajectories(tmp_path / "s.npz", **a)
    a = _arrays()
    a["source"] = ["same"] * 6
    with pytest.raises(TrajectoryFileError, match="field 'split' mixes source 'same'"):
        save_trajectories(tmp_path / "mix.npz", **a)
    p = save_trajectories(tmp_path / "ok.npz", **_arrays())
    with pytest.raises(TrajectoryFileError, match="field 'format_version'"):
        load_trajectories(_resave(p, tmp_path, "v.npz", format_version=np.int64(99)))
    (tmp_path / "junk.npz").write_bytes(b"\x01\x02junk\xff")
    with pytest.raises(TrajectoryFileError, match=r"junk\.npz: not a numpy \.npz archive \(not a zip"):
        load_trajectories(tmp_path / "junk.npz")
    zipped = tmp_path / "broken.npz"  # a zip header, then garbage: numpy's own error, named
    zipped.write_bytes(p.read_bytes()[:200])
    with pytest.raises(TrajectoryFileError, match=r"broken\.npz: (cannot read|not a numpy)"):
        load_trajectories(zipped)


def test_a_file_that_is_not_an_npz_archive_says_so(tmp_path):
    """A text file, a .npy array or an empty file given as .npz: named as such (numpy alone says "pickled
    (object) data ... allow_pickle" for the text file)."""
    (tmp_path / "notes.npz").write_text("x,u\n1,2\n")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    (tmp_path / "arr.npy").rename(tmp_path / "arr.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    cases = (("notes", "a text file"), ("arr", "a single-array .npy file"), ("empty", "an empty file"))
    for name, kind in cases:
        with pytest.raises(TrajectoryFileError) as err:
            load_trajectories(tmp_path / f"{name}.npz")
        msg = str(err.value)
        assert msg.startswith(str(tmp_path / f"{name}.npz")) and f"not a numpy .npz archive ({kind})" in msg
        assert "pickle" not in msg
    with pytest.raises(TrajectoryFileError, match="not found"):
        load_trajectories(tmp_path / "absent.npz")


def test_load_multiple_files_concatenates_and_checks_agreement(tmp_path):
    a, b = _arrays(seed=1), _arrays(seed=2)
    b["source"] = [f"other{i // 2}" for i in range(6)]
    p1 = save_trajectories(tmp_path / "a.npz", **a)
    p2 = save_trajectories(tmp_path / "b.npz", **b)
    ts = load_trajectories([p1, p2])
    assert len(ts) == 12 and ts.paths == (p1, p2)
    np.testing.assert_array_equal(ts.x[6:], b["x"])
    p3 = save_trajectories(tmp_path / "c.npz", **{**b, "dt": 0.02})
    with pytest.raises(TrajectoryFileError, match=r"c\.npz: field 'dt' 0.02 differs"):
        load_trajectories([p1, p3])
    p4 = save_trajectories(tmp_path / "e.npz", **{**b, "state_names": ["a", "b", "c", "d"]})
    with pytest.raises(TrajectoryFileError, match=r"e\.npz: field 'state_names'"):
        load_trajectories([p1, p4])
    # the same run id in two files under different splits is caught
    p5 = save_trajectories(tmp_path / "f.npz", **{**a, "split": ["test"] * 6})
    with pytest.raises(TrajectoryFileError, match="mixes source 'run0'"):
        load_trajectories([p1, p5])


def test_split_by_source_never_mixes_and_roughly_hits_fractions():
    rng = np.random.default_rng(0)
    sources = np.repeat([f"run{i}" for i in range(40)], rng.integers(1, 8, size=40))
    labels = split_by_source(sources, (0.7, 0.15, 0.15), seed=3)
    assert labels.shape == sources.shape and set(labels.tolist()) == {"train", "val", "test"}
    for s in np.unique(sources):
        assert len(set(labels[sources == s].tolist())) == 1
    share = {k: (labels == k).mean() for k in ("train", "val", "test")}
    assert abs(share["train"] - 0.7) < 0.12 and abs(share["val"] - 0.15) < 0.1
    np.testing.assert_array_equal(labels, split_by_source(sources, (0.7, 0.15, 0.15), seed=3))
    assert not np.array_equal(labels, split_by_source(sources, (0.7, 0.15, 0.15), seed=4))
    # few sources: every split with a positive fraction still gets one
    few = split_by_source(["a", "a", "b", "c"], {"train": 0.9, "val": 0.05, "test": 0.05})
    assert set(few.tolist()) == {"train", "val", "test"}
    assert set(split_by_source(["a", "b"], {"train": 1.0}).tolist()) == {"train"}
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_source(["a"], (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="unknown split"):
        split_by_source(["a"], {"training": 1.0})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=60), st.integers(0, 2**16),
       st.sampled_from([(0.8, 0.1, 0.1), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0), (0.34, 0.33, 0.33)]))
def test_split_by_source_property(ids, seed, fractions):
    sources = [f"r{i}" for i in ids]
    labels = split_by_source(sources, fractions, seed=seed)
    assert labels.shape == (len(ids),)
    by_source: dict[str, set] = {}
    for s, lab in zip(sources, labels.tolist(), strict=True):
        by_source.setdefault(s, set()).add(lab)
    assert all(len(v) == 1 for v in by_source.values())
    used = set(labels.tolist())
    assert used <= {name for name, f in zip(("train", "val", "test"), fractions, strict=True) if f > 0}
    if len(by_source) >= 3:
        assert used == {name for name, f in zip(("train", "val", "test"), fractions, strict=True) if f > 0}
