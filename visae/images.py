"""Image sources for extraction: folder trees, ImageNet layout, webdataset tars, the toy world.

Every source becomes an :class:`ImageSource`: a deterministic, sorted list of :class:`Item`
(one per input image, each with a unique ``id``, an integer ``label`` (-1 unknown) and the
values of the source's extra columns) plus ``label_names``. Extraction reads items by
position, so order is the same on every run, resumption can find where it stopped from
the last committed id, and ranks take contiguous, disjoint slices.

Kinds (``open_source(path, kind="auto")``):

- ``folder``: every image file under a directory, recursively (ids: relative paths).
  With ``folder_labels=True`` the first-level sub-folder is the class (every first-level folder, sorted,
  empty ones included so that class indices agree between splits; a warning names the empty ones).
  A link to a folder inside the root is not followed (the folder is read under its own name).
- ``imagenet``: wnid sub-folders (``train/n01440764/x.JPEG``) or files named
  ``<wnid>_<anything>.JPEG`` (as in ``imagenet-sample``); label = index of the wnid in
  the sorted list of the 1000 ILSVRC-2012 wnids (``visae/data/imagenet_wnids.txt``),
  label names = ``open_clip.IMAGENET_CLASSNAMES`` (same order).
- ``webdataset``: local ``.tar`` shards, brace patterns (``shards/train-{000..099}.tar``),
  globs or a directory of tars; samples grouped by key as webdataset does (ids: keys,
  prefixed by the shard name when keys repeat across shards), label from an optional
  ``cls`` member (:func:`parse_cls`: ASCII digits, 0 .. 2**63 - 1, else a counted skip); link
  members and repeated member names are counted skips (pseudo-items ``<shard>#<kind>-<j>``). Tars are indexed once (headers only), then members are read by offset.
  ``pipe:`` commands and http(s) URLs are streamed instead (:mod:`visae.wds_stream`: no item
  list up front; :func:`visae.wds_stream.open_stream` returns a :class:`visae.wds_stream.StreamSource`;
  ``open_source`` refuses them, so that this module does not depend on the streaming one).
- ``toyworld``: a directory written by ``visae.toyworld`` (``world.json`` + ``world.jsonl``):
  one int64 column per factor, label = the world's main label factor.

Decoding (:func:`load_image`) never raises: a corrupt, unreadable or truncated image gives
an error string, and the extractor skips, counts and logs it.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from visae.errors import VisaeError

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "Item",
    "ImageSource",
    "open_source",
    "load_image",
    "as_browser_rgb",
    "encode_id",
    "decode_id",
    "UndecodableRange",
    "imagenet_wnids",
    "imagenet_classnames",
    "SOURCE_KINDS",
    "SourceError",
    "rank_bounds",
    "STREAM_PREFIXES",
    "is_stream_spec",
    "items_digest",
    "parse_cls",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
# webdataset member extensions that hold the image, in order of preference
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "image", "img")
SOURCE_KINDS = ("auto", "folder", "imagenet", "webdataset", "toyworld")
_WNID = re.compile(r"^n\d{8}$")
_WNID_PREFIX = re.compile(r"^(n\d{8})_")
_DATA = Path(__file__).resolve().parent / "data"
ID_BYTES_PREFIX = "%b:"  # ids of names that are not valid Unicode: see encode_id


class SourceError(VisaeError, ValueError):
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
        """What goes into the shard manifest's ``source.dataset_info`` (JSON-able, deterministic).

        ``items_sha256`` (:func:`items_digest`) fingerprints the item list: a finished or unfinished
        extraction of a folder whose files were added, removed or renamed since is refused, not returned.
        """
        return {"kind": self.kind, "path": self.root, "num_items": len(self.items),
                "items_sha256": items_digest(self.items), **self.info}


def items_digest(items: list[Item]) -> str:
    """SHA-256 (hex) over the ordered item ids and their labels, one JSON ``[id, label]`` a line.

    Equal for the same listing of the same images (a file replaced in place keeps it); any file added,
    removed or renamed, or a label changed, changes it. Skip items (listed with an ``error``) count too."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.label], ensure_ascii=True).encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


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
                label = parse_cls(_read_bytes(item.path, item.cls_offset, item.cls_size))
            with Image.open(io.BytesIO(data)) as im:
                return as_browser_rgb(im), label, ""
        with Image.open(item.path) as im:
            return as_browser_rgb(im), label, ""
    except Exception as e:  # noqa: BLE001 - any decode failure means: skip this image
        return None, label, f"{type(e).__name__}: {e}"


