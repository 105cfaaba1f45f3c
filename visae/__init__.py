"""visae: concept discovery in vision models with sparse autoencoders.

Pipeline stages (each a module, talking only through artifacts on disk):
extract (visae.extract) -> shard set (visae.shards) -> train / sweep (visae.train, visae.sweep)
-> SAE dir (visae.sae) -> select (visae.zeroshot, visae.sweep) -> name (visae.naming) -> browse (visae.browse).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy re-exports, so `import visae` stays light: visae.SAE.load(path), visae.load_sae(path).
    if name in ("SAE", "SAEConfig", "load_sae"):
        from visae import sae as _sae

        return getattr(_sae, name)
    raise AttributeError(f"module 'visae' has no attribute {name!r}")
