import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO
from tolerances import assert_close_derived
from visae.shards import ShardError, ShardSet, ShardWriter, merge_shard_sets, subset_shard_set


def _data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32)


def _write(path, x, shard_size=64, chunk=50, **kw):
    with ShardWriter(path, x.shape[1], shard_size=shard_size, **kw) as w:
        for s in range(0, len(x), chunk):
            e = min(s + chunk, len(x))
            w.add(x[s:e], ids=[f"ex{i}" for i in range(s, e)], labels=np.arange(s, e) % 7)
    return ShardSet(path)


def test_round_trip_unit_norm_and_raw(tmp_path):
    x = _data(300, 12)
    ss = _write(tmp_path / "s", x, dtype="float32")
    assert len(ss) == 300 and ss.num_shards == 5 and ss.manifest["complete"]
    assert list(ss.counts) == [64, 64, 64, 64, 44]
    stored = ss.read(np.arange(300))
    # x / |x| rounded to float32, read back times the float32 norm: at most d + 4 roundings (d squares, sqrt,
    # division, the two casts, the product), relative to the magnitudes involved (tests/tolerances.py)
    assert_close_derived(np.linalg.norm(stored, axis=1), np.ones(300), n_terms=12 + 4, scale=1.0, dtype=np.float32,
                         computations=1, msg="stored row norms")
    assert_close_derived(ss.read(np.arange(300), raw=True), x, n_terms=12 + 4, scale=np.abs(x), dtype=np.float32,
                         computations=1, msg="raw rows")
    meta = ss.metadata()
    assert list(meta["id"][:3]) == ["ex0", "ex1", "ex2"]
    np.testing.assert_array_equal(meta["label"], np.arange(300) % 7)
    assert_close_derived(meta["norm"], np.linalg.norm(x, axis=1), n_terms=12 + 2, dtype=np.float32, computations=1,
                         scale=np.linalg.norm(x, axis=1), msg="stored norms")


def test_float16_storage_and_none_normalization(tmp_path):
    x = _data(100, 8) * 3
    ss = _write(tmp_path / "h", x, dtype="float16", normalization="none")
    assert ss.dtype == np.float16
    # one rounding to float16 (u = 2^-11 relative; below 2^-14 the subnormal spacing, an absolute 2^-25)
    assert_close_derived(ss.read(np.arange(100)), x, n_terms=1, scale=np.abs(x) + 2.0 ** -14, dtype=np.float16,
                         computations=1, msg="float16 rows")
    with pytest.raises(ShardError, match="float16 range"):
        _write(tmp_path / "big", x * 1e5, dtype="float16", normalization="none")


