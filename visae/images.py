"""Image sources for extraction: folder trees, ImageNet layout, webdataset tars, the toy world.

Every source becomes an :class:`ImageSource`: a deterministic, sorted list of :class:`Item`
(one per input image, each with a unique ``id``, an integer ``label`` (-1 unknown) and the
values of the source's extra columns) plus ``label_names``. Extraction reads items by
position, so order is the same on every run, resumption can find where it stopped from
the last committed id, and ranks take contiguous, disjoint slices.

Kinds (``open_source(path, kind="auto")``):

- ``folder``: every image file under a directory, recursively (ids: relative paths).
  With ``folder_labels=True`` the first-level sub-folder is the class (sorted names).
- ``imagenet``: wnid sub-folders (``train/n01440764/x.JPEG``) or files named
  ``<wnid>_<anything>.JPEG`` (as in ``imagenet-sample``); label = index of the wnid in
  the sorted list of the 1000 ILSVRC-2012 wnids (``visae/data/imagenet_wnids.txt``),
  label names = ``open_clip.IMAGENET_CLASSNAMES`` (same order).
- ``webdataset``: local ``.tar`` shards, brace patterns (``shards/train-{000..099}.tar``),
  globs or a directory of tars; samples grouped by key as webdataset does (ids: keys,
  prefixed by the shard name when keys repeat across shards), label from an optional
  ``cls`` member. Tars are indexed once (headers only), then members are read by offset.
- ``toyworld``: a directory written by ``visae.toyworld`` (``world.json`` + ``world.jsonl``):
  one int64 column per factor, label = the world's main label factor.

Decoding (:func:`load_image`) never raises: a corrupt, unreadable or truncated image gives
an error string, and the extractor skips, counts and logs it.
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "Item",
    "ImageSource",
    "open_source",
    "load_image",
    "imagenet_wnids",
    "imagenet_classnames",
    "SOURCE_KINDS",
    "SourceError",
    "rank_bounds",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
# webdataset member extensions that hold the image, in order of preference
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "image", "img")
SOURCE_KINDS = ("auto", "folder", "imagenet", "webdataset", "toyworld")
_WNID = re.compile(r"^n\d{8}$")
_WNID_PREFIX = re.compile(r"^(n\d{8})_")
_DATA = Path(__file__).resolve().parent / "data"


class SourceError(ValueError):
    """An image source cannot be read or is not what was asked for."""


@dataclass(frozen=True, slots=True)
class Item:
    """One input image.

    ``path``: the image file, or the tar shard holding it (then ``offset``/``size`` locate
    the image member's bytes and ``cls_offset``/``cls_size`` an optional ``cls`` member).
    ``extra``: values of the source's extra columns, in ``ImageSource.columns`` order.
    ``error``: a problem found while indexing (e.g. a truncated tar member); such an item
    is skipped and reported like an image that fails to decode.
    """

    id: str
    path: str
    label: int = -1
    extra: tuple[int, ...] = ()
    offset: int = -1
    size: int = -1
    cls_offset: int = -1
    cls_size: int = -1
    error: str = ""


@dataclass
class ImageSource:
    """A deterministic list of items with their label names and extra columns."""

    kind: str
    root: str
    items: list[Item]
    label_names: dict[str, list[str]] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)  # extra columns: name -> "int64"
    info: dict[str, Any] = field(default_factory=dict)
    # positions where a rank slice may start (tar shard starts); None = anywhere
    boundaries: list[int] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict[str, Any]:
        """What goes into the shard manifest's source (JSON-able, deterministic)."""
        return {"kind": self.kind, "path": self.root, "num_items": len(self.items), **self.info}


# ----------------------------------------------------------------------------- decoding


def _read_bytes(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"truncated: expected {size} bytes at offset {offset} of {path}, got {len(data)}")
    return data


def load_image(item: Item) -> tuple[Image.Image | None, int, str]:
    """Decode ``item`` -> (RGB PIL image or None, label, error message or "")."""
    if item.error:
        return None, item.label, item.error
    label = item.label
    try:
        if item.offset >= 0:
            data = _read_bytes(item.path, item.offset, item.size)
            if item.cls_offset >= 0:
                label = int(_read_bytes(item.path, item.cls_offset, item.cls_size).decode().strip())
            img = Image.open(io.BytesIO(data))
            img.load()
        else:
            with Image.open(item.path) as im:
                im.load()
                img = im
        # load() fully decodes, so truncated files fail here rather than later in a transform
        return img.convert("RGB"), label, ""
    except Exception as e:  # noqa: BLE001 - any decode failure means: skip this image
        return None, label, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- ImageNet facts


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 wnids, sorted (the standard class index order)."""
    f = _DATA / "imagenet_wnids.txt"
    wnids = [w.strip() for w in f.read_text().split() if w.strip()]
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise SourceError(f"{f}: expected 1000 sorted wnids, got {len(wnids)}")
    return wnids


def imagenet_classnames() -> list[str]:
    """Readable names in the same order as :func:`imagenet_wnids` (open_clip's cleaned CLIP names)."""
    import open_clip

    return list(open_clip.IMAGENET_CLASSNAMES)


# ----------------------------------------------------------------------------- listing


def _list_images(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(dirpath) / fn)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _wnid_of(rel: Path) -> str | None:
    for part in reversed(rel.parts[:-1]):
        if _WNID.match(part):
            return part
    m = _WNID_PREFIX.match(rel.name)
    return m.group(1) if m else None


def _folder_source(root: Path, folder_labels: bool) -> ImageSource:
    files = _list_images(root)
    if not files:
        raise SourceError(f"{root}: no image files found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    rels = [f.relative_to(root) for f in files]
    label_names: dict[str, list[str]] = {}
    labels = [-1] * len(files)
    if folder_labels:
        classes = sorted({r.parts[0] for r in rels if len(r.parts) > 1})
        if not classes:
            raise SourceError(f"{root}: folder_labels=True but no images are inside sub-folders")
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[r.parts[0]] if len(r.parts) > 1 else -1 for r in rels]
        label_names["label"] = classes
    items = [Item(id=r.as_posix(), path=str(f), label=lab) for r, f, lab in zip(rels, files, labels)]
    return ImageSource("folder", str(root), items, label_names, info={"folder_labels": folder_labels})


def _imagenet_source(root: Path) -> ImageSource:
    files = _list_images(root)
    if not files:
        raise SourceError(f"{root}: no image files found")
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    items, missing = [], []
    for f in files:
        rel = f.relative_to(root)
        w = _wnid_of(rel)
        if w is None or w not in index:
            missing.append(rel.as_posix())
            continue
        items.append(Item(id=rel.as_posix(), path=str(f), label=index[w]))
    if missing:
        raise SourceError(
            f"{root}: {len(missing)} image(s) have no ImageNet wnid in their folder or file name "
            f"(expected <wnid>/<file> or <wnid>_<name>.JPEG), e.g. {missing[:3]}; use --source folder for unlabelled images"
        )
    return ImageSource("imagenet", str(root), items, {"label": imagenet_classnames()}, info={"wnids": "ILSVRC2012 (sorted)"})


def _looks_imagenet(root: Path) -> bool:
    files = _list_images(root)
    return bool(files) and all(_wnid_of(f.relative_to(root)) is not None for f in files)


def _toyworld_source(root: Path) -> ImageSource:
    wj, jl = root / "world.json", root / "world.jsonl"
    if not wj.is_file() or not jl.is_file():
        raise SourceError(f"{root}: not a toy world (world.json and world.jsonl expected)")
    try:
        meta = json.loads(wj.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{wj}: not valid JSON ({e})") from None
    factors = meta.get("factors")
    if not isinstance(factors, dict) or not factors:
        raise SourceError(f"{wj}: field 'factors' must map factor name -> list of value names")
    names = list(factors)
    label_factor = meta.get("label")
    if label_factor is not None and label_factor not in factors:
        raise SourceError(f"{wj}: 'label' is {label_factor!r}, not one of the factors {names}")
    items = []
    for ln, line in enumerate(jl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            f = rec["factors"]
            file = rec["file"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SourceError(f"{jl} line {ln}: expected a JSON object with 'file' and 'factors' ({e})") from None
        vals = tuple(int(f.get(n, -1)) for n in names)
        label = int(f.get(label_factor, -1)) if label_factor else -1
        items.append(Item(id=str(rec.get("id", file)), path=str(root / file), label=label, extra=vals))
    if "n" in meta and len(items) != meta["n"]:
        raise SourceError(f"{jl}: {len(items)} records but world.json says n={meta['n']} (generation incomplete?)")
    items.sort(key=lambda it: it.id)
    label_names = {n: list(v) for n, v in factors.items()}
    if label_factor:
        label_names["label"] = list(factors[label_factor])
    info = {"label_factor": label_factor, "world_seed": meta.get("seed"), "world_n": meta.get("n")}
    return ImageSource("toyworld", str(root), items, label_names, {n: "int64" for n in names}, info)


# ----------------------------------------------------------------------------- webdataset


def _expand_tars(spec: str) -> list[str]:
    """Brace patterns, globs, '::'-joined lists or a directory -> sorted list of tar paths."""
    from webdataset.shardlists import expand_urls

    p = Path(spec)
    if p.is_dir():
        tars = sorted(str(t) for t in p.rglob("*.tar"))
        if not tars:
            raise SourceError(f"{spec}: directory has no .tar shards")
        return tars
    out: list[str] = []
    for u in expand_urls(spec):
        if u.startswith("file:"):
            u = u[5:]
        if re.match(r"^[a-z][a-z0-9+.-]*:", u) and not os.path.exists(u):
            raise SourceError(f"{u}: only local tar files are supported (no URLs / pipes); download the shards first")
        hits = sorted(glob.glob(u)) if any(c in u for c in "*?[") else [u]
        for h in hits:
            if not os.path.isfile(h):
                raise SourceError(f"webdataset shard {h} does not exist (from {spec!r})")
        out.extend(hits)
    if not out:
        raise SourceError(f"{spec}: no tar shards matched")
    return out


def _index_tar(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Samples of one tar (in member order): [{key, image (ext, offset, size), cls, error}], and index errors."""
    from webdataset.tariterators import base_plus_ext

    size = os.path.getsize(path)
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    errors: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tf:
            while True:
                try:
                    ti = tf.next()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    errors.append(f"{path}: tar unreadable after {len(order)} samples ({type(e).__name__}: {e})")
                    break
                if ti is None:
                    break
                if not ti.isreg():
                    continue
                key, ext = base_plus_ext(ti.name)
                if key is None or os.path.basename(ti.name).startswith("__"):
                    continue
                if key not in samples:
                    samples[key] = {"key": key, "image": None, "cls": None, "error": ""}
                    order.append(key)
                s = samples[key]
                ext = ext.lower()
                if ti.offset_data + ti.size > size:
                    s["error"] = f"truncated tar member {ti.name} ({size - ti.offset_data} of {ti.size} bytes present)"
                if ext in WDS_IMAGE_EXTS and s["image"] is None:
                    s["image"] = (ext, ti.offset_data, ti.size)
                elif ext == "cls":
                    s["cls"] = (ti.offset_data, ti.size)
            end = tf.offset
        # tarfile stops quietly at a damaged header past the first member: anything but zero
        # padding after the last member means samples were lost, which must not go unnoticed
        if not errors and _nonzero_after(path, end):
            errors.append(f"{path}: damaged tar header at byte {end} after {len(order)} samples; the rest of the shard is unreadable")
    except tarfile.ReadError as e:
        errors.append(f"{path}: not a readable tar file ({e})")
    return [samples[k] for k in order], errors


def _nonzero_after(path: str, pos: int, chunk: int = 1 << 16) -> bool:
    with open(path, "rb") as f:
        f.seek(pos)
        while True:
            b = f.read(chunk)
            if not b:
                return False
            if b.count(0) != len(b):
                return True


def _webdataset_source(spec: str) -> ImageSource:
    tars = _expand_tars(spec)
    per_tar = [(t, *_index_tar(t)) for t in tars]
    keys = [s["key"] for _, ss, _ in per_tar for s in ss]
    prefix = len(set(keys)) != len(keys)  # keys repeat across shards: qualify them with the shard name
    items: list[Item] = []
    tar_starts: list[int] = []
    has_cls = False
    for t, ss, errs in per_tar:
        tar_starts.append(len(items))
        stem = os.path.basename(t)
        for s in ss:
            sid = f"{stem}/{s['key']}" if prefix else s["key"]
            err = s["error"]
            if s["image"] is None and not err:
                err = f"sample has no image member (one of {WDS_IMAGE_EXTS})"
            img = s["image"] or ("", 0, 0)
            cls = s["cls"] or (-1, -1)
            has_cls |= s["cls"] is not None
            items.append(Item(id=sid, path=t, offset=img[1], size=img[2], cls_offset=cls[0], cls_size=cls[1], error=err))
        # a tar that breaks off (truncated header, garbage) becomes one skipped pseudo-item, in order
        for j, e in enumerate(errs):
            items.append(Item(id=f"{stem}#unreadable-{j}", path=t, error=e))
    if not items:
        raise SourceError(f"{spec}: the tar shards hold no samples")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise SourceError(f"{spec}: sample keys repeat within a shard; ids must be unique")
    src = ImageSource("webdataset", spec, items, info={"shards": len(tars), "has_cls": has_cls})
    src.boundaries = tar_starts
    return src


# ----------------------------------------------------------------------------- entry point


def open_source(path: str | os.PathLike, kind: str = "auto", *, folder_labels: bool = False) -> ImageSource:
    """List the images of ``path`` as an :class:`ImageSource` (see module docstring for kinds)."""
    if kind not in SOURCE_KINDS:
        raise SourceError(f"source kind must be one of {SOURCE_KINDS}, got {kind!r}")
    spec = str(path)
    p = Path(spec)
    if kind == "auto":
        if p.is_dir() and (p / "world.json").is_file() and (p / "world.jsonl").is_file():
            kind = "toyworld"
        elif spec.endswith(".tar") or "{" in spec or "::" in spec or (p.is_dir() and any(p.glob("*.tar")) and not _list_images(p)):
            kind = "webdataset"
        elif p.is_dir():
            kind = "imagenet" if not folder_labels and _looks_imagenet(p) else "folder"
        elif not p.exists():
            raise SourceError(f"image source {spec} does not exist")
        else:
            raise SourceError(f"{spec}: expected a directory of images, a toy world directory or .tar shards")
    if kind == "webdataset":
        return _webdataset_source(spec)
    if not p.is_dir():
        raise SourceError(f"image source {spec} is not a directory (kind {kind!r})")
    root = p.resolve()
    if kind == "toyworld":
        return _toyworld_source(root)
    if kind == "imagenet":
        return _imagenet_source(root)
    return _folder_source(root, folder_labels)


def rank_bounds(source: ImageSource, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice [lo, hi) of the source's items for ``rank``.

    Slices of ranks 0..world_size-1 concatenated give every item once, in order (so merged
    rank outputs equal a one-process run). They are cut only at ``source.boundaries`` (tar
    shard starts for webdataset: each rank reads its own files), balanced by item count.
    """
    n = len(source.items)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    if source.boundaries is None:
        return (n * rank) // world_size, (n * (rank + 1)) // world_size
    cuts = sorted(set(source.boundaries) | {0, n})

    def cut(k: int) -> int:
        ideal = n * k / world_size
        j = bisect.bisect_left(cuts, ideal)
        near = cuts[max(j - 1, 0):j + 1]
        return min(near, key=lambda c: (abs(c - ideal), c))

    return cut(rank), cut(rank + 1)
