"""Which other tool's layout a path is in, and which importer reads it (no dependency on visae.sae).

``visae.sae.load_sae`` asks :func:`import_hint` when a directory is not a visae SAE directory,
so this module imports nothing from visae (the importers in ``visae.interop`` depend on
``visae.sae``, not the other way round).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["detect_layout", "import_hint"]


def detect_layout(path: str | Path) -> str | None:
    """The foreign layout of ``path`` ("saelens", "saev-shards", "saev-checkpoint", "dncbm"), or None."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".pt":
            with open(p, "rb") as fh:
                head = fh.read(1)
            return "saev-checkpoint" if head == b"{" else "dncbm"
        return None
    if not p.is_dir():
        return None
    if (p / "sae_weights.safetensors").is_file():
        return "saelens"
    if (p / "metadata.json").is_file() and (p / "shards.json").is_file():
        return "saev-shards"
    if (p / "checkpoint" / "sae.pt").is_file() or (p / "sae.pt").is_file():
        return "saev-checkpoint"
    if (p / "sae_checkpoints" / "sparse_autoencoder_final.pt").is_file() or (p / "sparse_autoencoder_final.pt").is_file():
        return "dncbm"
    return None


_HINTS = {
    "saelens": "a SAELens SAE directory (cfg.json + sae_weights.safetensors): convert it with "
               "`python -c \"from visae.interop.saelens import import_saelens; import_saelens('{p}', out='OUT')\"` "
               "(or load it in Python with import_saelens('{p}'))",
    "saev-shards": "a saev activation shard folder (metadata.json + shards.json + acts*.bin): convert it with "
                   "`python -c \"from visae.interop.saev import convert_saev_shards; "
                   "convert_saev_shards('{p}', 'OUT', layer=L)\"`",
    "saev-checkpoint": "a saev SAE checkpoint (sae.pt): convert it with "
                       "`python -c \"from visae.interop.saev import import_saev_sae; import_saev_sae('{p}', out='OUT')\"`",
    "dncbm": "a Discover-then-Name checkpoint (sparse_autoencoder library state_dict): convert it with "
             "`python -c \"from visae.interop.dncbm import import_dncbm; import_dncbm('{p}', out='OUT', model='ViT-B-16:openai')\"`",
}


def import_hint(path: str | Path) -> str | None:
    """A sentence naming the foreign layout of ``path`` and the importer to use, or None."""
    kind = detect_layout(path)
    return None if kind is None else f"{path} is {_HINTS[kind].format(p=path)}; see docs/interop.md"
