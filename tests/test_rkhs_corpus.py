"""Sharded synthetic corpus: write_corpus / read_corpus round trip, reproducibility, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fm_core.rkhs import (
    CorpusError,
    RKHSConfig,
    corpus_files,
    iter_corpus,
    read_corpus,
    read_shard,
    write_corpus,
)

CFG = RKHSConfig(T=40)


def test_write_and_read_corpus_round_trip(tmp_path):
    paths = write_corpus(tmp_path / "c", 25, shard_size=10, seed=3, cfg=CFG, progress=False)
    assert [p.name for p in paths] == ["rkhs-00000.npz", "rkhs-00001.npz", "rkhs-00002.npz"]
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["count"] for s in man["shards"]] == [10, 10, 5] and man["config"]["T"] == 40
    b = read_corpus(tmp_path / "c")
    assert b.x.shape == (25, 40, 6) and b.u.shape == (25, 40, 2) and b.x.dtype == np.float32
    assert np.isfinite(b.x).all() and (b.n >= 1).all() and (b.n <= 6).all()
    assert [len(s) for s in iter_corpus(tmp_path / "c")] == [10, 10, 5]
    shard, dt = read_shard(paths[1])
    assert dt == CFG.dt
    np.testing.assert_array_equal(shard.x, b.x[10:20])
    assert corpus_files(paths) == paths


def test_corpus_is_reproducible_and_shards_independent(tmp_path):
    a = write_corpus(tmp_path / "a", 12, shard_size=6, seed=11, cfg=CFG, progress=False)
    b = write_corpus(tmp_path / "b", 6, shard_size=6, seed=11, cfg=CFG, progress=False)
    c = write_corpus(tmp_path / "c", 6, shard_size=6, seed=12, cfg=CFG, progress=False)
    np.testing.assert_array_equal(read_shard(a[0])[0].x, read_shard(b[0])[0].x)
    assert not np.array_equal(read_shard(a[0])[0].x, read_shard(c[0])[0].x)
    assert not np.array_equal(read_shard(a[0])[0].x, read_shard(a[1])[0].x)


def test_existing_corpus_not_overwritten_by_default(tmp_path):
    write_corpus(tmp_path, 4, shard_size=4, seed=0, cfg=CFG, progress=False)
    with pytest.raises(FileExistsError, match="rkhs-00000.npz"):
        write_corpus(tmp_path, 4, shard_size=4, seed=1, cfg=CFG, progress=False)
    write_corpus(tmp_path, 4, shard_size=4, seed=1, cfg=CFG, progress=False, overwrite=True)


def test_bad_shards_raise_corpus_error_naming_file_and_field(tmp_path):
    p = write_corpus(tmp_path, 4, shard_size=4, seed=0, cfg=CFG, progress=False)[0]
    with np.load(p) as z:
        data = {k: z[k] for k in z.files}
    bad = tmp_path / "nan.npz"
    x = data["x"].copy()
    x[1, 3, 0] = np.nan
    np.savez(bad, **{**data, "x": x})
    with pytest.raises(CorpusError, match=r"nan\.npz.*'x'"):
        read_shard(bad)
    missing = tmp_path / "missing.npz"
    np.savez(missing, **{k: v for k, v in data.items() if k != "m"})
    with pytest.raises(CorpusError, match=r"missing\.npz.*'m'"):
        read_shard(missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(CorpusError, match="garbage.npz"):
        read_shard(garbage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no corpus shards"):
        read_corpus(tmp_path / "empty")
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(tmp_path / "nope.npz")
