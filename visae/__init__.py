"""visae: concept discovery in vision models with sparse autoencoders.

Pipeline stages (each a module, talking only through artifacts on disk):
extract (visae.extract) -> shard set (visae.shards) -> train / sweep (visae.train, visae.sweep)
-> SAE dir (visae.sae) -> select (visae.zeroshot, visae.sweep) -> name (visae.naming) -> browse (visae.browse).
"""

__version__ = "0.1.0"
