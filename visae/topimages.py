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

Shard rows are fed as stored (what the trainer trained on); an SAE with ``input_normalization=
"unit_norm"`` sees the same thing either way.

Saved as ``top_images.npz`` (see docs/naming.md)::

    top_index  [d_sae, n_top]  int64, global example index into the shard set, -1 = fewer activating examples
    top_value  [d_sae, n_top]  float32, descending
    rand_index [d_sae, n_random] int64 (-1 padded), rand_value [d_sae, n_random] float32
    count [d_sae] int64   sum [d_sae] float64   max [d_sae] float32
    hist_edges [bins + 1] float64   hist_counts [d_sae, bins] int64   n_examples, seed
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visae.atomic import atomic_write_bytes
from visae.shards import ShardError, ShardSet

__all__ = ["TopImages", "compute_top_images", "hash_keys", "default_hist_edges", "TOP_IMAGES_FILE"]

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
        np.savez(buf, **{k: np.asarray(v) for k, v in self.__dict__.items()})
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TopImages":
        """Read a ``top_images.npz``; when a ``concepts.json`` sits beside it, it must be the file that
        concepts.json committed (its SHA-256, recorded by ``visae name``), else ValueError (a naming run
        killed between the two files, or another run's statistics)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOP_IMAGES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (written by `visae name` when the shard set is known)")
        _check_committed(path)
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        missing = {f for f in cls.__dataclass_fields__} - set(d)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}")
        d["n_examples"] = int(d["n_examples"])
        d["seed"] = int(d["seed"])
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
            raise ValueError(f"{path} is not part of {concepts} (it records no top images): left over from another "
                             "run; rerun `visae name`")
        return  # written before visae recorded it: nothing to compare
    if sha256_file(path) != rec.get("sha256"):
        raise ValueError(f"{path} does not belong to {concepts} (its SHA-256 differs from the one recorded there): "
                         "an interrupted `visae name` or another SAE's statistics; rerun `visae name`")


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
) -> TopImages:
    """One streaming pass of ``sae`` (a single SAE, S = 1) over every example of ``shards``."""
    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    if ss.d != sae.d_in:
        raise ShardError(f"{ss.path}: activations have d={ss.d} but the SAE has d_in={sae.d_in} (a shard set of "
                         "another model or layer?)")
    if getattr(sae, "n_models", 1) != 1:
        raise ValueError("compute_top_images needs a single SAE; pass sae.member(i)")
    device = torch.device(device)
    d_sae = int(sae.d_sae)
    edges = default_hist_edges() if hist_edges is None else np.asarray(hist_edges, np.float64)
    edges_t = torch.as_tensor(edges[1:-1], dtype=torch.float32, device=device)  # inner edges for bucketize
    bins = len(edges) - 1

    top_v = torch.zeros(d_sae, 0, device=device)
    top_i = torch.zeros(d_sae, 0, dtype=torch.int64, device=device)
    rk_k = torch.zeros(d_sae, 0, dtype=torch.float64, device=device)  # keys of the random sample
    rk_i = torch.zeros(d_sae, 0, dtype=torch.int64, device=device)
    rk_v = torch.zeros(d_sae, 0, device=device)
    count = torch.zeros(d_sae, dtype=torch.int64, device=device)
    total = torch.zeros(d_sae, dtype=torch.float64, device=device)
    vmax = torch.zeros(d_sae, device=device)
    hist = torch.zeros(d_sae * bins, dtype=torch.int64, device=device)
    n = 0
    it = ss.sequential_batches(batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=-(-len(ss) // batch_size), desc="top images", unit="batch", leave=False)
    for batch in it:
        bad = ~np.isfinite(batch.acts).all(axis=1)
        if bad.any():  # one NaN row would make every latent's statistics NaN
            shard, row = ss.locate(batch.index[np.flatnonzero(bad)[:1]])
            raise ShardError(f"{ss.path}/{ss.manifest['shards'][int(shard[0])]['name']}.acts.npy row {int(row[0])}: "
                             f"activation holds NaN or Inf ({int(bad.sum())} such row(s) in this batch); re-extract "
                             "the shard set (`--validate_shards full` finds every one)")
        x = torch.from_numpy(batch.acts).to(device)
        idx = torch.from_numpy(batch.index).to(device)
        f = sae.encode(x).float()  # [B, d_sae]
        if f.ndim != 2:
            raise ValueError("sae.encode returned stacked codes; pass a single SAE (sae.member(i))")
        fT = f.T  # [d_sae, B]
        pos = fT > 0
        n += f.shape[0]
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
        if n_random > 0:
            keys = hash_keys(idx, d_sae, seed).T  # [d_sae, B]
            keys = torch.where(pos, keys, torch.full_like(keys, 2.0))  # non-activating never sampled
            cand_k = torch.cat([rk_k, keys], 1)
            kk = min(n_random, cand_k.shape[1])
            neg, sel = (-cand_k).topk(kk, dim=1)
            rk_k = -neg
            rk_i = torch.cat([rk_i, bidx], 1).gather(1, sel)
            rk_v = torch.cat([rk_v, fT], 1).gather(1, sel)
    # pad to the requested widths; entries that are not activating examples become -1 / 0
    top_i = torch.where(top_v > 0, top_i, torch.full_like(top_i, -1))
    top_v = top_v.clamp_min(0)
    top_i, top_v = _pad(top_i, n_top, -1), _pad(top_v, n_top, 0.0)
    valid = rk_k < 1.5
    rk_i = torch.where(valid, rk_i, torch.full_like(rk_i, -1))
    rk_v = torch.where(valid, rk_v, torch.zeros_like(rk_v))
    rk_i, rk_v = _pad(rk_i, n_random, -1), _pad(rk_v, n_random, 0.0)
    return TopImages(
        top_index=top_i.cpu().numpy(), top_value=top_v.cpu().numpy().astype(np.float32),
        rand_index=rk_i.cpu().numpy(), rand_value=rk_v.cpu().numpy().astype(np.float32),
        count=count.cpu().numpy(), sum=total.cpu().numpy(), max=vmax.cpu().numpy().astype(np.float32),
        hist_edges=edges, hist_counts=hist.reshape(d_sae, bins).cpu().numpy(), n_examples=n, seed=seed,
    )


def _pad(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if t.shape[1] >= width:
        return t[:, :width]
    return torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)], 1)
