"""Activation shard sets: the only interface between extraction and training.

Format (written down in docs/shard_format.md):

    DIR/manifest.json            # the commit point: lists complete shards only
    DIR/shard_00000.acts.npy     # [n, d] float16 | float32, C order, memmap-able
    DIR/shard_00000.meta.npz     # per example: id (str), norm (float32), label (int64, -1 unknown),
                                 # plus optional extra columns (int64 / float32), all of length n

Shards are fixed-size (``shard_size`` rows) except the last. A shard's files are
written under temporary names and renamed; only then is it added to the manifest,
which is itself replaced atomically. A killed writer therefore leaves at most stray
temporary files and never a shard that looks complete; rerunning continues after
the last committed example (``ShardWriter.num_written``).

Example (shapes: N examples, d features)::

    with ShardWriter(out, d=512, source={"model": "ViT-B-32"}) as w:
        w.add(acts, ids=paths, labels=labels)      # acts: [n, 512], raw
    ss = ShardSet(out)
    train, val = ss.split(val_fraction=0.1, seed=0)
    for batch in train.epoch_batches(4096, epoch=3, seed=0):   # batch.acts: [4096, 512] float32
        ...
"""

from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from visae.atomic import atomic_path, atomic_write_text
from visae.errors import VisaeError
from visae.integrity import sample_digest, sha256_file

FORMAT_NAME = "visae.shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NORMALIZATIONS = ("unit_norm", "none")
DTYPES = ("float16", "float32")
_RESERVED_COLUMNS = ("id", "norm", "label")
SUFFIXES = (".acts.npy", ".meta.npz")
VALIDATION_LEVELS = ("none", "meta", "full")

__all__ = [
    "ShardError",
    "ShardWriter",
    "ShardSet",
    "ShardView",
    "Batch",
    "merge_shard_sets",
    "subset_shard_set",
]


class ShardError(VisaeError, ValueError):
    """A shard set is missing, malformed, or was given bad data."""


# ----------------------------------------------------------------------------- atomic io


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def _atomic_save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}"


# ----------------------------------------------------------------------------- validation


