"""visae.topimages: the streaming pass equals a brute-force computation over the whole activation matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tolerances import assert_close_derived, error_bound, sae_step_bounds
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


def code_bound(sae, x):
    """(n_terms, scale [N, d_sae] float64 array) of the inference codes of rows x: streaming encodes other batches
    than the brute force (another GEMM shape, maybe another summation order), so the codes agree to this bound."""
    n_terms, P = sae_step_bounds(sae, torch.as_tensor(x), torch.zeros(1))["codes"]
    return n_terms, P[0].numpy()


def _at(scale, index):
    """scale [N, d_sae] at the rows index [d_sae, m] of each latent (-1 = padding: 0)."""
    j = np.arange(scale.shape[1])[:, None]
    return np.where(index >= 0, scale[np.clip(index, 0, None), j], 0.0)


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
    n_terms, P = code_bound(sae, ss.read(np.arange(len(ss))))
    assert_close_derived(got.top_value, ref["top_value"], n_terms=n_terms, scale=_at(P, got.top_index),
                         dtype=torch.float32, msg="top values")
    np.testing.assert_array_equal(got.rand_index, ref["rand_index"])
    assert_close_derived(got.rand_value, ref["rand_value"], n_terms=n_terms, scale=_at(P, got.rand_index),
                         dtype=torch.float32, msg="random-sample values")
    # a sum over <= N codes (each within its bound) in some order: N more terms, scale the sum of the code scales
    assert_close_derived(got.sum, ref["sum"], n_terms=n_terms + len(ss), scale=P.sum(0), dtype=torch.float32,
                         msg="sums of codes")
    assert_close_derived(got.max, ref["max"], n_terms=n_terms, scale=P.max(0), dtype=torch.float32,
                         msg="max codes")  # an order statistic moves by no more than its values
    np.testing.assert_array_equal(got.hist_counts, ref["hist"])
    np.testing.assert_array_equal(got.hist_counts.sum(1), got.count)
    np.testing.assert_array_equal(got.frequency, ref["count"] / len(ss))  # equal integer counts, one division
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


def make_patch_shards(path, n_img=90, P=4, d=16, shard_size=7, seed=1):
    """Patch rows (ids ``img_i#p<j>``, P per image); shard_size not a multiple of P: images span shards."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_img * P, d)).astype(np.float32)
    ids = [f"img_{i:04d}.png#p{j}" for i in range(n_img) for j in range(P)]
    with ShardWriter(path, d=d, dtype="float32", shard_size=shard_size, source={"model": "test", "token": "patch"}) as w:
        w.add(x, ids=ids)
    return ShardSet(path)


@pytest.mark.parametrize("score,batch_size", [("max", 5), ("mean", 64)])
def test_patch_rows_are_ranked_and_counted_per_image(tmp_path, score, batch_size):
    """Patch-token sets: the unit is the image (score = max or mean over its patches), each image at most once
    in a concept's top list, counts in images, and the kept per-patch activations (heatmaps) are the image's
    own rows; equal to a brute-force computation over the whole [images, patches, d_sae] array."""
    n_img, P = 90, 4
    ss = make_patch_shards(tmp_path / "shards", n_img=n_img, P=P)
    sae = make_sae()
    edges = default_hist_edges(1e-2, 10.0, 20)
    got = compute_top_images(sae, ss, n_top=5, n_random=4, batch_size=batch_size, seed=3, hist_edges=edges,
                             progress=False, image_score=score)
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(ss.read(np.arange(len(ss))))).double().clamp_min(0).numpy()
    H = f.reshape(n_img, P, -1)  # [images, patches, d_sae]
    s = H.max(1) if score == "max" else H.mean(1)
    keys = hash_keys(torch.arange(n_img), s.shape[1], 3).numpy()
    assert got.per_image and got.n_examples == n_img and got.n_rows == n_img * P and got.image_score == score
    np.testing.assert_array_equal(got.count, (s > 0).sum(0))
    np.testing.assert_array_equal(got.row_count, (f > 0).sum(0))
    assert (got.count > 5).sum() > 10
    # codes of other batches: per-row bound; an image's score (max or mean of its P patches) moves by no more
    # than its patches' largest bound, plus P terms for the mean
    n_terms, Pb = code_bound(sae, ss.read(np.arange(len(ss))))
    Pimg = Pb.reshape(n_img, P, -1)
    s_scale = Pimg.max(1)
    n_s = n_terms + P
    u16 = np.finfo(np.float16).eps / 2
    for j in range(s.shape[1]):
        act = np.flatnonzero(s[:, j] > 0)
        order = act[np.argsort(-s[act, j], kind="stable")][:5]
        rows = got.top_index[j][got.top_index[j] >= 0]
        assert len(set(rows.tolist())) == rows.size  # no image twice
        np.testing.assert_array_equal(rows, order * P)  # the image's first row (patch 0)
        assert_close_derived(got.top_value[j][: order.size], s[order, j], n_terms=n_s, scale=s_scale[order, j],
                             dtype=torch.float32, msg=f"latent {j}: top image scores")
        # heatmap = the image's per-patch activations, stored in float16 (one rounding, u16 relative) after the
        # codes' own bound
        heat_tol = u16 * np.abs(H[order, :, j]) + error_bound(n_terms, Pimg[order, :, j], torch.float32).numpy()
        d_heat = np.abs(got.top_heat[j][: order.size].astype(np.float64) - H[order, :, j])
        assert (d_heat <= heat_tol).all(), f"latent {j}: top heatmaps, max |diff| {d_heat.max():.3g}, bound {heat_tol.max():.3g}"
        assert (got.top_heat[j][order.size:] == 0).all()
        samp = act[np.argsort(keys[act, j], kind="stable")][:4]
        np.testing.assert_array_equal(got.rand_index[j][: samp.size], samp * P)
        heat_tol = u16 * np.abs(H[samp, :, j]) + error_bound(n_terms, Pimg[samp, :, j], torch.float32).numpy()
        d_heat = np.abs(got.rand_heat[j][: samp.size].astype(np.float64) - H[samp, :, j])
        assert (d_heat <= heat_tol).all(), f"latent {j}: random heatmaps, max |diff| {d_heat.max():.3g}, bound {heat_tol.max():.3g}"
    assert tuple(got.patch_grid) == (2, 2)
    assert_close_derived(got.max, s.max(0), n_terms=n_s, scale=s_scale.max(0), dtype=torch.float32, msg="max scores")
    np.testing.assert_array_equal(got.hist_counts.sum(1), got.count)
    back = TopImages.load(got.save(tmp_path / "top_images.npz"))
    assert back.per_image and back.n_rows == n_img * P and back.image_score == score
    np.testing.assert_array_equal(back.top_heat, got.top_heat)
    # rows as examples when asked: counts in rows again
    rows_only = compute_top_images(sae, ss, n_top=5, n_random=4, batch_size=batch_size, progress=False, per_image=False)
    assert not rows_only.per_image and rows_only.n_examples == n_img * P and rows_only.top_heat is None


def test_per_image_needs_patch_ids(tmp_path):
    ss = make_shards(tmp_path / "shards", n=20)
    with pytest.raises(ValueError, match="patch rows"):
        compute_top_images(make_sae(), ss, per_image=True, progress=False)
    with pytest.raises(ValueError, match="image_score"):
        compute_top_images(make_sae(), ss, image_score="median", progress=False)
