"""Checksums that let an artifact prove it is intact (docs/sae_format.md, shard_format.md, training.md).

Three kinds, by the size of what they guard:

- ``sha256_bytes`` / ``sha256_file``: the SHA-256 of a whole file, hex. SAE directories record
  it for ``weights.safetensors`` in ``cfg.json`` (the commit point, written last); shard sets
  record it for every shard file in ``manifest.json``.
- ``sample_digest``: SHA-256 of a few fixed 64 KiB blocks of a file (first, middle, last) plus
  its size: reads at most 192 KiB per file whatever its size, so a terabyte shard set gets a
  cheap check by default (it catches truncation, a replaced file, damage in the sampled blocks;
  a full check reads every byte).
- ``tensors_digest``: SHA-256 over named tensors (name, dtype, shape, bytes, in name order), for
  a file that carries its own checksum inside (the trainer checkpoint's metadata).

``check_finite`` refuses NaN / Inf weights, naming the tensor and the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

__all__ = ["sha256_bytes", "sha256_file", "sample_digest", "tensors_digest", "json_digest", "check_finite",
           "safetensors_bytes", "SAMPLE_BLOCK"]

SAMPLE_BLOCK = 1 << 16
_CHUNK = 1 << 22


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path``, read in 4 MiB chunks. Raises OSError when unreadable."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sample_offsets(size: int) -> list[int]:
    if size <= 3 * SAMPLE_BLOCK:
        return [0]
    return [0, (size // 2) - SAMPLE_BLOCK // 2, size - SAMPLE_BLOCK]


def sample_digest(path: str | Path) -> str:
    """Hex SHA-256 of the file's size and of 64 KiB blocks at its start, middle and end (the whole file when <= 192 KiB)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        offsets = _sample_offsets(size)
        for off in offsets:
            f.seek(off)
            h.update(f.read(size if offsets == [0] else SAMPLE_BLOCK))
    return h.hexdigest()


def sample_digest_bytes(data: bytes) -> str:
    """``sample_digest`` of a file whose bytes are ``data`` (computed before it is written)."""
    size = len(data)
    h = hashlib.sha256(str(size).encode())
    offsets = _sample_offsets(size)
    for off in offsets:
        h.update(data[off: off + (size if offsets == [0] else SAMPLE_BLOCK)])
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, Any], extra: str = "") -> str:
    """Hex SHA-256 over torch tensors by name (name, dtype, shape, raw bytes), then ``extra`` (e.g. a JSON state)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{list(tensors[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    h.update(extra.encode())
    return h.hexdigest()


def json_digest(doc: Any) -> str:
    """Hex SHA-256 of ``doc``'s canonical JSON (sorted keys, no whitespace): survives re-indentation, not edits."""
    return sha256_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())


def check_finite(tensors: Mapping[str, Any], where: str, error: type[Exception]) -> None:
    """Raise ``error`` naming the first tensor of ``tensors`` holding NaN or Inf (``where``: the file)."""
    import torch

    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise error(f"{where}: tensor {name!r} holds {n_bad} non-finite value(s) (NaN/Inf); the weights are "
                        "damaged or the run diverged: retrain or restore this file")


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """``safetensors.torch.save(tensors, metadata)`` with its header's ``__metadata__`` keys in sorted order, so
    that equal tensors and metadata always give equal bytes (and SHA-256s). safetensors writes the metadata map in
    a random order from one process to the next: the same SAE saved twice got two digests, and an SAE retrained bit
    for bit looked changed to every check by digest. The header keeps its length (padded with spaces, as the
    format allows), so the tensors' offsets are unchanged; readers see the same file."""
    from safetensors.torch import save as st_save

    data = st_save(dict(tensors), metadata=dict(metadata) if metadata else None)
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8:8 + n])
    meta = head.get("__metadata__")
    if not meta or len(meta) < 2:
        return data
    ordered = {"__metadata__": dict(sorted(meta.items())), **{k: v for k, v in head.items() if k != "__metadata__"}}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # not expected (the same content); keep safetensors' own bytes rather than a wrong header
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n:]