_INT64_MAX = 2**63 - 1
_CLS_DIGITS = re.compile(rb"^[0-9]+$")


def parse_cls(data: bytes) -> int:
    """A webdataset ``cls`` member -> its label: a class index written in ASCII digits (0 .. 2**63 - 1).

    Surrounding ASCII whitespace is allowed. Raises SourceError (the sample becomes a counted skip, this
    message its reason) for anything else: a sign (a negative label would be stored as "unknown"), other
    digits (``'\u0663'``, which ``int()`` takes), a number past int64, text that is not a number."""
    text = data.strip(b" \t\r\n\f\v")
    shown = text[:40].decode("utf-8", "replace") + ("..." if len(text) > 40 else "")
    if text.startswith(b"-") and _CLS_DIGITS.match(text[1:]):
        raise SourceError(f"cls member is {shown!r}: a negative label; labels are class indices >= 0 "
                          "(unlabelled samples have no cls member)")
    if not _CLS_DIGITS.match(text):
        raise SourceError(f"cls member is {shown!r}: expected a class index in ASCII digits 0-9")
    if len(text) > 19 or int(text) > _INT64_MAX:
        raise SourceError(f"cls member is {shown!r}: larger than the largest label (2**63 - 1 = {_INT64_MAX})")
    return int(text)


# ----------------------------------------------------------------------------- decoding policy
#
# What the model sees is the picture a web browser shows when it opens the file. The rules, in
# order (docs/extraction.md, "Decoding policy"; tests/test_images_decoding.py tests each one):
#   1. first frame of animated / multi-page files (GIF, APNG, animated WebP, multi-page TIFF);
#   2. EXIF orientation applied (ImageOps.exif_transpose), as browsers do by default;
#   3. by mode: 1 / L / P / RGB / CMYK / YCbCr -> Pillow's conversion to RGB; with an alpha channel
#      (RGBA, LA, PA, P or L with transparency, RGBa, La) composited over white, the page background;
#      16-bit greyscale (I;16, I;16L, I;16B, I;16N, and mode I read from a PNG, whose range is
#      16 bits) scaled to 8 bits by v * 255 / 65535 rounded; F (float) and I from other containers
#      (TIFF, ...) have no known range: refused with a counted skip; any other mode: refused;
#   4. an embedded ICC profile is applied (converted to sRGB with ImageCms), as colour-managed
#      browsers do; a profile that cannot be read is ignored (the pixels are taken as sRGB).

_WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class UndecodableRange(VisaeError, ValueError):
    """An image whose pixel range is not defined by its format (float, 32-bit integer): refused."""


def _icc_to_srgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK", "L", "LAB"):
        return img
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"  # alpha passes through the transform unchanged
        return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return img  # an unreadable profile: browsers ignore it too


def as_browser_rgb(img: Image.Image) -> Image.Image:
    """The 8-bit RGB picture a web browser shows for ``img`` (rules 1-4 above). ``[H, W, 3]`` uint8.

    Raises:
        UndecodableRange: float images, 32-bit integer images outside PNG, and modes with no rule
            (the extractor counts them as skipped, with this message as the reason).
    """
    from PIL import ImageOps

    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img.load()  # full decode here: a truncated file fails now, not later in a transform
    fmt = img.format
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in _GREY16_MODES or (mode == "I" and fmt == "PNG"):
        import numpy as np

        a = np.asarray(img).astype(np.float64)
        if a.min() < 0 or a.max() > 65535:
            raise UndecodableRange(f"{mode} image from {fmt} has values outside 0..65535")
        return Image.fromarray(np.rint(a * (255.0 / 65535.0)).astype(np.uint8), "L").convert("RGB")
    if mode in ("F", "I"):
        raise UndecodableRange(f"{'floating-point' if mode == 'F' else '32-bit integer'} image (mode {mode}, "
                               f"{fmt or 'unknown container'}): its range is not defined, so it cannot be shown as a browser would")
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = _icc_to_srgb(img.convert("RGBA"))  # a tagged image with alpha is colour-managed too
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode in ("RGB", "CMYK", "L", "LAB"):
        img = _icc_to_srgb(img)
    if img.mode in ("1", "L", "P", "RGB", "CMYK", "YCbCr", "RGBX"):
        return img.convert("RGB")
    raise UndecodableRange(f"image mode {img.mode} ({fmt or 'unknown container'}) has no decoding rule")


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


