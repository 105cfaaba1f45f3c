"""visae.topimages: the streaming pass equals a brute-force computation over the whole activation matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visae.sae import SAEConfig, build_sae
from visae.shards import ShardSet, ShardWriter
from visae.topimages import TopImages, compute_top_images, default_hist_edges, hash_keys


def make_shards(path, n=700, d=16, shard_size=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    with ShardWriter(path, d=d, dtype="float32", shard_size=shard_size, source={"model": "test"}) as w:
        w.add(x, ids=[f"img_{i:04d}.png" for i in range(n)])
    return ShardSet(path)


def make_sae(d=16, d_sae=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(architecture="relu", d_in=d, d_sae=d_sae), generator=g)
    with torch.no_grad():
        sae.b_enc.sub_(0.3)  # sparser codes, and some latents that never fire
        sae.b_enc[0, :3] = -100.0
    return sae


def brute_force(sae, ss, n_top, n_random, seed, edges):
    acts = ss.read(np.arange(len(ss)))
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(acts)).double().numpy()  # [N, d_sae], all at once
    N, d_sae = f.shape
    keys = hash_keys(torch.arange(N), d_sae, seed).numpy()
    out = {k: [] for k in ("top_index", "top_value", "rand_index", "rand_value")}
    hist = np.zeros((d_sae, len(edges) - 1), np.int64)
    for j in range(d_sae):
        col = f[:, j]
        act = np.flatnonzero(col > 0)
        order = act[np.argsort(-col[act], kind="stable")][:n_top]
        out["top_index"].append(np.pad(order, (0, n_top - order.size), constant_values=-1))
        out["top_value"].append(np.pad(col[order], (0, n_top - order.size)))
        samp = act[np.argsort(keys[act, j], kind="stable")][:n_random]
        out["rand_index"].append(np.pad(samp, (0, n_random - samp.size), constant_values=-1))
        out["rand_value"].append(np.pad(col[samp], (0, n_random - samp.size)))
        b = np.clip(np.searchsorted(edges, col[act], side="right") - 1, 0, len(edges) - 2)
        np.add.at(hist[j], b, 1)
    out = {k: np.stack(v) for k, v in out.items()}
    pos = f > 0
    out.update(count=pos.sum(0), sum=np.where(pos, f, 0).sum(0), max=f.max(0).clip(0), hist=hist)
    return out


@pytest.mark.parametrize("batch_size", [64, 1000])
def test_streaming_equals_brute_force(tmp_path, batch_size):
    ss = make_shards(tmp_path / "shards")
    sae = make_sae()
    edges = default_hist_edges(1e-2, 10.0, 20)
    got = compute_top_images(sae, ss, n_top=5, n_random=4, batch_size=batch_size, seed=3, hist_edges=edges, progress=False)
    ref = brute_force(sae, ss, 5, 4, 3, edges)
    assert got.n_examples == len(ss)
    np.testing.assert_array_equal(got.count, ref["count"])
    assert (got.count == 0).sum() >= 3 and (got.count > 5).sum() > 10  # dead latents and well-populated ones
    np.testing.assert_array_equal(got.top_index, ref["top_index"])
    np.testing.assert_allclose(got.top_value, ref["top_value"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.rand_index, ref["rand_index"])
    np.testing.assert_allclose(got.rand_value, ref["rand_value"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum, ref["sum"], rtol=1e-5)
    np.testing.assert_allclose(got.max, ref["max"], rtol=1e-5)
    np.testing.assert_array_equal(got.hist_counts, ref["hist"])
    np.testing.assert_array_equal(got.hist_counts.sum(1), got.count)
    np.testing.assert_allclose(got.frequency, ref["count"] / len(ss))
    # random sample: activating examples only, distinct, not simply the top ones
    for j in np.flatnonzero(got.count >= 12):
        r = got.rand_index[j]
        assert (r >= 0).all() and len(set(r.tolist())) == r.size
        assert (got.rand_value[j] > 0).all()
    assert any(set(got.rand_index[j]) != set(got.top_index[j][:4]) for j in np.flatnonzero(got.count >= 12))


def test_save_load_roundtrip(tmp_path):
    ss = make_shards(tmp_path / "shards", n=200)
    got = compute_top_images(make_sae(), ss, n_top=3, n_random=2, batch_size=50, progress=False)
    p = got.save(tmp_path / "top_images.npz")
    back = TopImages.load(tmp_path)
    for k in ("top_index", "top_value", "rand_index", "count", "hist_counts", "hist_edges"):
        np.testing.assert_array_equal(getattr(back, k), getattr(got, k))
    assert back.n_examples == 200 and p.is_file()


def test_random_sample_is_uniform():
    # keys of a fixed latent over many examples: the n smallest are a uniform sample of the activating set
    keys = hash_keys(torch.arange(20000), 8, seed=0).numpy()
    first = np.argsort(keys[:, 5])[:2000]
    assert 0.45 < (first < 10000).mean() < 0.55
    assert abs(keys.mean() - 0.5) < 0.01


def test_width_mismatch_is_clear(tmp_path):
    ss = make_shards(tmp_path / "shards", n=20, d=8)
    with pytest.raises(ValueError, match="d_in=16"):
        compute_top_images(make_sae(d=16), ss, progress=False)
