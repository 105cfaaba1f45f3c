"""From shard ids back to images, and thumbnails for the site.

The extractor stores each example's id and records where the images came from in the shard
manifest's ``source``: ``dataset`` (root folder, tar spec or toy-world directory) and
``dataset_kind`` (``folder`` / ``imagenet``: ids are paths relative to the root; ``toyworld``:
ids are listed in ``world.jsonl``; ``webdataset``: ids are sample keys inside tars). Patch rows
(``<id>#p<j>``) resolve to their image. An id that resolves to nothing (images moved, or a
shard set made elsewhere) gives no thumbnail; the page then shows the id instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from visae.atomic import atomic_path

log = logging.getLogger(__name__)

_PATCH = re.compile(r"#p\d+$")


def image_id(example_id: str) -> str:
    """Strip a patch suffix: ``"a/b.jpg#p12"`` -> ``"a/b.jpg"``."""
    return _PATCH.sub("", str(example_id))


def thumb_name(example_id: str) -> str:
    return hashlib.sha1(image_id(example_id).encode()).hexdigest()[:20] + ".jpg"


class ImageResolver:
    """Opens the image behind a shard id (``open(id) -> PIL.Image | None``), per the manifest source."""

    def __init__(self, source: dict[str, Any] | None, images_root: str | None = None):
        source = source or {}
        self.kind = source.get("dataset_kind") or (source.get("dataset_info") or {}).get("kind")
        root = images_root or source.get("images_root") or source.get("dataset")
        self.root = str(root) if root else None
        self._items: dict[str, Any] | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def _index(self) -> dict[str, Any]:
        # Thumbnail threads call this concurrently: build the index once, under a lock, and publish it whole.
        with self._lock:
            if self._items is None:
                items: dict[str, Any] = {}
                if self.root and self.kind in ("toyworld", "webdataset"):
                    try:
                        from visae.images import open_source

                        items = {it.id: it for it in open_source(self.root, self.kind).items}
                    except Exception as e:  # noqa: BLE001 - images unavailable: the site shows ids instead
                        self._error = f"{type(e).__name__}: {e}"
                        log.warning("cannot list the images of %s (%s); concept pages will show ids", self.root, self._error)
                self._items = items
            return self._items

    def path_of(self, example_id: str) -> str | None:
        """A file path for folder-like sources (None when unknown or missing)."""
        from visae.images import decode_id

        name = decode_id(image_id(example_id))  # ids of names that are not UTF-8 are escaped (shard format, "Ids")
        cands = []
        if self.root and self.kind not in ("webdataset",):
            cands.append(os.path.join(self.root, name))
        if os.path.isabs(name):
            cands.append(name)
        for c in cands:
            if os.path.isfile(c):
                return c
        return None

    def open(self, example_id: str) -> Image.Image | None:
        iid = image_id(example_id)
        if self.kind in ("toyworld", "webdataset"):
            item = self._index().get(iid)
            if item is not None:
                from visae.images import load_image

                img, _, err = load_image(item)
                return img
        p = self.path_of(iid)
        if p is None:
            return None
        from visae.images import Item, load_image

        img, _, err = load_image(Item(id=iid, path=p))  # the extractor's decoding policy: same picture as the model saw
        return img


def make_thumbnails(resolver: ImageResolver, ids: Iterable[str], out_dir: Path, size: int = 160,
                    workers: int = 0, progress: bool = True) -> dict[str, str | None]:
    """Write a JPEG thumbnail (longest side ``size``) per distinct image; returns {id: file name or None}.

    Existing thumbnails are kept (a rerun only makes the missing ones).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    uniq = list(dict.fromkeys(image_id(i) for i in ids))

    def one(iid: str) -> tuple[str, str | None]:
        name = thumb_name(iid)
        dst = out_dir / name
        if dst.is_file():
            return iid, name
        img = resolver.open(iid)
        if img is None:
            return iid, None
        img.thumbnail((size, size), Image.Resampling.LANCZOS if img.width > size or img.height > size else Image.Resampling.NEAREST)
        if max(img.size) < size:  # tiny images (the toy world's 64 px) are upscaled crisply
            scale = size / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.NEAREST)
        with atomic_path(dst, fsync=False) as tmp:  # thumbnails are regenerated from the images at will
            img.save(tmp, format="JPEG", quality=85)
        return iid, name

    n_workers = workers or min(8, os.cpu_count() or 1)
    result: dict[str, str | None] = {}
    it: Iterable[tuple[str, str | None]]
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        it = pool.map(one, uniq)
        if progress and uniq:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(uniq), desc="thumbnails", unit="img", leave=False)
        for iid, name in it:
            result[iid] = name
    return result