def encode_id(name: str) -> str:
    """The id stored in shards, JSON, CSV and the site for a file or member ``name``.

    A name that is valid Unicode (no lone surrogates, as Python gives for file-name bytes that are
    not UTF-8) and does not start with ``%b:`` is its own id. Any other name is written as ``%b:``
    followed by its bytes (UTF-8, undecodable bytes as they were) percent-encoded, ``/`` kept:
    ``caf\\xe9.jpg`` (a Latin-1 byte) -> ``%b:caf%E9.jpg``. :func:`decode_id` gives the name back, so the
    id always leads back to the file. docs/shard_format.md, "Ids".
    """
    try:
        name.encode("utf-8")
        if not name.startswith(ID_BYTES_PREFIX):
            return name
    except UnicodeEncodeError:
        pass
    from urllib.parse import quote_from_bytes

    return ID_BYTES_PREFIX + quote_from_bytes(name.encode("utf-8", "surrogateescape"), safe="/")


def decode_id(example_id: str) -> str:
    """The file or member name behind an id of :func:`encode_id` (undecodable bytes as surrogates, as
    ``os`` functions take them)."""
    if not example_id.startswith(ID_BYTES_PREFIX):
        return example_id
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(example_id[len(ID_BYTES_PREFIX):]).decode("utf-8", "surrogateescape")


@dataclass
class _Listing:
    """What :func:`_list_files` found: image files, skip items, and the first-level folders walked."""

    files: list[tuple[str, Path]]
    skips: list[Item]
    top_dirs: list[str]


def _under_root(target: str, root: Path) -> str | None:
    """``target`` (a real path) relative to ``root`` (a real path) when the walk reaches it by its own name
    (inside ``root``, no hidden component), else None."""
    try:
        rel = Path(target).relative_to(root)
    except ValueError:
        return None
    if any(part.startswith(".") for part in rel.parts):
        return None
    return rel.as_posix()


def _list_files(root: Path) -> _Listing:
    """Image files under ``root`` (a resolved path), each read once, sorted by relative name.

    Hidden files and folders (names starting with ``.``) and files without an image extension are
    ignored by rule. Symlinked folders are followed, but a folder is read under one name only: a link
    to a folder inside ``root`` (``a_alias -> cat``, a loop such as ``loop -> .``) is not followed, as
    the folder is read under its own name; of two links to one folder outside ``root`` the first (by
    name) is read. A file reached through a second name (a symlink or hard link) is read once, under
    its real name rather than a symlink's. Each name not read becomes a skip item with the reason, so
    it is counted in ``skipped.jsonl`` rather than read twice or lost silently.
    """
    root = Path(os.path.realpath(root))
    seen_dirs: dict[tuple[int, int], str] = {}
    found: list[tuple[str, Path, tuple[int, int], bool]] = []
    skips: list[Item] = []
    top_dirs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        st = here.stat()
        seen_dirs.setdefault((st.st_dev, st.st_ino), rel_dir)
        keep = []
        # real folders before links, so that a link never takes the place of the folder it points to
        for d in sorted(dirnames, key=lambda n: (os.path.islink(here / n), n)):
            if d.startswith("."):
                continue
            rel = (here / d).relative_to(root).as_posix()
            try:
                dst = (here / d).stat()
            except OSError as e:
                skips.append(Item(id=encode_id(rel + "/"), path=str(here / d), error=f"folder cannot be read ({e.strerror})"))
                continue
            key = (dst.st_dev, dst.st_ino)
            if os.path.islink(here / d):
                inside = _under_root(os.path.realpath(here / d), root)
                if inside is not None:
                    skips.append(Item(id=encode_id(rel + "/"), path=str(here / d),
                                      error=f"folder link to {(inside + '/') if inside != '.' else '.'!r}, which is already "
                                            "read under its own name (the link is not read twice)"))
                    continue
            if key in seen_dirs:
                skips.append(Item(id=encode_id(rel + "/"), path=str(here / d),
                                  error=f"folder link to {seen_dirs[key] or '.'!r}, which is already read (not read twice)"))
                continue
            seen_dirs[key] = rel
            keep.append(d)
        dirnames[:] = sorted(keep)
        if rel_dir == ".":
            top_dirs = list(dirnames)
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTENSIONS):
                f = here / fn
                try:
                    fst = f.stat()
                except OSError as e:  # a dangling symlink
                    skips.append(Item(id=encode_id(f.relative_to(root).as_posix()), path=str(f),
                                      error=f"cannot be read ({e.strerror})"))
                    continue
                found.append((f.relative_to(root).as_posix(), f, (fst.st_dev, fst.st_ino), os.path.islink(f)))
    # of several names of one file, the first real one (not a symlink) by name is read
    first: dict[tuple[int, int], str] = {}
    for rel, _f, key, _link in sorted(found, key=lambda t: (t[3], t[0])):
        first.setdefault(key, rel)
    out: list[tuple[str, Path]] = []
    for rel, f, key, _ in sorted(found, key=lambda t: t[0]):
        if first[key] != rel:
            skips.append(Item(id=encode_id(rel), path=str(f),
                              error=f"same file as {encode_id(first[key])!r} (a symlink or hard link), which is read once"))
            continue
        out.append((rel, f))
    return _Listing(out, skips, sorted(top_dirs))