def test_random_access_any_order(tmp_path):
    x = _data(257, 5)
    ss = _write(tmp_path / "s", x, dtype="float32", shard_size=32)
    idx = np.array([256, 0, 31, 32, 100, 31, 5])
    assert_close_derived(ss.read(idx, raw=True), x[idx], n_terms=5 + 4, scale=np.abs(x[idx]), dtype=np.float32,
                         computations=1, msg="raw rows in any order")
    with pytest.raises(IndexError):
        ss.read([257])


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from visae.shards import ShardWriter
    out, kill_after = sys.argv[1], int(sys.argv[2])
    x = np.random.default_rng(0).normal(size=(1000, 6)).astype(np.float32)
    w = ShardWriter(out, 6, shard_size=64, dtype="float32")
    start = w.num_written  # resume point: skip what is committed
    for k, s in enumerate(range(start, 1000, 30)):
        e = min(s + 30, 1000)
        w.add(x[s:e], ids=[f"ex{i}" for i in range(s, e)])
        if k == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no close()
    w.close()
    """
)


def test_writer_killed_midway_resumes_without_loss_or_duplicates(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = tmp_path / "writer.py"
    script.write_text(_KILL_SCRIPT)
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, str(script), str(out), "11"], capture_output=True, env=env)
    assert r.returncode != 0  # it really was killed
    partial = ShardSet(out, require_complete=False)
    assert not partial.manifest["complete"]
    assert 0 < len(partial) < 1000 and len(partial) % 64 == 0  # only whole shards committed
    r = subprocess.run([sys.executable, str(script), str(out), "-1"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    ss = ShardSet(out, require_complete=True)
    ids = ss.metadata()["id"]
    assert list(ids) == [f"ex{i}" for i in range(1000)]
    x = np.random.default_rng(0).normal(size=(1000, 6)).astype(np.float32)
    assert_close_derived(ss.read(np.arange(1000), raw=True), x, n_terms=6 + 4, scale=np.abs(x), dtype=np.float32,
                         computations=1, msg="raw rows written by the subprocess")


def test_exception_inside_writer_keeps_only_committed_shards(tmp_path):
    x = _data(200, 4)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "s", 4, shard_size=64) as w:
            w.add(x[:150], ids=[str(i) for i in range(150)])
            raise RuntimeError("boom")
    ss = ShardSet(tmp_path / "s", require_complete=False)
    assert len(ss) == 128 and not ss.manifest["complete"]


def test_resume_refuses_incompatible_settings(tmp_path):
    _write(tmp_path / "s", _data(10, 4), source={"model": "a"})
    with pytest.raises(ShardError, match="cannot resume.* d: 4 on disk, 5 now"):
        ShardWriter(tmp_path / "s", 5, shard_size=64, source={"model": "a"})
    with pytest.raises(ShardError, match="source.model: 'a' on disk, 'b' now"):
        ShardWriter(tmp_path / "s", 4, shard_size=64, source={"model": "b"})
    with pytest.raises(ShardError, match="shard_size: 64 on disk, 65 now"):
        ShardWriter(tmp_path / "s", 4, shard_size=65, source={"model": "a"})
    with pytest.raises(ShardError, match="exists"):
        ShardWriter(tmp_path / "s", 4, shard_size=64, source={"model": "a"}, resume=False)
    assert ShardWriter(tmp_path / "s", 4, shard_size=64, source={"model": "a"}).complete


def test_bad_rows_are_refused_with_shard_and_row(tmp_path):
    x = _data(40, 4)
    x[23, 2] = np.nan
    with pytest.raises(ShardError, match=r"shard_00000 row 23: .*NaN"):
        _write(tmp_path / "nan", x, chunk=40)
    x = _data(40, 4)
    x[7] = 0
    with pytest.raises(ShardError, match=r"row 7: .*zero norm"):
        _write(tmp_path / "zero", x, chunk=40)
    x = _data(40, 4)
    x[1, 0] = np.inf
    with pytest.raises(ShardError, match="row 1"):
        _write(tmp_path / "inf", x, chunk=40)


def test_wrong_width_and_mismatched_metadata(tmp_path):
    w = ShardWriter(tmp_path / "s", 4)
    with pytest.raises(ShardError, match=r"shape \[n, 4\]"):
        w.add(np.ones((3, 5)), ids=["a", "b", "c"])
    with pytest.raises(ShardError, match="3 activation rows but 2 ids"):
        w.add(np.ones((3, 4)), ids=["a", "b"])


def test_validate_finds_nan_in_a_set_made_elsewhere(tmp_path):
    ss = _write(tmp_path / "s", _data(100, 4), dtype="float32")
    mm = np.load(tmp_path / "s" / "shard_00001.acts.npy", mmap_mode="r+")
    mm[5, 0] = np.nan
    mm.flush()
    del mm
    with pytest.raises(ShardError, match="shard_00001.acts.npy is damaged"):  # visae recorded its checksum
        ShardSet(tmp_path / "s").validate()
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for entry in m["shards"]:  # as a tool that records no checksums writes it
        entry.pop("files")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="shard_00001.acts.npy row 5"), pytest.warns(UserWarning, match="no recorded"):
        ShardSet(tmp_path / "s").validate()
    assert len(ss) == 100


def test_truncated_shard_and_missing_manifest(tmp_path):
    _write(tmp_path / "s", _data(200, 8), dtype="float32")
    f = tmp_path / "s" / "shard_00001.acts.npy"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ShardError, match="shard_00001.acts.npy is truncated"):
        ShardSet(tmp_path / "s")
    with pytest.raises(ShardError, match="manifest.json is missing"):
        ShardSet(tmp_path)
    with pytest.raises(ShardError, match="does not exist"):
        ShardSet(tmp_path / "nope")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del m["d"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="'d' is missing"):
        ShardSet(tmp_path / "s")


def test_split_is_disjoint_and_seeded(tmp_path):
    ss = _write(tmp_path / "s", _data(500, 4))
    tr, va = ss.split(0.2, seed=1)
    assert len(va) == 100 and len(tr) == 400
    assert not set(tr.index) & set(va.index)
    assert np.array_equal(ss.split(0.2, seed=1)[1].index, va.index)
    assert not np.array_equal(ss.split(0.2, seed=2)[1].index, va.index)
    got = np.concatenate([b.index for b in va.sequential_batches(33)])
    np.testing.assert_array_equal(got, va.index)


def test_extra_columns_and_merge(tmp_path):
    parts = []
    for r in range(2):
        x = _data(70, 3, seed=r)
        with ShardWriter(tmp_path / f"rank_{r}", 3, shard_size=32, columns={"colour": "int64"},
                         label_names={"colour": ["red", "blue"]}) as w:
            w.add(x, ids=[f"r{r}_{i}" for i in range(70)], columns={"colour": np.arange(70) % 2})
        parts.append(tmp_path / f"rank_{r}")
    merged = merge_shard_sets(parts, tmp_path / "all")
    assert len(merged) == 140 and merged.num_shards == 6
    meta = merged.metadata()
    assert meta["id"][0] == "r0_0" and meta["id"][70] == "r1_0"
    np.testing.assert_array_equal(meta["colour"], np.tile(np.arange(70) % 2, 2))
    assert merged.label_names == {"colour": ["red", "blue"]}
    want = _data(70, 3, seed=1)[5]  # a float16 unit row times its norm: one float16 rounding of |row| / |x| <= 1
    assert_close_derived(merged.read([75], raw=True)[0], want, n_terms=2, dtype=np.float16, computations=1,
                         scale=np.abs(want) + np.linalg.norm(want) * 2.0 ** -14, msg="merged row")


def test_subset_is_the_selected_rows_in_order_and_rerun_safe(tmp_path):
    """subset_shard_set: rows from several shards in a scrambled order, with ids, labels, extra columns, label names
    and the source carried; a float16 unit row stored again differs from the source's by at most one float16 rounding
    (it is re-normalised from the stored row times its norm); a rerun with the same rows leaves the set as it is."""
    x = _data(150, 6, seed=3) * 2
    with ShardWriter(tmp_path / "src", 6, shard_size=40, columns={"colour": "int64"}, label_names={"colour": ["a", "b", "c"]},
                     source={"model": "m", "layer": 2}) as w:
        w.add(x, ids=[f"e{i}" for i in range(150)], labels=np.arange(150) % 5, columns={"colour": np.arange(150) % 3})
    src = ShardSet(tmp_path / "src")
    idx = np.array([149, 3, 77, 40, 41, 0, 120])
    sub = subset_shard_set(src, idx, tmp_path / "sub", shard_size=4)
    assert len(sub) == 7 and sub.num_shards == 2 and sub.manifest["complete"]
    meta, want = sub.metadata(), src.metadata()
    assert list(meta["id"]) == [f"e{i}" for i in idx]
    np.testing.assert_array_equal(meta["label"], idx % 5)
    np.testing.assert_array_equal(meta["colour"], idx % 3)
    assert sub.label_names == {"colour": ["a", "b", "c"]} and sub.source == src.source and sub.dtype == src.dtype
    # the source's float16 unit row u times its norm, divided by its float32 norm |u| (1 within float16 rounding) and
    # rounded to float16 again: at most one more float16 rounding of each entry (two in all, relative to |u|)
    rows = src.read(idx)
    assert_close_derived(sub.read(np.arange(7)), rows, n_terms=2, dtype=np.float16, computations=1,
                         scale=np.abs(rows) + 2.0 ** -14, msg="subset unit rows")
    raw = src.read(idx, raw=True)
    scale = np.abs(raw) + want["norm"][idx][:, None] * 2.0 ** -14
    assert_close_derived(sub.read(np.arange(7), raw=True), raw, n_terms=2, dtype=np.float16, computations=1,
                         scale=scale, msg="subset raw rows")
    stamp = (tmp_path / "sub" / "manifest.json").stat().st_mtime_ns
    assert len(subset_shard_set(tmp_path / "src", idx, tmp_path / "sub", shard_size=4)) == 7
    assert (tmp_path / "sub" / "manifest.json").stat().st_mtime_ns == stamp  # the same rows: not rewritten
    other = subset_shard_set(src, idx[:3], tmp_path / "sub")  # other rows: replaced
    assert list(other.metadata()["id"]) == ["e149", "e3", "e77"]
    with pytest.raises(ShardError, match=r"out of range \[0, 150\)"):
        subset_shard_set(src, [0, 150], tmp_path / "bad")
    with pytest.raises(ShardError, match="no rows"):
        subset_shard_set(src, [], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    shard_size=st.integers(1, 80),
    batch=st.integers(1, 64),
    buffer=st.integers(1, 400),
    epoch=st.integers(0, 3),
)
def test_epoch_iterator_yields_each_example_exactly_once(tmp_path_factory, n, shard_size, batch, buffer, epoch):
    d = tmp_path_factory.mktemp("p")
    x = _data(n, 3) + 0.1
    with ShardWriter(d, 3, shard_size=shard_size, dtype="float32") as w:
        w.add(x, ids=[str(i) for i in range(n)])
    ss = ShardSet(d)
    view = ss.all()
    batches = list(view.epoch_batches(batch, epoch=epoch, seed=3, buffer_size=buffer, drop_last=False))
    idx = np.concatenate([b.index for b in batches])
    assert sorted(idx.tolist()) == list(range(n))
    assert all(len(b.index) == batch for b in batches[:-1])
    for b in batches[:3]:
        np.testing.assert_array_equal(b.acts, ss.read(b.index))
    again = np.concatenate([b.index for b in view.epoch_batches(batch, epoch=epoch, seed=3, buffer_size=buffer, drop_last=False)])
    np.testing.assert_array_equal(idx, again)
    # start_batch resumes the same epoch exactly
    tail = np.concatenate([b.index for b in view.epoch_batches(batch, epoch=epoch, seed=3, buffer_size=buffer,
                                                                drop_last=False, start_batch=1)] or [np.zeros(0, int)])
    np.testing.assert_array_equal(tail, idx[len(batches[0].index):])


def test_epochs_differ_and_drop_last(tmp_path):
    ss = _write(tmp_path / "s", _data(1000, 4), shard_size=100)
    tr, _ = ss.split(0.1)
    e0 = np.concatenate([b.index for b in tr.epoch_batches(64, epoch=0)])
    e1 = np.concatenate([b.index for b in tr.epoch_batches(64, epoch=1)])
    assert len(e0) == (900 // 64) * 64 and len(set(e0)) == len(e0)
    assert not np.array_equal(e0, e1)


def test_epoch_iterator_memory_is_bounded_by_buffer(tmp_path):
    """With a small buffer, a batch never mixes more shards than the buffer can hold (not a full load)."""
    ss = _write(tmp_path / "s", _data(1000, 4), shard_size=100)
    shard_of = lambda idx: set((idx // 100).tolist())  # noqa: E731
    for b in ss.all().epoch_batches(50, epoch=0, buffer_size=100, prefetch=0):
        assert len(shard_of(b.index)) <= 2  # one shard plus carried-over remainder
