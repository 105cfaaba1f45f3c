"""Per concept: top-activating images, a random sample of activating ones, and activation statistics.

One streaming pass over a shard set: batches go through ``sae.encode`` and only O(d_sae * (n_top +
n_random + bins)) state is kept, never the [N, d_sae] activation matrix:

- top-N: a running ``torch.topk`` over concat(kept, batch) per latent (only activations > 0 count);
- random activating sample: every (example, latent) pair gets a pseudo-random key from a hash of
  (global example index, latent, seed); each latent keeps the ``n_random`` activating examples with
  the smallest keys. That is a uniform sample without replacement (reservoir sampling with random
  keys), and it does not depend on the batch size or shard order;
- frequency (fraction of examples with activation > 0), mean activation when active, maximum, and a
  histogram of the positive activations on fixed log-spaced bins (shared by all latents so it streams).

Patch-token shard sets (ids ``<image>#p<j>``): the unit is the image. Rows are regrouped so an image is
never split between batches; an image's score for a latent is the max (default) or mean of its patch
activations, and every statistic above is over images (no photo repeated in a top list, counts in
images); for each kept image the per-patch activations are kept as its heatmap.

Shard rows are fed as stored (what the trainer trained on); an SAE with ``input_normalization=
"unit_norm"`` sees the same thing either way.

Saved as ``top_images.npz`` (see docs/naming.md)::

    top_index  [d_sae, n_top]  int64, global example index into the shard set, -1 = fewer activating examples
    top_value  [d_sae, n_top]  float32, descending
    rand_index [d_sae, n_random] int64 (-1 padded), rand_value [d_sae, n_random] float32
    count [d_sae] int64   sum [d_sae] float64   max [d_sae] float32
    hist_edges [bins + 1] float64   hist_counts [d_sae, bins] int64   n_examples, seed
    patch-token sets only: unit "image", image_score "max" | "mean", n_rows, row_count [d_sae] int64,
    top_heat [d_sae, n_top, P] float16, rand_heat [d_sae, n_random, P] float16, patch_grid [2] (rows, cols)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visae.atomic import atomic_write_bytes
from visae.errors import VisaeError
from visae.shards import ShardError, ShardSet

__all__ = ["TopImagesError", "TopImages", "compute_top_images", "hash_keys", "default_hist_edges", "patch_layout", "TOP_IMAGES_FILE",
           "IMAGE_SCORES"]


class TopImagesError(VisaeError, ValueError, FileNotFoundError):
    """A ``top_images.npz`` that is missing, lacks arrays, or is not the one its ``concepts.json`` committed (a
    naming run killed between the two files, or another run's statistics): exit status 2. Also a
    ``FileNotFoundError``, which a missing file raised before."""

TOP_IMAGES_FILE = "top_images.npz"
_M32 = 0xFFFFFFFF


def default_hist_edges(lo: float = 1e-3, hi: float = 1e3, bins: int = 60) -> np.ndarray:
    """Log-spaced histogram edges; values outside [lo, hi) are clamped into the end bins."""
    return np.geomspace(lo, hi, bins + 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # 32-bit integer hash (xor-shift-multiply); values stay < 2^59 inside int64, so nothing overflows.
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def hash_keys(index: torch.Tensor, d_sae: int, seed: int = 0) -> torch.Tensor:
    """Pseudo-random keys in [0, 1) for every (example, latent): index [B] int64 -> [B, d_sae] float64."""
    idx = index.to(torch.int64)[:, None]
    lat = torch.arange(d_sae, dtype=torch.int64, device=index.device)[None, :]
    a = _mix32((idx & _M32) ^ _mix32((idx >> 32) + (seed & _M32) * 0x9E37 & _M32))
    x = _mix32(a ^ _mix32(lat + 0x5BD1))
    y = _mix32(x ^ (seed * 0x27D4 & _M32))
    return ((x << 21) + (y >> 11)).double() / 9007199254740992.0  # 53 random bits: exact in float64


@dataclass
class TopImages:
    """Result of the streaming pass (arrays described in the module docstring)."""

    top_index: np.ndarray
    top_value: np.ndarray
    rand_index: np.ndarray
    rand_value: np.ndarray
    count: np.ndarray
    sum: np.ndarray
    max: np.ndarray
    hist_edges: np.ndarray
    hist_counts: np.ndarray
    n_examples: int
    seed: int = 0
    # patch-token shard sets (unit "image"): n_examples counts images, n_rows patch rows
    unit: str = "example"
    image_score: str = ""
    n_rows: int = -1
    row_count: np.ndarray | None = None
    top_heat: np.ndarray | None = None
    rand_heat: np.ndarray | None = None
    patch_grid: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.n_rows < 0:
            self.n_rows = int(self.n_examples)

    @property
    def per_image(self) -> bool:
        """Whether the unit is the image of a patch-token shard set (heatmaps available)."""
        return self.unit == "image"

    @property
    def d_sae(self) -> int:
        return int(self.count.shape[0])

    @property
    def frequency(self) -> np.ndarray:
        """Fraction of examples on which each latent is active (> 0): [d_sae]."""
        return self.count / max(self.n_examples, 1)

    @property
    def mean_activation(self) -> np.ndarray:
        """Mean activation over the examples where the latent is active (0 for dead latents): [d_sae]."""
        return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), 0.0)

    def save(self, path: str | Path) -> Path:
        import io

        path = Path(path)
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in self.__dict__.items() if v is not None})
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TopImages":
        """Read a ``top_images.npz``; when a ``concepts.json`` sits beside it, it must be the file that
        concepts.json committed (its SHA-256, recorded by ``visae name``), else TopImagesError (a naming run
        killed between the two files, or another run's statistics)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOP_IMAGES_FILE
        if not path.is_file():
            raise TopImagesError(f"{path} does not exist (written by `visae name` when the shard set is known)")
        _check_committed(path)
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        import dataclasses

        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = required - set(d)
        if missing:
            raise TopImagesError(f"{path}: missing arrays {sorted(missing)}")
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("n_examples", "seed", "n_rows"):
            if k in d:
                d[k] = int(d[k])
        for k in ("unit", "image_score"):
            if k in d:
                d[k] = str(d[k])
        return cls(**d)


def _check_committed(path: Path) -> None:
    """``path`` must be the top-images file that the ``concepts.json`` beside it recorded (when it records one)."""
    import json

    from visae.integrity import sha256_file

    concepts = path.parent / "concepts.json"
    if not concepts.is_file():
        return
    try:
        doc = json.loads(concepts.read_text())
    except (OSError, ValueError):
        return  # read_concepts reports a broken concepts.json
    rec = doc.get("top_images_file") if isinstance(doc, dict) else None
    if not isinstance(rec, dict) or rec.get("name") != path.name:
        if isinstance(doc, dict) and "top_images_file" in doc and rec is None:
            raise TopImagesError(f"{path} is not part of {concepts} (it records no top images): left over from another "
                             "run; rerun `visae name`")
        return  # written before visae recorded it: nothing to compare
    if sha256_file(path) != rec.get("sha256"):
        raise TopImagesError(f"{path} does not belong to {concepts} (its SHA-256 differs from the one recorded there): "
                         "an interrupted `visae name` or another SAE's statistics; rerun `visae name`")


def patch_layout(ids: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Image grouping of patch rows: ids ``<image>#p<j>`` [N] -> (image number [N] int64, patch j [N] int64).

    Image numbers count consecutive runs of the same image id (0, 1, ...), in row order. Returns None
    when any id has no ``#p<j>`` suffix (a set of one row per image).
    """
    img = np.empty(len(ids), np.int64)
    patch = np.empty(len(ids), np.int64)
    prev, g = None, -1
    for r, sid in enumerate(ids):
        base, sep, j = str(sid).rpartition("#p")
        if not sep or not j.isdigit():
            return None
        if base != prev:
            g, prev = g + 1, base
        img[r], patch[r] = g, int(j)
    return img, patch


def _image_chunks(batches: Any, img: np.ndarray) -> Any:
    """Regroup row batches so that no image's rows are split between two chunks (an image's rows are
    consecutive). Holds at most one batch plus the rows of one unfinished image."""
    pend_a: np.ndarray | None = None
    pend_i: np.ndarray | None = None
    for b in batches:
        a = b.acts if pend_a is None else np.concatenate([pend_a, b.acts])
        i = b.index if pend_i is None else np.concatenate([pend_i, b.index])
        g = img[i]
        cut = int(np.flatnonzero(g != g[-1])[-1]) + 1 if (g != g[-1]).any() else 0  # start of the last image
        if cut:
            yield a[:cut], i[:cut]
        pend_a, pend_i = a[cut:], i[cut:]
    if pend_a is not None and len(pend_a):
        yield pend_a, pend_i


IMAGE_SCORES = ("max", "mean")


@torch.no_grad()
def compute_top_images(
    sae: Any,
    shards: str | Path | ShardSet,
    *,
    n_top: int = 16,
    n_random: int = 8,
    batch_size: int = 4096,
    seed: int = 0,
    hist_edges: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    per_image: bool | None = None,
    image_score: str = "max",
) -> TopImages:
    """One streaming pass of ``sae`` (a single SAE, S = 1) over every example of ``shards``.

    Patch-token shard sets (ids ``<image>#p<j>``, one row per patch; ``per_image=None`` detects them,
    ``True`` requires them, ``False`` treats rows as examples): the unit is the image. Each image's
    score for a latent is the ``image_score`` of its patch activations (``"max"``, default, or
    ``"mean"`` over the image's patches); top images, the random sample, count, sum, max and the
    histogram are over these image scores (``n_examples`` = number of images), and for each kept image
    its per-patch activations are kept too (``top_heat`` / ``rand_heat``, the heatmaps). Rows are
    regrouped so an image is never split across batches; memory stays O(d_sae * (n_top + n_random) *
    patches + batch), never all patch activations.

    Raises:
        ShardError: width mismatch, a NaN/Inf row (file and row named).
        ValueError: stacked SAE, unknown ``image_score``, ``per_image=True`` on a set without patch ids.
    """
    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    if ss.d != sae.d_in:
        raise ShardError(f"{ss.path}: activations have d={ss.d} but the SAE has d_in={sae.d_in} (a shard set of "
                         "another model or layer?)")
    if getattr(sae, "n_models", 1) != 1:
        raise ValueError("compute_top_images needs a single SAE; pass sae.member(i)")
    if image_score not in IMAGE_SCORES:
        raise ValueError(f"image_score={image_score!r}: expected one of {IMAGE_SCORES}")
    layout = None
    if per_image is not False and len(ss):
        first = str(ss.shard_meta(0)["id"][0])
        if "#p" in first or per_image:
            layout = patch_layout(ss.metadata()["id"])
        if layout is None and per_image:
            raise ValueError(f"{ss.path}: per_image needs patch rows (ids '<image>#p<j>'); first id is {first!r}")
    device = torch.device(device)
    d_sae = int(sae.d_sae)
    edges = default_hist_edges() if hist_edges is None else np.asarray(hist_edges, np.float64)
    edges_t = torch.as_tensor(edges[1:-1], dtype=torch.float32, device=device)  # inner edges for bucketize
    bins = len(edges) - 1
    P = int(layout[1].max()) + 1 if layout is not None else 0

    top_v = torch.zeros(d_sae, 0, device=device)
    top_i = torch.zeros(d_sae, 0, dtype=torch.int64, device=device)
    top_h = torch.zeros(d_sae, 0, P, device=device)  # per-patch activations of the kept top images
    rk_k = torch.zeros(d_sae, 0, dtype=torch.float64, device=device)  # keys of the random sample
    rk_i = torch.zeros(d_sae, 0, dtype=torch.int64, device=device)
    rk_v = torch.zeros(d_sae, 0, device=device)
    rk_h = torch.zeros(d_sae, 0, P, device=device)
    count = torch.zeros(d_sae, dtype=torch.int64, device=device)
    row_count = torch.zeros(d_sae, dtype=torch.int64, device=device)
    total = torch.zeros(d_sae, dtype=torch.float64, device=device)
    vmax = torch.zeros(d_sae, device=device)
    hist = torch.zeros(d_sae * bins, dtype=torch.int64, device=device)
    n = 0
    n_rows = 0
    it: Any = ss.sequential_batches(batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=-(-len(ss) // batch_size), desc="top images", unit="batch", leave=False)
    chunks = ((b.acts, b.index) for b in it) if layout is None else _image_chunks(it, layout[0])
    for acts, index in chunks:
        bad = ~np.isfinite(acts).all(axis=1)
        if bad.any():  # one NaN row would make every latent's statistics NaN
            shard, row = ss.locate(index[np.flatnonzero(bad)[:1]])
            raise ShardError(f"{ss.path}/{ss.manifest['shards'][int(shard[0])]['name']}.acts.npy row {int(row[0])}: "
                             f"activation holds NaN or Inf ({int(bad.sum())} such row(s) in this batch); re-extract "
                             "the shard set (`--validate_shards full` finds every one)")
        x = torch.from_numpy(np.ascontiguousarray(acts)).to(device)
        f = sae.encode(x).float()  # [B, d_sae]
        if f.ndim != 2:
            raise ValueError("sae.encode returned stacked codes; pass a single SAE (sae.member(i))")
        n_rows += f.shape[0]
        row_count += (f > 0).sum(0)
        heat = None
        if layout is None:
            idx = torch.from_numpy(index).to(device)
            key_idx = idx
            fT = f.T  # [d_sae, B]
        else:  # rows -> images: [m, P, d_sae] per-patch activations, image score [m, d_sae]
            g_np = layout[0][index]
            first = np.flatnonzero(np.r_[True, g_np[1:] != g_np[:-1]])  # first row of each image in the chunk
            local = torch.from_numpy(np.cumsum(np.r_[False, g_np[1:] != g_np[:-1]])).to(device)
            m = len(first)
            H = torch.zeros(m, P, d_sae, device=device)
            H[local, torch.from_numpy(layout[1][index]).to(device)] = f.clamp_min(0)
            if image_score == "max":
                s_img = H.amax(1)
            else:
                rows_per = torch.bincount(local, minlength=m).clamp_min(1).to(f.dtype)
                s_img = H.sum(1) / rows_per[:, None]
            idx = torch.from_numpy(index[first]).to(device)  # the image's first row (patch 0)
            key_idx = torch.from_numpy(g_np[first]).to(device)  # image number: sample independent of batching
            fT = s_img.T  # [d_sae, m]
            heat = H.permute(2, 0, 1)  # [d_sae, m, P]
        pos = fT > 0
        n += fT.shape[1]
        count += pos.sum(1)
        total += fT.double().clamp_min(0).sum(1)
        vmax = torch.maximum(vmax, fT.max(1).values.clamp_min(0))
        # histogram of positive activations: scatter into flat [d_sae * bins]
        lat, col = pos.nonzero(as_tuple=True)
        if lat.numel():
            b = torch.bucketize(fT[lat, col], edges_t, right=True)
            hist.scatter_add_(0, lat * bins + b, torch.ones_like(b))
        bidx = idx[None, :].expand(d_sae, -1)
        if n_top > 0:
            cand_v = torch.cat([top_v, torch.where(pos, fT, torch.zeros_like(fT))], 1)
            cand_i = torch.cat([top_i, torch.where(pos, bidx, torch.full_like(bidx, -1))], 1)
            kk = min(n_top, cand_v.shape[1])
            top_v, sel = cand_v.topk(kk, dim=1)
            top_i = cand_i.gather(1, sel)
            if heat is not None:
                top_h = torch.cat([top_h, heat], 1).gather(1, sel[:, :, None].expand(-1, -1, P))
        if n_random > 0:
            keys = hash_keys(key_idx, d_sae, seed).T  # [d_sae, B]
            keys = torch.where(pos, keys, torch.full_like(keys, 2.0))  # non-activating never sampled
            cand_k = torch.cat([rk_k, keys], 1)
            kk = min(n_random, cand_k.shape[1])
            neg, sel = (-cand_k).topk(kk, dim=1)
            rk_k = -neg
            rk_i = torch.cat([rk_i, bidx], 1).gather(1, sel)
            rk_v = torch.cat([rk_v, fT], 1).gather(1, sel)
            if heat is not None:
                rk_h = torch.cat([rk_h, heat], 1).gather(1, sel[:, :, None].expand(-1, -1, P))
    # pad to the requested widths; entries that are not activating examples become -1 / 0
    top_ok = top_v > 0
    top_i = torch.where(top_ok, top_i, torch.full_like(top_i, -1))
    top_v = top_v.clamp_min(0)
    top_i, top_v = _pad(top_i, n_top, -1), _pad(top_v, n_top, 0.0)
    valid = rk_k < 1.5
    rk_i = torch.where(valid, rk_i, torch.full_like(rk_i, -1))
    rk_v = torch.where(valid, rk_v, torch.zeros_like(rk_v))
    rk_i, rk_v = _pad(rk_i, n_random, -1), _pad(rk_v, n_random, 0.0)
    extra: dict[str, Any] = {}
    if layout is not None:
        top_h = _pad3(top_h * top_ok[:, :, None], n_top)
        rk_h = _pad3(rk_h * valid[:, :, None], n_random)
        extra = dict(unit="image", image_score=image_score, n_rows=n_rows, row_count=row_count.cpu().numpy(),
                     top_heat=top_h.cpu().numpy().astype(np.float16), rand_heat=rk_h.cpu().numpy().astype(np.float16),
                     patch_grid=np.asarray(_grid(P), np.int64))
    return TopImages(
        top_index=top_i.cpu().numpy(), top_value=top_v.cpu().numpy().astype(np.float32),
        rand_index=rk_i.cpu().numpy(), rand_value=rk_v.cpu().numpy().astype(np.float32),
        count=count.cpu().numpy(), sum=total.cpu().numpy(), max=vmax.cpu().numpy().astype(np.float32),
        hist_edges=edges, hist_counts=hist.reshape(d_sae, bins).cpu().numpy(), n_examples=n, seed=seed, **extra,
    )


def _grid(P: int) -> tuple[int, int]:
    """(rows, cols) of a square patch grid of P patches; (0, 0) when P is not a square (no heatmap drawn)."""
    side = int(round(P ** 0.5))
    return (side, side) if side * side == P else (0, 0)


def _pad3(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[1] >= width:
        return t[:, :width]
    return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1], t.shape[2])], 1)


def _pad(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if t.shape[1] >= width:
        return t[:, :width]
    return torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)], 1)