def _list_images(root: Path) -> list[Path]:
    return [f for _, f in _list_files(root).files]


def _wnid_of(rel: Path) -> str | None:
    for part in reversed(rel.parts[:-1]):
        if _WNID.match(part):
            return part
    m = _WNID_PREFIX.match(rel.name)
    return m.group(1) if m else None


def _folder_source(root: Path, folder_labels: bool, listing: _Listing | None = None) -> ImageSource:
    listing = listing or _list_files(root)
    files, skips = listing.files, listing.skips
    if not files:
        raise SourceError(f"{root}: no image files found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    rels = [Path(r) for r, _ in files]
    label_names: dict[str, list[str]] = {}
    labels = [-1] * len(files)
    if folder_labels:
        # every first-level folder is a class, an empty one too: class indices then stay the same in every split
        classes = list(listing.top_dirs)
        if not any(len(r.parts) > 1 for r in rels):
            raise SourceError(f"{root}: folder_labels=True but no images are inside sub-folders "
                              "(expected <class folder>/<image>)")
        used = {r.parts[0] for r in rels if len(r.parts) > 1}
        empty = [c for c in classes if c not in used]
        if empty:
            log.warning("%s: %d class folder(s) hold no images: %s; they stay classes (index kept), so labels match "
                        "other splits with the same class folders", root, len(empty),
                        ", ".join(repr(c + "/") for c in empty[:5]) + (", ..." if len(empty) > 5 else ""))
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[r.parts[0]] if len(r.parts) > 1 else -1 for r in rels]
        label_names["label"] = classes
    items = [Item(id=encode_id(r), path=str(f), label=lab) for (r, f), lab in zip(files, labels)]
    return ImageSource("folder", str(root), _with_skips(items, skips), label_names, info={"folder_labels": folder_labels})


def _with_skips(items: list[Item], skips: list[Item]) -> list[Item]:
    """Items and skip items in one deterministic order (by id)."""
    return sorted(items + skips, key=lambda it: it.id)


def _imagenet_source(root: Path, listing: _Listing | None = None) -> ImageSource:
    listing = listing or _list_files(root)
    files, skips = listing.files, listing.skips
    if not files:
        raise SourceError(f"{root}: no image files found")
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    items, missing = [], []
    for r, f in files:
        rel = Path(r)
        w = _wnid_of(rel)
        if w is None or w not in index:
            missing.append(r)
            continue
        items.append(Item(id=encode_id(r), path=str(f), label=index[w]))
    if missing:
        raise SourceError(
            f"{root}: {len(missing)} image(s) have no ImageNet wnid in their folder or file name "
            f"(expected <wnid>/<file> or <wnid>_<name>.JPEG), e.g. {missing[:3]}; use --source folder for unlabelled images"
        )
    return ImageSource("imagenet", str(root), _with_skips(items, skips), {"label": imagenet_classnames()},
                       info={"wnids": "ILSVRC2012 (sorted)"})


