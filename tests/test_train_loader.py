"""The shuffled loader the trainer uses: every example exactly once per epoch, order fixed by (seed, epoch)."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visae.shards import ShardSet, ShardWriter


def _write(path: Path, n: int, shard_size: int, d: int = 3) -> ShardSet:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, d)).astype(np.float32) + 0.1
    with ShardWriter(path, d, dtype="float32", shard_size=shard_size, resume=False, overwrite=True) as w:
        w.add(x, ids=[str(i) for i in range(n)])
    return ShardSet(path)


def _epoch(view, **kw) -> np.ndarray:
    parts = [b.index for b in view.epoch_batches(**kw)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 300),
    shard_size=st.integers(1, 80),
    batch_size=st.integers(1, 70),
    buffer_size=st.integers(1, 400),
    val_fraction=st.sampled_from([0.0, 0.1, 0.5]),
    seed=st.integers(0, 2**31 - 1),
    prefetch=st.sampled_from([0, 2]),
)
def test_epoch_batches_exactly_once_and_deterministic(n, shard_size, batch_size, buffer_size, val_fraction, seed, prefetch):
    shard_size = max(shard_size, n // 12)  # few shards: each commit fsyncs, keep the test fast
    with tempfile.TemporaryDirectory() as tmp:
        ss = _write(Path(tmp) / "s", n, shard_size)
        train, val = ss.split(val_fraction, seed=seed)
        assert len(train) + len(val) == n
        kw = dict(batch_size=batch_size, seed=seed, buffer_size=buffer_size, prefetch=prefetch, drop_last=False)
        orders = []
        for epoch in (0, 1):
            got = _epoch(train, epoch=epoch, **kw)
            # exactly once per epoch: a permutation of the split
            assert np.array_equal(np.sort(got), train.index)
            batches = [b for b in train.epoch_batches(epoch=epoch, **kw)]
            assert all(len(b.index) == batch_size for b in batches[:-1])
            assert all(b.acts.shape == (len(b.index), 3) for b in batches)
            # the rows carry the data of the examples they name
            if batches:
                b = batches[-1]
                np.testing.assert_array_equal(b.acts, ss.read(b.index))
            # same (seed, epoch) -> same order; start_batch resumes the same sequence
            assert np.array_equal(got, _epoch(train, epoch=epoch, **kw))
            k = len(batches) // 2
            assert np.array_equal(_epoch(train, epoch=epoch, start_batch=k, **kw),
                                  np.concatenate([b.index for b in batches[k:]]) if batches[k:] else np.zeros(0))
            orders.append(got)
        if len(train) >= 12:
            # a new permutation each epoch (equal by chance with probability <= 1/12!)
            assert not np.array_equal(orders[0], orders[1])
        # drop_last=True: at most one batch short of the rest, each example at most once
        dl = _epoch(train, epoch=0, **(kw | {"drop_last": True}))
        assert len(np.unique(dl)) == len(dl) == (len(train) // batch_size) * batch_size


def test_trainer_sees_each_training_example_once_per_epoch(tmp_path, monkeypatch):
    """Spy on the batches the trainer actually consumes."""
    import torch

    from visae import train as train_mod
    from visae.shards import ShardView

    torch.set_num_threads(1)
    ss = _write(tmp_path / "s", 1000, 128, d=8)
    seen: dict[int, list[np.ndarray]] = {}
    orig = ShardView.epoch_batches

    def spy(self, batch_size, epoch=0, **kw):
        for b in orig(self, batch_size, epoch=epoch, **kw):
            seen.setdefault(epoch, []).append(b.index.copy())
            yield b

    monkeypatch.setattr(ShardView, "epoch_batches", spy)
    cfg = train_mod.TrainConfig(shards=str(tmp_path / "s"), out=str(tmp_path / "run"), num_epochs=3, batch_size=96,
                                expansion_factor=2, progress=False, plot=False, resample_every=0, val_fraction=0.2)
    res = train_mod.train_stack(ss, train_mod.sae_config_for(cfg, ss), [1e-3], [1e-3], cfg)
    train_view, _ = ss.split(0.2, seed=0)
    assert sorted(seen) == [0, 1, 2]
    for e in range(3):
        got = np.concatenate(seen[e])
        assert np.array_equal(np.sort(got), train_view.index), f"epoch {e}"
    assert not np.array_equal(np.concatenate(seen[0]), np.concatenate(seen[1]))
    assert res.examples == 3 * len(train_view) and res.steps == 3 * -(-len(train_view) // 96)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
