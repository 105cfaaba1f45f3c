"""Planted sparse dictionaries: activation data whose true sparse code is known.

Each example is a sparse non-negative combination of ``n_atoms`` unit directions in
``d`` dimensions (plus a little Gaussian noise), so an SAE trained on it can be checked
against the planted dictionary: explained variance, L0, and how many atoms it recovers.
Used by tests, benchmarks, and the default main job before any images are involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visae.shards import ShardSet, ShardWriter

__all__ = ["PlantedDictionary", "make_planted_dictionary", "write_planted_shards", "atom_recovery"]


@dataclass(frozen=True)
class PlantedDictionary:
    """atoms: [n_atoms, d] unit rows; frequencies: [n_atoms] firing probability of each atom."""

    atoms: np.ndarray
    frequencies: np.ndarray
    noise: float
    seed: int

    @property
    def d(self) -> int:
        return self.atoms.shape[1]

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw n examples -> (x [n, d] float32, codes [n, n_atoms] float32)."""
        fire = rng.random((n, len(self.frequencies))) < self.frequencies
        # Guarantee at least one active atom so no example is (near) zero.
        empty = ~fire.any(axis=1)
        fire[np.flatnonzero(empty), rng.integers(0, len(self.frequencies), empty.sum())] = True
        mags = rng.uniform(0.5, 1.5, size=fire.shape).astype(np.float32)
        codes = (fire * mags).astype(np.float32)
        x = codes @ self.atoms + self.noise * rng.standard_normal((n, self.d)).astype(np.float32)
        return x.astype(np.float32), codes


def make_planted_dictionary(
    d: int = 64, n_atoms: int = 256, mean_active: float = 4.0, noise: float = 0.01, seed: int = 0
) -> PlantedDictionary:
    """Random unit atoms with Zipf-like firing frequencies averaging ``mean_active`` per example."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, n_atoms + 1) ** 0.5
    rng.shuffle(weights)
    freqs = np.clip(weights / weights.sum() * mean_active, 0.0, 0.9)
    return PlantedDictionary(atoms=atoms, frequencies=freqs.astype(np.float64), noise=noise, seed=seed)


def write_planted_shards(
    out_dir: str | Path,
    n: int = 20000,
    dictionary: PlantedDictionary | None = None,
    shard_size: int = 8192,
    dtype: str = "float32",
    seed: int = 0,
    chunk: int = 8192,
) -> ShardSet:
    """Write ``n`` planted-dictionary examples as a shard set (ids ``planted/<i>``, label = strongest atom)."""
    dictionary = dictionary or make_planted_dictionary(seed=seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x91A7]))
    source = {"model": "planted-dictionary", "d": dictionary.d, "n_atoms": int(len(dictionary.atoms)),
              "noise": dictionary.noise, "seed": dictionary.seed, "dataset": "synthetic"}
    with ShardWriter(out_dir, dictionary.d, dtype=dtype, shard_size=shard_size, source=source, resume=False,
                     overwrite=True) as w:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            x, codes = dictionary.sample(m, rng)
            w.add(x, ids=[f"planted/{i}" for i in range(start, start + m)], labels=codes.argmax(axis=1))
    return ShardSet(out_dir)


def atom_recovery(decoder: np.ndarray, atoms: np.ndarray, threshold: float = 0.9) -> float:
    """Fraction of planted atoms [n_atoms, d] matched by some decoder row [d_sae, d] with cosine >= threshold."""
    dec = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    cos = atoms @ dec.T
    return float((cos.max(axis=1) >= threshold).mean())