def _looks_imagenet(root: Path, listing: _Listing) -> bool:
    """Whether ``--source auto`` reads ``root`` as ImageNet: every image has a wnid in its folder or file name.

    When more than half do but some do not, the folder is read as an unlabelled folder and a warning says
    how many images (and which first-level folders) lack a wnid, with examples, and what to do."""
    rels = [Path(r) for r, _ in listing.files]
    lacking = [r for r in rels if _wnid_of(r) is None]
    if rels and not lacking:
        return True
    if rels and len(rels) - len(lacking) > len(rels) / 2:
        folders = sorted({r.parts[0] for r in lacking if len(r.parts) > 1 and not _WNID.match(r.parts[0])})
        where = (f"; class folder(s) not named by a wnid: {', '.join(repr(f + '/') for f in folders[:3])}"
                 + (", ..." if len(folders) > 3 else "")) if folders else ""
        log.warning("%s: read as an unlabelled folder (every label -1): %d of %d images have ImageNet names "
                    "(<wnid>/<file> or <wnid>_<name>.JPEG) but %d do not, e.g. %s%s; for ImageNet labels rename or remove "
                    "them (--source imagenet refuses them by name), or pass --source folder to read them unlabelled",
                    root, len(rels) - len(lacking), len(rels), len(lacking),
                    ", ".join(repr(r.as_posix()) for r in lacking[:3]), where)
    return False


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
    info = {"label_factor": label_factor, "world_seed": meta.get("seed"), "world_n": meta.get("n"),
            "world_format": meta.get("format"), "main_factors": meta.get("main_factors")}
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
            raise SourceError(f"{u}: not a local tar file, and only pipe: and http(s):// URLs are streamed "
                              f"(e.g. 'pipe:aws s3 cp {u} -')")
        hits = sorted(glob.glob(u)) if any(c in u for c in "*?[") else [u]
        for h in hits:
            if not os.path.isfile(h):
                raise SourceError(f"webdataset shard {h} does not exist (from {spec!r})")
        out.extend(hits)
    if not out:
        raise SourceError(f"{spec}: no tar shards matched")
    where: dict[str, str] = {}
    for t in out:
        real = os.path.realpath(t)
        if real in where:
            same = "" if where[real] == t else f" (as {where[real]!r} and {t!r})"
            raise SourceError(f"{spec}: shard {t} is listed twice{same}; its samples would be read twice: list each shard once")
        where[real] = t
    return out


def tar_member_skip(ti: tarfile.TarInfo) -> str | None:
    """Why a tar member that is not a regular file is skipped (counted), or None for a regular file or a folder
    entry (folder entries hold no data: ignored by rule). Webdataset reads regular files only."""
    if ti.isreg() or ti.isdir():
        return None
    if ti.issym() or ti.islnk():
        kind = "symbolic" if ti.issym() else "hard"
        return f"tar member {ti.name!r} is a {kind} link to {ti.linkname!r}: not read (links inside a tar are not followed)"
    return f"tar member {ti.name!r} is not a regular file (tar type {ti.type!r}): not read"


def no_image_reason(key: str, members: list[str], has_cls: bool) -> str:
    """The skip reason of a sample ``key`` without an image member; ``members``: its members' names.

    A member such as ``s7.a.jpg`` is read by webdataset as key ``s7``, extension ``a.jpg`` (the key ends at
    the first dot of the file name): the reason says so, as that is why no image was found."""
    dotted = [m for m in members if (ext := m[len(key) + 1:] if m.startswith(key + ".") else "")
              and "." in ext and ext.rsplit(".", 1)[-1].lower() in WDS_IMAGE_EXTS]
    if dotted:
        m = dotted[0]
        return (f"sample has no image member: webdataset reads {m!r} as key {key!r}, extension {m[len(key) + 1:]!r} "
                f"(the key ends at the first dot of the file name; image extensions: {', '.join(WDS_IMAGE_EXTS)}); "
                "rename the member without a dot in its key")
    return f"sample has no image member (one of {WDS_IMAGE_EXTS})" + (": an orphan label" if has_cls else "")