def _check_rows(acts: np.ndarray, where: str, first_row: int = 0) -> np.ndarray:
    """Return float64 L2 norms of ``acts`` rows; raise naming the row on NaN/Inf/zero."""
    finite = np.isfinite(acts).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0]) + first_row
        raise ShardError(f"{where} row {row}: activation contains NaN or Inf")
    norms = np.linalg.norm(acts.astype(np.float64, copy=False), axis=1)
    zero = norms == 0
    if zero.any():
        row = int(np.flatnonzero(zero)[0]) + first_row
        raise ShardError(f"{where} row {row}: activation vector has zero norm (cannot unit-normalise)")
    return norms


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def field_diffs(old: Any, new: Any, path: str) -> list[str]:
    """``["<path>: <old> on disk, <new> now", ...]`` for the leaves where two JSON-like values differ.

    Nested dicts are compared key by key (``source.dataset_info.num_items: 98 on disk, 100 now``); a key
    present on one side only shows ``(absent)`` on the other; other values are compared whole, each shown
    truncated to 80 characters."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{k}"
            if k not in new:
                out.append(f"{sub}: {_short(old[k])} on disk, (absent) now")
            elif k not in old:
                out.append(f"{sub}: (absent) on disk, {_short(new[k])} now")
            else:
                out += field_diffs(old[k], new[k], sub)
        return out
    return [] if old == new else [f"{path}: {_short(old)} on disk, {_short(new)} now"]


# ----------------------------------------------------------------------------- writer


class ShardWriter:
    """Append activations to a shard set; atomic per shard and resumable.

    Args:
        out_dir: directory of the shard set (created if missing).
        d: activation width.
        dtype: storage dtype, "float16" (default) or "float32".
        shard_size: rows per shard (the last shard may be shorter).
        normalization: "unit_norm" (default: each row divided by its L2 norm, the norm
            kept in metadata) or "none" (rows stored as given, norms still kept).
        source: where the activations came from (model, pretrained, layer, token, dataset, ...).
        label_names: optional ``{column: [name of value 0, name of value 1, ...]}``.
        columns: extra per-example columns, ``{name: "int64" | "float32"}``.
        resume: continue an existing, compatible shard set (default). With ``False`` an
            existing manifest is an error unless ``overwrite``.
        overwrite: delete an existing manifest and start from scratch.

    ``num_written`` is the number of committed examples: a producer that reruns after a
    kill skips that many examples of its (deterministic) input order.
    """

    def __init__(
        self,
        out_dir: str | Path,
        d: int,
        *,
        dtype: str = "float16",
        shard_size: int = 65536,
        normalization: str = "unit_norm",
        source: Mapping[str, Any] | None = None,
        label_names: Mapping[str, Sequence[str]] | None = None,
        columns: Mapping[str, str] | None = None,
        resume: bool = True,
        overwrite: bool = False,
    ):
        if dtype not in DTYPES:
            raise ShardError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if normalization not in NORMALIZATIONS:
            raise ShardError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if int(d) <= 0 or int(shard_size) <= 0:
            raise ShardError(f"d and shard_size must be positive, got d={d}, shard_size={shard_size}")
        columns = dict(columns or {})
        for name, cdt in columns.items():
            if name in _RESERVED_COLUMNS:
                raise ShardError(f"column name {name!r} is reserved ({_RESERVED_COLUMNS})")
            if cdt not in ("int64", "float32"):
                raise ShardError(f"column {name!r}: dtype must be 'int64' or 'float32', got {cdt!r}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._buffer: list[dict[str, Any]] = []
        self._buffered = 0
        self._closed = False
        manifest_path = self.dir / MANIFEST
        fresh = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "d": int(d),
            "dtype": dtype,
            "shard_size": int(shard_size),
            "normalization": normalization,
            "source": dict(source or {}),
            "label_names": {k: list(v) for k, v in (label_names or {}).items()},
            "columns": columns,
            "shards": [],
            "num_examples": 0,
            "complete": False,
        }
        if manifest_path.exists() and overwrite:
            manifest_path.unlink()
        if manifest_path.exists():
            if not resume:
                raise ShardError(f"{manifest_path} exists; pass resume=True to continue it or overwrite=True to replace it")
            old = _read_manifest(self.dir)
            diffs = [d for key in ("d", "dtype", "shard_size", "normalization", "source", "columns")
                     for d in field_diffs(old.get(key), fresh[key], key)]
            if diffs:
                more = f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""
                raise ShardError(f"{manifest_path}: cannot resume, it was written for something else: "
                                 f"{'; '.join(diffs[:6])}{more}; use a new output directory or overwrite=True "
                                 "(visae extract: --overwrite)")
            self.manifest = old
        else:
            self.manifest = fresh
            self._write_manifest()

    # -- state
    @property
    def d(self) -> int:
        return self.manifest["d"]

    @property
    def num_written(self) -> int:
        """Examples committed to the manifest (buffered rows not included)."""
        return self.manifest["num_examples"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def _write_manifest(self) -> None:
        atomic_write_text(self.dir / MANIFEST, json.dumps(self.manifest, indent=1))

    # -- writing
    def add(
        self,
        acts: Any,
        ids: Sequence[str],
        labels: Sequence[int] | np.ndarray | None = None,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        """Append raw activations ``acts`` [n, d] with their ids, labels (-1 = unknown) and extra columns."""
        if self._closed:
            raise ShardError(f"{self.dir}: writer is closed")
        if self.complete:
            raise ShardError(f"{self.dir}: shard set is already complete; nothing more can be added")
        if hasattr(acts, "detach"):
            acts = acts.detach().float().cpu().numpy()
        acts = np.asarray(acts)
        if acts.ndim != 2 or acts.shape[1] != self.d:
            raise ShardError(f"{self.dir}: expected activations of shape [n, {self.d}], got {list(acts.shape)}")
        n = acts.shape[0]
        ids = [str(i) for i in ids]
        if len(ids) != n:
            raise ShardError(f"{self.dir}: {n} activation rows but {len(ids)} ids")
        lab = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if lab.shape[0] != n:
            raise ShardError(f"{self.dir}: {n} activation rows but {lab.shape[0]} labels")
        cols = {}
        given = dict(columns or {})
        unknown = set(given) - set(self.manifest["columns"])
        if unknown:
            raise ShardError(f"{self.dir}: unknown column(s) {sorted(unknown)}; declared: {sorted(self.manifest['columns'])}")
        for name, cdt in self.manifest["columns"].items():
            if name not in given:
                raise ShardError(f"{self.dir}: column {name!r} missing from add()")
            col = np.asarray(given[name], dtype=cdt).reshape(-1)
            if col.shape[0] != n:
                raise ShardError(f"{self.dir}: column {name!r} has {col.shape[0]} values for {n} rows")
            cols[name] = col
        where = f"{self.dir}/{_shard_name(len(self.manifest['shards']))}"
        norms = _check_rows(acts, where, first_row=self._buffered)
        self._buffer.append({"acts": acts.astype(np.float32, copy=False), "id": ids, "norm": norms, "label": lab, **cols})
        self._buffered += n
        while self._buffered >= self.manifest["shard_size"]:
            self._flush(self.manifest["shard_size"])

    def _take(self, count: int) -> dict[str, Any]:
        """Pop the first ``count`` buffered rows as concatenated arrays."""
        keys = self._buffer[0].keys()
        merged = {k: (sum((b[k] for b in self._buffer), []) if k == "id" else np.concatenate([b[k] for b in self._buffer])) for k in keys}
        head = {k: v[:count] for k, v in merged.items()}
        rest = {k: v[count:] for k, v in merged.items()}
        self._buffer = [rest] if len(rest["id"]) else []
        self._buffered = len(rest["id"])
        return head

    def _flush(self, count: int) -> None:
        rows = self._take(count)
        idx = len(self.manifest["shards"])
        name = _shard_name(idx)
        acts = rows["acts"]
        norms = rows["norm"]
        if self.manifest["normalization"] == "unit_norm":
            acts = acts / norms[:, None].astype(np.float32)
        if self.manifest["dtype"] == "float16":
            big = np.abs(acts) > np.finfo(np.float16).max
            if big.any():
                row = int(np.flatnonzero(big.any(axis=1))[0])
                raise ShardError(f"{self.dir}/{name} row {row}: value exceeds float16 range; use dtype='float32'")
        acts = acts.astype(self.manifest["dtype"])
        meta = {
            "id": np.asarray(rows["id"], dtype=str),
            "norm": norms.astype(np.float32),
            "label": rows["label"],
        }
        for c in self.manifest["columns"]:
            meta[c] = rows[c]
        _atomic_save_npy(self.dir / f"{name}.acts.npy", acts)
        _atomic_save_npz(self.dir / f"{name}.meta.npz", meta)
        self.manifest["shards"].append({"name": name, "count": int(acts.shape[0]),
                                        "files": {sfx: _file_record(self.dir / f"{name}{sfx}") for sfx in SUFFIXES}})
        self.manifest["num_examples"] += int(acts.shape[0])
        self._write_manifest()

    def close(self) -> None:
        """Flush the last (short) shard and mark the set complete."""
        if self._closed:
            return
        if self._buffered:
            self._flush(self._buffered)
        self.manifest["complete"] = True
        self._write_manifest()
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception keep only committed shards: the rerun resumes from num_written.
        if exc_type is None:
            self.close()
        else:
            self._buffer, self._buffered, self._closed = [], 0, True


# ----------------------------------------------------------------------------- reader


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise ShardError(f"shard set directory {path} does not exist")
    if not mpath.is_file():
        hint = ""
        if (path / "layers.json").is_file():  # a several-layer extraction (visae extract --layer 4,8,11)
            layer_sets = sorted((d for d in path.glob("layer_*") if d.name[6:].isdigit() and (d / MANIFEST).is_file()),
                                key=lambda d: int(d.name[6:]))
            hint = (f"; it is a several-layer extraction (layers.json): give one layer's shard set, "
                    f"{', '.join(str(d) for d in layer_sets[:6]) or str(path / 'layer_<L>')}"
                    + (", ..." if len(layer_sets) > 6 else ""))
        raise ShardError(f"{mpath} is missing: {path} is not a shard set (or its writer never committed a shard){hint}")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{mpath} is not valid JSON: {e}") from None
    if m.get("format") != FORMAT_NAME:
        raise ShardError(f"{mpath}: field 'format' is {m.get('format')!r}, expected {FORMAT_NAME!r}")
    if m.get("version") != FORMAT_VERSION:
        raise ShardError(f"{mpath}: field 'version' is {m.get('version')!r}, this visae reads version {FORMAT_VERSION}")
    for key in ("d", "dtype", "shards", "num_examples", "normalization"):
        if key not in m:
            raise ShardError(f"{mpath}: required field '{key}' is missing")
    if m["dtype"] not in DTYPES:
        raise ShardError(f"{mpath}: field 'dtype' is {m['dtype']!r}, expected one of {DTYPES}")
    m.setdefault("columns", {})
    m.setdefault("label_names", {})
    m.setdefault("source", {})
    names = [s.get("name") if isinstance(s, dict) else None for s in m["shards"]]
    if None in names or not all(isinstance(s.get("count"), int) for s in m["shards"]):
        raise ShardError(f"{mpath}: every entry of 'shards' needs a 'name' and an integer 'count'")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ShardError(f"{mpath}: shard {n!r} is listed more than once (its examples would be read twice)")
        seen.add(n)
    return m


def _file_record(path: Path) -> dict[str, Any]:
    """What a manifest records of a shard file: size, full SHA-256, sampled digest (visae.integrity)."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path), "sample": sample_digest(path)}


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran:
            raise ValueError("Fortran-ordered arrays are not supported; shards are C order")
        return shape, dtype, f.tell()


