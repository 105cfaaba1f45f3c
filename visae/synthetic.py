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

__all__ = ["PlantedDictionary", "make_planted_dictionary", "write_planted_shards", "atom_recovery",
           "HierarchicalDictionary", "make_hierarchical_dictionary", "parent_recovery"]


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


# ----------------------------------------------------------------------------- hierarchical (parents and children)


@dataclass(frozen=True)
class HierarchicalDictionary:
    """Planted parent / child features: a child occurs only together with its parent.

    parents [P, d] and children [P, C, d] are unit directions. An example draws each parent
    independently with probability ``parent_prob``; an active parent brings exactly one of its
    C children (uniform) with probability ``child_prob``. x = sum of the active directions, each
    with a magnitude drawn from U(``parent_magnitude``) or U(``child_magnitude``), plus N(0, noise^2)
    per coordinate. This is the
    setting in which an SAE can *absorb* a parent into its children (Chanin et al. 2024, "A is
    for Absorption"): a child latent learns parent + child and the parent latent stops firing
    when a child is present.
    """

    parents: np.ndarray
    children: np.ndarray
    parent_prob: float
    child_prob: float
    noise: float
    seed: int
    parent_magnitude: tuple[float, float] = (0.5, 1.5)
    child_magnitude: tuple[float, float] = (0.5, 1.5)

    @property
    def d(self) -> int:
        return self.parents.shape[1]

    @property
    def n_parents(self) -> int:
        return self.parents.shape[0]

    @property
    def n_children(self) -> int:
        return self.children.shape[1]

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw n examples -> (x [n, d] float32, parent_on [n, P] bool, child [n, P] int64: the active child of
        each parent, -1 for none). Every example has at least one parent."""
        P, C = self.n_parents, self.n_children
        on = rng.random((n, P)) < self.parent_prob
        empty = ~on.any(axis=1)
        on[np.flatnonzero(empty), rng.integers(0, P, int(empty.sum()))] = True
        has_child = on & (rng.random((n, P)) < self.child_prob)
        child = np.where(has_child, rng.integers(0, C, (n, P)), -1)
        pm = on * rng.uniform(*self.parent_magnitude, (n, P))
        cm = has_child * rng.uniform(*self.child_magnitude, (n, P))
        x = pm @ self.parents
        flat = self.children.reshape(P * C, -1)
        idx = np.nonzero(has_child)
        cols = idx[1] * C + child[idx]
        np.add.at(x, idx[0], cm[idx][:, None] * flat[cols])
        x = x + self.noise * rng.standard_normal(x.shape)
        return x.astype(np.float32), on, child.astype(np.int64)


def make_hierarchical_dictionary(d: int = 64, n_parents: int = 16, children_per_parent: int = 4,
                                 parent_prob: float = 0.125, child_prob: float = 0.9, noise: float = 0.01,
                                 parent_magnitude: tuple[float, float] = (0.5, 1.5),
                                 child_magnitude: tuple[float, float] = (0.5, 1.5),
                                 seed: int = 0) -> HierarchicalDictionary:
    """Random unit parent and child directions (see :class:`HierarchicalDictionary`).

    Raises ValueError for probabilities outside [0, 1] or non-positive sizes.
    """
    if min(d, n_parents, children_per_parent) <= 0:
        raise ValueError(f"d, n_parents, children_per_parent must be positive, got {d}, {n_parents}, {children_per_parent}")
    for name, (lo, hi) in (("parent_magnitude", parent_magnitude), ("child_magnitude", child_magnitude)):
        if not 0 < lo <= hi:
            raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
    if not (0 <= parent_prob <= 1 and 0 <= child_prob <= 1):
        raise ValueError(f"parent_prob and child_prob must be in [0, 1], got {parent_prob}, {child_prob}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x41E2]))
    dirs = rng.standard_normal((n_parents * (1 + children_per_parent), d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    parents = dirs[:n_parents].astype(np.float32)
    children = dirs[n_parents:].reshape(n_parents, children_per_parent, d).astype(np.float32)
    return HierarchicalDictionary(parents=parents, children=children, parent_prob=float(parent_prob),
                                  child_prob=float(child_prob), noise=float(noise), seed=int(seed),
                                  parent_magnitude=(float(parent_magnitude[0]), float(parent_magnitude[1])),
                                  child_magnitude=(float(child_magnitude[0]), float(child_magnitude[1])))


def parent_recovery(fires: np.ndarray, parent_on: np.ndarray, child: np.ndarray | None = None,
                    recall: float = 0.9, precision: float = 0.9) -> dict:
    """Which planted parents some single latent detects, children included.

    fires [n, d_sae] bool (latent active on example), parent_on [n, P] bool, child [n, P] (-1 = no child;
    only for the with-child recall). Parent p is *recovered* when one latent fires on >= ``recall`` of the
    examples containing p (those with a child included) and >= ``precision`` of that latent's firings
    contain p. Returns ``{"recovered": [P] bool, "fraction": float, "best_recall": [P], "best_latent": [P],
    "recall_with_child": [P] (the best latent's recall on the examples where p has a child, NaN without
    ``child``)}``; the best latent is the one of highest recall among those meeting the precision bar
    (-1 and recall 0 when none does).
    """
    fires = np.asarray(fires, bool)
    on = np.asarray(parent_on, bool)
    if fires.shape[0] != on.shape[0]:
        raise ValueError(f"fires has {fires.shape[0]} examples, parent_on {on.shape[0]}")
    f32, o32 = fires.astype(np.float32), on.astype(np.float32)
    both = o32.T @ f32  # [P, d_sae]
    rec = both / np.maximum(o32.sum(0)[:, None], 1)
    prec = both / np.maximum(f32.sum(0)[None, :], 1)
    ok = prec >= precision
    score = np.where(ok, rec, -1.0)
    best = score.argmax(1)
    best_rec = np.take_along_axis(score, best[:, None], 1)[:, 0]
    best = np.where(best_rec >= 0, best, -1)
    best_rec = np.maximum(best_rec, 0.0)
    with_child = np.full(on.shape[1], np.nan)
    if child is not None:
        for p in range(on.shape[1]):
            m = on[:, p] & (np.asarray(child)[:, p] >= 0)
            if best[p] >= 0 and m.any():
                with_child[p] = float(fires[m, best[p]].mean())
    recovered = best_rec >= recall
    return {"recovered": recovered, "fraction": float(recovered.mean()), "best_recall": best_rec,
            "best_latent": best, "recall_with_child": with_child}