def _index_tar(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Samples of one tar (in member order): [{key, image (ext, offset, size), cls, members, error}], and the
    tar's problems outside samples as ``(kind, reason)``: ``unreadable`` (the tar breaks off), ``repeated`` (a
    member name given twice), ``link`` (a link or other non-file member)."""
    from webdataset.tariterators import base_plus_ext

    size = os.path.getsize(path)
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    errors: list[tuple[str, str]] = []
    names: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tf:
            while True:
                try:
                    ti = tf.next()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    errors.append(("unreadable", f"{path}: tar unreadable after {len(order)} samples ({type(e).__name__}: {e})"))
                    break
                if ti is None:
                    break
                if not ti.isreg():
                    why = tar_member_skip(ti)
                    if why and not os.path.basename(ti.name).startswith("__"):
                        errors.append(("link", why))
                    continue
                key, ext = base_plus_ext(ti.name)
                if key is None or os.path.basename(ti.name).startswith("__"):
                    continue
                if ti.name in names:  # webdataset itself refuses this; the first member of the name is used
                    errors.append(("repeated", f"repeated member name {ti.name!r} at byte {ti.offset}: skipped (the "
                                               "first member of that name is used; the tar itself is readable)"))
                    continue
                names.add(ti.name)
                if key not in samples:
                    samples[key] = {"key": key, "image": None, "cls": None, "members": [], "error": ""}
                    order.append(key)
                s = samples[key]
                s["members"].append(ti.name)
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
        if not any(k == "unreadable" for k, _ in errors) and _nonzero_after(path, end):
            errors.append(("unreadable", f"{path}: damaged tar header at byte {end} after {len(order)} samples; the rest "
                                         "of the shard is unreadable"))
    except tarfile.ReadError as e:
        errors.append(("unreadable", f"{path}: not a readable tar file ({e})"))
    return [samples[k] for k in order], errors


def tar_problem_items(stem: str, errors: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``[(pseudo-item id, reason)]`` of a tar's ``(kind, reason)`` problems: ids ``<stem>#<kind>-<j>``, ``j``
    counting within the kind (``unreadable``, ``repeated``, ``link``)."""
    counts: dict[str, int] = {}
    out = []
    for kind, e in errors:
        j = counts.get(kind, 0)
        counts[kind] = j + 1
        out.append((encode_id(f"{stem}#{kind}-{j}"), e))
    return out


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
    if not keys:  # not one sample in any tar (garbage named .tar, an empty tar): nothing to extract
        errs = [e for _, _, es in per_tar for _, e in es]
        raise SourceError(f"{spec}: the tar shards hold no samples" + (f" ({errs[0]})" if errs else ""))
    prefix = len(set(keys)) != len(keys)  # keys repeat across shards: qualify them with the shard name
    items: list[Item] = []
    tar_starts: list[int] = []
    has_cls = False
    for t, ss, errs in per_tar:
        tar_starts.append(len(items))
        stem = os.path.basename(t)
        for s in ss:
            sid = encode_id(f"{stem}/{s['key']}" if prefix else s["key"])
            err = s["error"]
            if s["image"] is None and not err:
                err = no_image_reason(s["key"], s["members"], s["cls"] is not None)
            img = s["image"] or ("", 0, 0)
            cls = s["cls"] or (-1, -1)
            has_cls |= s["cls"] is not None
            items.append(Item(id=sid, path=t, offset=img[1], size=img[2], cls_offset=cls[0], cls_size=cls[1], error=err))
        # a tar that breaks off (truncated header, garbage), a repeated member and a link member each become
        # one skipped pseudo-item <shard>#<kind>-<j>, in order
        for sid, e in tar_problem_items(stem, errs):
            items.append(Item(id=sid, path=t, error=e))
    if not items:
        raise SourceError(f"{spec}: the tar shards hold no samples")
    if has_cls:  # a labelled set: a sample without its label is a missing part, not an unlabelled image
        from dataclasses import replace

        items = [replace(it, error="sample has no cls member while the other samples have one (label unknown)")
                 if (it.offset >= 0 and it.size > 0 and it.cls_offset < 0 and not it.error) else it for it in items]
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        from collections import Counter

        twice = next(i for i, c in Counter(ids).items() if c > 1)
        tars_of = sorted({it.path for it in items if it.id == twice})
        raise SourceError(f"{spec}: id {twice!r} is given by two samples ("
                          + (f"tars {', '.join(tars_of)} share the file name {os.path.basename(tars_of[0])!r} and a key"
                             if len(tars_of) > 1 else f"in {tars_of[0]}") + "); ids must be unique")
    src = ImageSource("webdataset", spec, items, info={"shards": len(tars), "has_cls": has_cls})
    src.boundaries = tar_starts
    return src