@dataclass
class Batch:
    """A batch from a shard set: ``acts`` [B, d] float32 and ``index`` [B] global example indices."""

    acts: np.ndarray
    index: np.ndarray


class ShardSet:
    """Read-only access to a shard set written by :class:`ShardWriter` (or made elsewhere in the format).

    ``ShardSet(path)`` checks the manifest and each shard's file size; ``validate(full=True)``
    additionally scans for NaN/Inf/zero rows.
    """

    def __init__(self, path: str | Path, require_complete: bool = True):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        if require_complete and not self.manifest.get("complete", False):
            raise ShardError(f"{self.path / MANIFEST}: shard set is not complete ('complete': false, "
                             f"{self.manifest.get('num_examples')} examples committed): its writer was stopped before "
                             "the end; rerun the same `visae extract` command to finish it")
        self.d: int = int(self.manifest["d"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.counts = np.array([s["count"] for s in self.manifest["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        if int(self.offsets[-1]) != int(self.manifest["num_examples"]):
            raise ShardError(
                f"{self.path / MANIFEST}: 'num_examples' is {self.manifest['num_examples']} but the shards hold {int(self.offsets[-1])}"
            )
        self._data_offset = []
        for s in self.manifest["shards"]:
            self._data_offset.append(self._check_shard_file(s))
        self._meta_cache: dict[str, np.ndarray] | None = None

    def _check_shard_file(self, s: Mapping[str, Any]) -> int:
        f = self.path / f"{s['name']}.acts.npy"
        if not f.is_file():
            raise ShardError(f"{f} is missing (listed in {self.path / MANIFEST})")
        if not (self.path / f"{s['name']}.meta.npz").is_file():
            raise ShardError(f"{self.path / (s['name'] + '.meta.npz')} is missing (listed in {self.path / MANIFEST})")
        try:
            shape, dtype, header_len = _npy_header(f)
        except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
            raise ShardError(f"{f}: not a readable .npy file ({e})") from None
        if shape != (s["count"], self.d) or dtype != self.dtype:
            raise ShardError(f"{f}: holds {dtype}{list(shape)}, manifest says {self.dtype}{[s['count'], self.d]}")
        expected = header_len + s["count"] * self.d * self.dtype.itemsize
        actual = f.stat().st_size
        if actual < expected:
            raise ShardError(f"{f} is truncated: {actual} bytes, expected {expected} for {s['count']} rows of d={self.d}")
        for sfx, rec in (s.get("files") or {}).items():
            size = (self.path / f"{s['name']}{sfx}").stat().st_size
            if isinstance(rec, dict) and rec.get("bytes") is not None and rec["bytes"] != size:
                raise ShardError(f"{self.path / (s['name'] + sfx)} is damaged: {size} bytes, {self.path / MANIFEST} "
                                 f"recorded {rec['bytes']} (truncated or replaced); re-extract it")
        return header_len

    # -- basic facts
    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_shards(self) -> int:
        return len(self.counts)

    @property
    def normalization(self) -> str:
        return self.manifest["normalization"]

    @property
    def source(self) -> dict[str, Any]:
        return self.manifest["source"]

    @property
    def label_names(self) -> dict[str, list[str]]:
        return self.manifest["label_names"]

    def fingerprint(self) -> str:
        """Hex digest of what the set holds, not where it lives: width, dtype, normalisation, and per shard its
        count and recorded file checksums (names and sizes for a set without them). Equal for a moved or copied
        set; a resumed run compares it (``visae.train``)."""
        from visae.integrity import json_digest

        shards = [{"count": s["count"], "files": {sfx: {k: rec.get(k) for k in ("bytes", "sha256")}
                                                   for sfx, rec in (s.get("files") or {}).items()}
                   or {sfx: (self.path / f"{s['name']}{sfx}").stat().st_size for sfx in SUFFIXES}}
                  for s in self.manifest["shards"]]
        return json_digest({"d": self.d, "dtype": str(self.dtype), "normalization": self.normalization,
                            "shards": shards})

    def __repr__(self) -> str:
        return f"ShardSet({str(self.path)!r}, n={len(self)}, d={self.d}, shards={self.num_shards}, dtype={self.dtype})"

    # -- raw access
    def shard_acts(self, i: int) -> np.memmap:
        """Memmap of shard ``i``: [count_i, d] in the storage dtype (no copy)."""
        s = self.manifest["shards"][i]
        return np.memmap(self.path / f"{s['name']}.acts.npy", dtype=self.dtype, mode="r",
                         offset=self._data_offset[i], shape=(int(s["count"]), self.d))

    def shard_meta(self, i: int) -> dict[str, np.ndarray]:
        s = self.manifest["shards"][i]
        f = self.path / f"{s['name']}.meta.npz"
        try:
            with np.load(f, allow_pickle=False) as z:
                meta = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001
            raise ShardError(f"{f}: cannot read metadata ({e})") from None
        for k in ("id", "norm", "label", *self.manifest["columns"]):
            if k not in meta or len(meta[k]) != s["count"]:
                raise ShardError(f"{f}: column {k!r} missing or not of length {s['count']}")
        return meta

    def metadata(self) -> dict[str, np.ndarray]:
        """All per-example metadata, concatenated over shards (ids, norms, labels, extra columns)."""
        if self._meta_cache is None:
            parts = [self.shard_meta(i) for i in range(self.num_shards)]
            keys = ("id", "norm", "label", *self.manifest["columns"])
            if parts:
                self._meta_cache = {k: np.concatenate([p[k] for p in parts]) for k in keys}
            else:
                self._meta_cache = {"id": np.array([], dtype=str), "norm": np.zeros(0, np.float32),
                                    "label": np.zeros(0, np.int64), **{c: np.zeros(0) for c in self.manifest["columns"]}}
        return self._meta_cache

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global example indices -> (shard number, row within shard)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"example index out of range [0, {len(self)}) for {self.path}")
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        return shard, index - self.offsets[shard]

    def read(self, index: Sequence[int] | np.ndarray, raw: bool = False) -> np.ndarray:
        """Random access: rows ``index`` as float32 [len(index), d]; ``raw=True`` multiplies back the stored norms."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((index.size, self.d), dtype=np.float32)
        shard, row = self.locate(index)
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            rows = row[sel]
            order = np.argsort(rows, kind="stable")
            mm = self.shard_acts(int(s))
            out[sel[order]] = mm[rows[order]]
            del mm
        if raw and self.normalization == "unit_norm":
            out *= self.metadata()["norm"][index][:, None]
        return out

    def validate(self, full: bool = True) -> None:
        """Check the shard files against the checksums the manifest recorded, and their content.

        Cheap (``full=False``, reads ~192 KiB per file plus the metadata): each file's sampled
        digest (size, start / middle / end blocks) and every shard's metadata columns. Full: each
        file's whole SHA-256, no two shards with the same content, and every row finite, non-zero
        and, for ``normalization: unit_norm``, of norm 1 within the storage dtype's rounding
        (|norm - 1| <= 2 u + d eps32, u the storage unit roundoff: each stored component is off
        by at most u relative, the float32 sum of d squares adds at most d eps32). A manifest
        without checksums (a set made by another tool or an older visae) is checked for content
        only, with a warning. Raises ShardError naming the file (and row).
        """
        import warnings

        unverified = [s["name"] for s in self.manifest["shards"] if not s.get("files")]
        if unverified:
            warnings.warn(f"shard set {self.path}: {len(unverified)} shard(s) have no recorded checksums (made by another "
                          "tool or an older visae): their files cannot be verified, only read", UserWarning, stacklevel=2)
        digests: dict[str, str] = {}
        for i, s in enumerate(self.manifest["shards"]):
            for sfx, rec in (s.get("files") or {}).items():
                f = self.path / f"{s['name']}{sfx}"
                key, got = ("sha256", sha256_file(f)) if full else ("sample", sample_digest(f))
                if isinstance(rec, dict) and rec.get(key) and rec[key] != got:
                    raise ShardError(f"{f} is damaged: its {'SHA-256' if full else 'sampled digest'} differs from the "
                                     f"one {self.path / MANIFEST} recorded when it was written; re-extract it")
                if full and sfx == ".acts.npy":
                    if got in digests:
                        raise ShardError(f"{f} has the same content as {self.path / digests[got]}.acts.npy: a shard "
                                         "copied under two names (its examples would be read twice)")
                    digests[got] = s["name"]
            self.shard_meta(i)
            if full:
                self._check_content(i)

    def _check_content(self, i: int) -> None:
        s = self.manifest["shards"][i]
        where = f"{self.path}/{s['name']}.acts.npy"
        u = float(np.finfo(self.dtype).eps) / 2
        tol = 2 * u + self.d * float(np.finfo(np.float32).eps)
        mm = self.shard_acts(i)
        for start in range(0, len(mm), 65536):
            norms = _check_rows(np.asarray(mm[start:start + 65536], dtype=np.float32), where, start)
            if self.normalization == "unit_norm":
                off = np.abs(norms - 1.0)
                if (off > tol).any():
                    row = int(np.flatnonzero(off > tol)[0])
                    raise ShardError(f"{where} row {start + row}: norm {norms[row]:.6g}, but {self.path / MANIFEST} says "
                                     f"'normalization': 'unit_norm' (|norm - 1| <= {tol:.3g} expected)")
        del mm

    # -- views
    def all(self) -> "ShardView":
        return ShardView(self, np.arange(len(self), dtype=np.int64))

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["ShardView", "ShardView"]:
        """Train / validation views by example: a seeded random ``val_fraction`` of examples is held out."""
        if not 0.0 <= val_fraction < 1.0:
            raise ShardError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n = len(self)
        perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5A17])).permutation(n)
        n_val = int(round(n * val_fraction))
        val = np.sort(perm[:n_val])
        train = np.sort(perm[n_val:])
        return ShardView(self, train), ShardView(self, val)

    def epoch_batches(self, batch_size: int, **kw: Any) -> Iterator[Batch]:
        return self.all().epoch_batches(batch_size, **kw)

    def sequential_batches(self, batch_size: int, **kw: Any) -> Iterator[Batch]:
        return self.all().sequential_batches(batch_size, **kw)


class ShardView:
    """A subset of a shard set's examples (sorted global indices), with the iterators that training and evaluation use."""

    def __init__(self, shards: ShardSet, index: np.ndarray):
        self.shards = shards
        self.index = np.asarray(index, dtype=np.int64)
        shard, row = shards.locate(self.index)
        # Per shard: the rows of this view, ascending (index is sorted, so they are).
        bounds = np.searchsorted(shard, np.arange(shards.num_shards + 1))
        self._rows = [row[bounds[i]:bounds[i + 1]] for i in range(shards.num_shards)]

    def __len__(self) -> int:
        return int(self.index.size)

    @property
    def d(self) -> int:
        return self.shards.d

    def read(self, positions: Sequence[int] | np.ndarray, raw: bool = False) -> np.ndarray:
        """Rows at ``positions`` within this view."""
        return self.shards.read(self.index[np.asarray(positions, dtype=np.int64)], raw=raw)

    def _load_shard_rows(self, s: int) -> np.ndarray:
        rows = self._rows[s]
        mm = self.shards.shard_acts(s)
        if rows.size == len(mm):
            out = np.asarray(mm, dtype=np.float32)
        else:
            out = mm[rows].astype(np.float32)
        del mm  # unmap: pages leave this process's RSS
        return out

    def sequential_batches(self, batch_size: int, drop_last: bool = False) -> Iterator[Batch]:
        """Batches in storage order (for evaluation); every example once."""
        carry_a: list[np.ndarray] = []
        carry_i: list[np.ndarray] = []
        have = 0
        for s in range(self.shards.num_shards):
            if not self._rows[s].size:
                continue
            carry_a.append(self._load_shard_rows(s))
            carry_i.append(self._rows[s] + self.shards.offsets[s])
            have += carry_a[-1].shape[0]
            if have >= batch_size:
                a, idx = np.concatenate(carry_a), np.concatenate(carry_i)
                k = (have // batch_size) * batch_size
                for start in range(0, k, batch_size):
                    yield Batch(a[start:start + batch_size], idx[start:start + batch_size])
                carry_a, carry_i, have = [a[k:]], [idx[k:]], have - k
        if have and not drop_last:
            yield Batch(np.concatenate(carry_a), np.concatenate(carry_i))

    def epoch_batches(
        self,
        batch_size: int,
        epoch: int = 0,
        seed: int = 0,
        buffer_size: int = 1 << 20,
        drop_last: bool = True,
        prefetch: int = 4,
        start_batch: int = 0,
        world_size: int = 1,
        rank: int = 0,
    ) -> Iterator[Batch]:
        """Shuffled batches of one epoch; each example at most once (exactly once unless dropped by ``drop_last``).

        Shard order is permuted each epoch, shards are read whole in groups of about
        ``buffer_size`` examples, and the rows of a group are permuted together, so memory
        stays at O(buffer_size * d) however large the set; with ``buffer_size >= len(self)``
        it is a full global permutation. The permutation depends only on (seed, epoch), and
        ``start_batch`` skips batches for exact resumption. A background thread prepares
        the next ``prefetch`` batches while the caller trains.

        Data-parallel (``world_size`` W > 1): the same global batches of ``batch_size`` are
        formed (same permutation), and this iterator yields only rank ``rank``'s slice of each,
        rows ``[m*r//W, m*(r+1)//W)`` of a global batch of m rows (``batch_size / W`` rows when W
        divides it; the last, short batch is split the same way and a slice may be empty). The
        rank permutes example indices, not rows, and reads only its own rows of each group
        (``ShardSet.read``), so its memory is O(buffer_size * d / W).
        """
        if batch_size <= 0:
            raise ShardError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ShardError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0xE90C]))
        order = [s for s in rng.permutation(self.shards.num_shards) if self._rows[s].size]
        if world_size > 1:
            gen = self._rank_batches(order, rng, batch_size, buffer_size, drop_last, start_batch, world_size, rank)
            yield from (_prefetched(gen, prefetch) if prefetch > 0 else gen)
            return

        def produce() -> Iterator[Batch]:
            carry_a = np.zeros((0, self.d), np.float32)
            carry_i = np.zeros(0, np.int64)
            b = 0
            pos = 0
            while pos < len(order) or carry_a.shape[0]:
                group, n = [], 0
                while pos < len(order) and n < buffer_size:
                    group.append(order[pos])
                    n += self._rows[order[pos]].size
                    pos += 1
                last_group = pos >= len(order)
                acts = np.concatenate([carry_a] + [self._load_shard_rows(s) for s in group])
                idx = np.concatenate([carry_i] + [self._rows[s] + self.shards.offsets[s] for s in group])
                perm = rng.permutation(acts.shape[0])
                k = acts.shape[0] if last_group else (acts.shape[0] // batch_size) * batch_size
                for start in range(0, k, batch_size):
                    sel = perm[start:min(start + batch_size, k)]
                    if sel.size < batch_size and drop_last:
                        break
                    if b >= start_batch:
                        yield Batch(acts[sel], idx[sel])
                    b += 1
                rest = perm[k:]
                carry_a, carry_i = acts[rest], idx[rest]
                if last_group:
                    break

        if prefetch <= 0:
            yield from produce()
            return
        yield from _prefetched(produce(), prefetch)


    def _rank_batches(self, order: list[Any], rng: np.random.Generator, batch_size: int, buffer_size: int,
                      drop_last: bool, start_batch: int, world: int, rank: int) -> Iterator[Batch]:
        """``epoch_batches``' data-parallel path: the same groups, permutations and batches as the
        one-process path (the same draws from ``rng``), but by index; rank ``rank`` reads its rows only."""
        carry_i = np.zeros(0, np.int64)
        b = pos = 0
        while pos < len(order) or carry_i.size:
            group, n = [], 0
            while pos < len(order) and n < buffer_size:
                group.append(order[pos])
                n += self._rows[order[pos]].size
                pos += 1
            last_group = pos >= len(order)
            idx = np.concatenate([carry_i] + [self._rows[s] + self.shards.offsets[s] for s in group])
            perm = rng.permutation(idx.size)
            k = idx.size if last_group else (idx.size // batch_size) * batch_size
            mine = []
            for start in range(0, k, batch_size):
                sel = perm[start:min(start + batch_size, k)]
                if sel.size < batch_size and drop_last:
                    break
                if b >= start_batch:
                    m = sel.size
                    mine.append(idx[sel[m * rank // world:m * (rank + 1) // world]])
                b += 1
            if mine:
                acts = self.shards.read(np.concatenate(mine))
                at = 0
                for rows in mine:
                    yield Batch(acts[at:at + rows.size], rows)
                    at += rows.size
            carry_i = idx[perm[k:]]
            if last_group:
                break


def _prefetched(gen: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run ``gen`` in a daemon thread, ``depth`` items ahead (numpy copies release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    sentinel = object()

    def worker() -> None:
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(sentinel)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ----------------------------------------------------------------------------- merging


def merge_shard_sets(parts: Sequence[str | Path], out_dir: str | Path, remove_parts: bool = True) -> ShardSet:
    """Merge complete shard sets (e.g. one per torchrun rank) into ``out_dir``, in the order given.

    Shard files are moved (renamed) when ``remove_parts``, else copied; the merged manifest
    is written last, so an interrupted merge can simply be rerun.
    """
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = [ShardSet(p, require_complete=True) for p in parts]
    if not sets:
        raise ShardError("merge_shard_sets: no parts given")
    first = sets[0].manifest
    for s in sets[1:]:
        for key in ("d", "dtype", "normalization", "columns"):
            if s.manifest[key] != first[key]:
                raise ShardError(f"cannot merge {s.path}: field '{key}' is {s.manifest[key]!r}, {sets[0].path} has {first[key]!r}")
    merged = {k: v for k, v in first.items() if k not in ("shards", "num_examples", "complete")}
    merged["shards"], merged["num_examples"] = [], 0
    i = 0
    for s in sets:
        for entry in s.manifest["shards"]:
            name = _shard_name(i)
            for suffix in (".acts.npy", ".meta.npz"):
                src, dst = s.path / f"{entry['name']}{suffix}", out / f"{name}{suffix}"
                if src.exists():
                    if remove_parts:
                        os.replace(src, dst)
                    else:
                        shutil.copyfile(src, dst)
                elif not dst.exists():
                    raise ShardError(f"merge: {src} is missing")
            merged["shards"].append({k: v for k, v in entry.items() if k != "name"} | {"name": name})
            merged["num_examples"] += entry["count"]
            i += 1
    merged["complete"] = True
    atomic_write_text(out / MANIFEST, json.dumps(merged, indent=1))
    if remove_parts:
        for s in sets:
            if s.path != out:
                shutil.rmtree(s.path, ignore_errors=True)
    return ShardSet(out)


def subset_shard_set(shards: ShardSet | str | Path, index: Sequence[int] | np.ndarray, out_dir: str | Path,
                     shard_size: int = 65536) -> ShardSet:
    """Rows ``index`` [n] of a complete shard set, in that order, written as a new shard set at ``out_dir``: e.g. a
    train / validation split of one extraction (``visae cbm``'s two labelled sets).

    Carries the activations (raw: the stored rows times their stored norms, stored again with the same dtype and
    normalization, so unit rows match the source's to within one rounding of the storage dtype), ids, labels, every
    extra column, the source record and the label names. A complete shard set already at ``out_dir`` with the same ids
    in the same order is returned as it is (rerun-safe); anything else there is replaced. Written through
    :class:`ShardWriter`, so a killed run leaves an incomplete set that is rebuilt. Raises ShardError for an index
    outside ``[0, len(shards))`` or an empty one.
    """
    src = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    if index.size == 0:
        raise ShardError(f"subset of {src.path}: no rows selected")
    if index.min() < 0 or index.max() >= len(src):
        raise ShardError(f"subset of {src.path}: row index out of range [0, {len(src)}) "
                         f"(got {int(index.min())}..{int(index.max())})")
    meta = src.metadata()
    ids = [str(i) for i in meta["id"][index]]
    out = Path(out_dir)
    try:
        have = ShardSet(out)
        if len(have) == len(ids) and [str(i) for i in have.metadata()["id"]] == ids:
            return have
    except (ShardError, OSError, ValueError):  # absent or incomplete: (re)build
        pass
    cols = dict(src.manifest.get("columns", {}))
    with ShardWriter(out, d=src.d, dtype=str(src.manifest["dtype"]), shard_size=shard_size,
                     normalization=src.normalization, source=src.source, label_names=src.label_names, columns=cols,
                     overwrite=True) as w:
        for start in range(0, index.size, shard_size):
            part = index[start:start + shard_size]
            w.add(src.read(part, raw=True), ids=ids[start:start + len(part)], labels=meta["label"][part],
                  columns={k: meta[k][part] for k in cols})
    return ShardSet(out)