# ----------------------------------------------------------------------------- entry point

STREAM_PREFIXES = ("pipe:", "http://", "https://")


def is_stream_spec(spec: str) -> bool:
    """Whether ``spec`` names a streaming webdataset source (a ``::`` part starting with ``pipe:``/``http(s)://``).

    Such a source is read by :func:`visae.wds_stream.open_stream`, not by :func:`open_source`."""
    return any(part.strip().startswith(STREAM_PREFIXES) for part in str(spec).split("::"))



def open_source(path: str | os.PathLike, kind: str = "auto", *, folder_labels: bool = False) -> ImageSource:
    """List the images of ``path`` as an :class:`ImageSource` (see module docstring for kinds).

    ``kind="auto"`` reads a folder as ``imagenet`` when every image has a wnid; when more than half do but
    some do not, it is read as a ``folder`` and a warning (logger ``visae.images``) says which and what to do.

    Raises:
        SourceError: an unknown kind, a stream spec (pipe:/http(s)), a missing or empty source, images without
            a wnid for ``kind="imagenet"``, ``folder_labels`` with a source that is not a folder, a tar shard
            listed twice, ids that repeat.
    """
    if kind not in SOURCE_KINDS:
        raise SourceError(f"source kind must be one of {SOURCE_KINDS}, got {kind!r}")
    spec = str(path)
    if is_stream_spec(spec):  # pipe: / http(s) URLs are opened by visae.wds_stream.open_stream (extract does)
        raise SourceError(f"{spec}: a pipe:/http(s) source is a webdataset stream with no item list; only `visae extract` "
                          "reads streams (visae.wds_stream.open_stream); give local files here")
    p = Path(spec)
    listing = None
    if kind == "auto":
        if p.is_dir() and (p / "world.json").is_file() and (p / "world.jsonl").is_file():
            kind = "toyworld"
        elif spec.endswith(".tar") or "{" in spec or "::" in spec or (p.is_dir() and any(p.glob("*.tar")) and not _list_images(p)):
            kind = "webdataset"
        elif p.is_dir():
            listing = _list_files(p.resolve())
            kind = "imagenet" if not folder_labels and _looks_imagenet(p.resolve(), listing) else "folder"
        elif not p.exists():
            raise SourceError(f"image source {spec} does not exist")
        else:
            raise SourceError(f"{spec}: expected a directory of images, a toy world directory or .tar shards")
    if folder_labels and kind != "folder":
        raise SourceError(f"{spec}: folder_labels (--folder_labels) applies to folder sources only; this is a {kind} source "
                          "(its labels come from " + {"imagenet": "the wnids", "webdataset": "the cls members",
                                                        "toyworld": "the world's label factor"}[kind] + ")")
    if kind == "webdataset":
        return _webdataset_source(spec)
    if not p.is_dir():
        raise SourceError(f"image source {spec} is not a directory (kind {kind!r})")
    root = p.resolve()
    if kind == "toyworld":
        return _toyworld_source(root)
    if kind == "imagenet":
        return _imagenet_source(root, listing)
    return _folder_source(root, folder_labels, listing)


def rank_bounds(source: ImageSource, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice [lo, hi) of the source's items for ``rank``.

    Slices of ranks 0..world_size-1 concatenated give every item once, in order (so merged
    rank outputs equal a one-process run). They are cut only at ``source.boundaries`` (tar
    shard starts for webdataset: each rank reads its own files), balanced by item count.
    """
    if getattr(source, "streaming", False):  # a stream has no item list: ranks take contiguous runs of URLs
        n = len(source.urls)
        return (n * rank) // world_size, (n * (rank + 1)) // world_size
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
