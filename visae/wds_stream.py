"""Streaming webdataset sources: ``pipe:`` commands and http(s) URLs, read in order, resumable by sample count.

A source string is a stream when one of its ``::``-joined parts starts with ``pipe:``, ``http://`` or
``https://`` (:func:`is_stream_spec`); brace ranges and lists are expanded as webdataset does
(``http://host/shard-{000..099}.tar``, ``pipe:cat /data/shard-{000..003}.tar``). Local tar paths, brace
patterns and globs without such a part stay with the indexed reader of :mod:`visae.images` (random access).

Reading uses the ``webdataset`` library: ``webdataset.gopen.gopen`` opens each URL (``curl`` for http(s),
a shell for ``pipe:``) and :func:`_tar_members` walks the tar stream (as
``webdataset.tariterators.tar_file_iterator`` does, but counting link members as skips instead of passing
over them). Members are grouped into samples by key as webdataset does (consecutive members of one key);
a sample is one item: its image member (one of :data:`visae.images.WDS_IMAGE_EXTS`), its label from an
optional ``cls`` member (:func:`visae.images.parse_cls`), id = :func:`visae.images.encode_id` of the key.
A tar that breaks off while its transport succeeded becomes one skipped pseudo-item
``<shard>#unreadable-<j>`` after its samples, as for local tars (a repeated member name or key:
``<shard>#repeated-<j>``; a link member: ``<shard>#link-<j>``); a transport failure (curl/pipe exit status,
connection lost) stops the run with a :class:`~visae.images.SourceError` naming the URL, committed rows kept.

**Validation** (:func:`open_stream`, before anything is written): the brace expansion (a malformed or
unbalanced range is an error), the URL schemes, then a probe of the bytes: every http(s) URL is asked
for its first 512 bytes (a ``Range`` GET: connection refused, a timeout, HTTP 4xx/5xx and bytes that are
not a tar header are errors naming the URL), and the first and last ``pipe:`` commands are run until
their first 512 bytes (a failing command is an error with its exit status and stderr).

**Resumption by sample count.** Items are numbered in stream order from 0 within a rank's part (every
sample and pseudo-item counts, skipped or not). The extractor appends to ``OUT/stream_progress.jsonl``
(one JSON object a line, fsync'd before the rows concerned reach the shard writer):

- ``{"url": k, "item": i}``: URL ``k`` (index into the expanded list) starts at item ``i``;
- ``{"row": r, "id": ..., "item": i, "next": n, "done": d, "batch": a, "rows_before": b, "B": B}``: row
  ``r`` is the last row of a shard (``r + 1`` a multiple of ``--shard_size``); it belongs to item ``i``;
  the first item not wholly written after it is ``n`` (``d`` of its patch rows written); it was computed
  in a batch of size ``B`` starting at item ``a`` with ``b`` rows before it;
- ``{"end": n}``: the stream ended after ``n`` items.

A rerun reads the committed row count ``R`` from the shard set, takes the record of row ``R - 1``
(checking its id against the last committed id), and restarts at item ``a`` (same batch size: the
batch the commit cut is recomputed whole and its ``R - b`` committed rows dropped, so the shards are
byte-identical to an uninterrupted run) or at item ``n`` (another batch size). URLs before the one that
holds that item are not opened at all; in that URL the items before it are read from the stream but
not decoded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from visae.images import (STREAM_PREFIXES, WDS_IMAGE_EXTS, Item, SourceError, as_browser_rgb, encode_id, is_stream_spec,
                           no_image_reason, parse_cls, tar_member_skip, tar_problem_items)

__all__ = ["STREAM_PREFIXES", "PROGRESS", "StreamSource", "is_stream_spec", "expand_stream_urls", "open_stream",
           "StreamPlan", "plan_stream_part", "StreamBatches", "read_progress"]

PROGRESS = "stream_progress.jsonl"
PROBE_BYTES = 512  # one tar header block
PROBE_TIMEOUT_S = 15.0  # an http(s) shard's first bytes
PIPE_PROBE_TIMEOUT_S = 60.0  # a pipe: command's first bytes (it may have to start a cloud client)
_OTHER_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):", re.I)


# ----------------------------------------------------------------------------- recognising and validating


def _shard_name(url: str, k: int) -> str:
    """A short name for URL ``k`` (its file name) used in pseudo-item ids and messages."""
    if url.startswith("pipe:"):
        toks = [t for t in url[5:].split() if ".tar" in t]
        return os.path.basename(toks[-1].strip("'\"")) if toks else f"shard{k}"
    from urllib.parse import urlparse

    return os.path.basename(urlparse(url).path) or f"shard{k}"


def expand_stream_urls(spec: str) -> list[str]:
    """Expand ``spec`` (``::`` lists, ``{000..099}`` ranges, ``{a,b}`` lists) into URLs, as webdataset does.

    Raises:
        SourceError: unbalanced braces, a brace range left unexpanded (``{000..}``, ``{a..9}``), an empty
            ``pipe:`` command, a scheme other than ``pipe:``, ``http(s)://``, ``file:`` / a local path, or a URL
            listed twice (its samples would be read twice).
    """
    from webdataset.shardlists import expand_urls

    try:
        urls = [u.strip() for u in expand_urls(str(spec)) if u.strip()]
    except Exception as e:  # noqa: BLE001 - braceexpand raises its own error types
        raise SourceError(f"{spec}: malformed brace pattern ({e}); expected ranges like "
                          "'shard-{000..099}.tar' or lists like '{a,b}'") from None
    if not urls:
        raise SourceError(f"{spec!r}: no URLs; expected e.g. 'http://host/shard-{{000..009}}.tar' or 'pipe:cat shard-{{0..3}}.tar'")
    for u in urls:
        if re.search(r"\{[^{}]*\.\.[^{}]*\}", u) or u.count("{") != u.count("}"):
            raise SourceError(f"{u}: brace range left unexpanded (from {spec!r}); expected a range of two numbers "
                              "or letters of the same kind, like {000..099}")
        if u.startswith("pipe:"):
            if not u[5:].strip():
                raise SourceError(f"{spec!r}: empty pipe: command; expected e.g. 'pipe:cat /data/shard-000.tar'")
            continue
        if u.startswith(("http://", "https://", "file:")):
            continue
        m = _OTHER_SCHEME.match(u)
        if m and len(m.group(1)) > 1:  # (a one-letter "scheme" is a Windows drive)
            raise SourceError(f"{u}: scheme {m.group(1)!r} is not read directly; supported: http://, https://, pipe:, "
                              f"local paths (e.g. 'pipe:aws s3 cp {u} -' or 'pipe:gsutil cat {u}')")
    seen: set[str] = set()
    for u in urls:
        if u in seen:
            raise SourceError(f"{spec!r}: shard {u} is listed twice; its samples would be read twice: list each shard once")
        seen.add(u)
    return urls


def _check_tar_head(url: str, head: bytes) -> None:
    """The first bytes of a shard must start a tar (or a gzip-compressed tar, which webdataset reads too)."""
    if head[:2] == b"\x1f\x8b":
        return
    if len(head) < PROBE_BYTES:
        if not head:
            raise SourceError(f"{url}: empty (0 bytes); expected a webdataset .tar shard")
        raise SourceError(f"{url}: only {len(head)} bytes; expected a webdataset .tar shard (a tar header is 512 bytes)")
    if head.count(0) == len(head):
        return  # an empty tar (end-of-archive block)
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        raise SourceError(f"{url}: does not start with a tar header (first bytes {head[:16]!r}); expected a webdataset "
                          ".tar shard") from None


def _probe_http(url: str) -> None:
    req = urllib.request.Request(url, headers={"Range": f"bytes=0-{PROBE_BYTES - 1}", "User-Agent": "visae"})
    try:
        with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S) as r:
            head = r.read(PROBE_BYTES)
    except urllib.error.HTTPError as e:
        raise SourceError(f"{url}: HTTP {e.code} {e.reason}; expected a webdataset .tar shard at this URL") from None
    except urllib.error.URLError as e:
        why = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else e.reason
        raise SourceError(f"{url}: cannot be reached ({why}); expected an HTTP(S) server serving webdataset .tar shards") from None
    except (TimeoutError, OSError) as e:
        raise SourceError(f"{url}: no answer within {PROBE_TIMEOUT_S:.0f} s ({type(e).__name__}: {e}); expected an HTTP(S) "
                          "server serving webdataset .tar shards") from None
    _check_tar_head(url, head)


def _probe_pipe(url: str) -> None:
    cmd = url[5:]
    p = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # noqa: S602
    hung = threading.Event()

    def stop_hung() -> None:
        hung.set()
        with contextlib.suppress(OSError):
            os.killpg(p.pid, 9)

    timer = threading.Timer(PIPE_PROBE_TIMEOUT_S, stop_hung)
    timer.start()
    try:
        try:
            head = p.stdout.read(PROBE_BYTES) if p.stdout else b""
        finally:
            timer.cancel()
        if hung.is_set():
            raise SourceError(f"{url}: the command wrote no tar header within {PIPE_PROBE_TIMEOUT_S:.0f} s (stopped); expected "
                              "a command writing a webdataset .tar shard to stdout")
        if len(head) < PROBE_BYTES:  # the command ended early: its status and stderr say why
            try:
                rc = p.wait(timeout=PROBE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = None
            err = (p.stderr.read() if p.stderr and rc is not None else b"").decode("utf-8", "replace").strip()
            if rc not in (None, 0, 141):
                raise SourceError(f"{url}: the command failed (exit status {rc}" + (f": {err.splitlines()[-1]}" if err else "")
                                  + "); expected a command writing a webdataset .tar shard to stdout")
    finally:
        if p.poll() is None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                os.killpg(p.pid, 15)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p.wait(timeout=5)
        for f in (p.stdout, p.stderr):
            if f:
                f.close()
    _check_tar_head(url, head)


def _probe_file(url: str) -> None:
    path = re.sub(r"^file://?", "/", url) if url.startswith("file:") else url
    if not os.path.isfile(path):
        raise SourceError(f"{url}: no such file; expected a webdataset .tar shard")
    with open(path, "rb") as f:
        _check_tar_head(url, f.read(PROBE_BYTES))


def probe_urls(urls: list[str], threads: int = 8) -> None:
    """Check that the shards can be read (see the module docstring); raises the first :class:`SourceError` in URL order."""
    todo: list[tuple[str, Callable[[str], None]]] = []
    pipes = [u for u in urls if u.startswith("pipe:")]
    for u in dict.fromkeys(pipes[:1] + pipes[-1:]):
        todo.append((u, _probe_pipe))
    for u in urls:
        if u.startswith(("http://", "https://")):
            todo.append((u, _probe_http))
        elif not u.startswith("pipe:"):
            todo.append((u, _probe_file))
    if any(u.startswith(("http://", "https://")) for u in urls) and shutil.which("curl") is None:
        raise SourceError(f"{urls[0]}: streaming http(s) shards needs the 'curl' command (webdataset reads URLs with it); "
                          "install curl or use pipe: with another downloader")
    order = {u: i for i, u in enumerate(urls)}
    errors: list[tuple[int, SourceError]] = []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as ex:
        futs = [(u, ex.submit(fn, u)) for u, fn in todo]
        for u, f in futs:
            try:
                f.result()
            except SourceError as e:
                errors.append((order[u], e))
    if errors:
        raise min(errors, key=lambda t: t[0])[1]


# ----------------------------------------------------------------------------- the source


@dataclass
class StreamSource:
    """A streaming webdataset source: ``urls`` read in order; no item list (and no length) up front.

    Has the fields the extractor reads from :class:`visae.images.ImageSource` (``kind``, ``root``,
    ``label_names``, ``columns``, ``info``, ``describe()``) plus ``urls``, ``limit`` (stop after that
    many items) and ``streaming = True``.
    """

    root: str
    urls: list[str]
    kind: str = "webdataset"
    label_names: dict[str, list[str]] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    boundaries: list[int] | None = None
    streaming: bool = True

    def describe(self) -> dict[str, Any]:
        """What goes into the shard manifest's ``source.dataset_info`` (the item count is unknown up front)."""
        return {"kind": self.kind, "path": self.root, "num_items": None, "streaming": True, **self.info}


def open_stream(spec: str, *, probe: bool = True) -> StreamSource:
    """Expand and validate a streaming source (see the module docstring); nothing is written.

    Raises:
        SourceError: a malformed brace range, an unsupported scheme, an unreachable URL, an HTTP error,
            a failing ``pipe:`` command, or bytes that are not a tar.
    """
    urls = expand_stream_urls(spec)
    if probe:
        probe_urls(urls)
    transports = sorted({"pipe" if u.startswith("pipe:") else "http" if u.startswith(("http://", "https://")) else "file"
                         for u in urls})
    return StreamSource(root=str(spec), urls=urls, info={"shards": len(urls), "transport": "+".join(transports)})


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class RawItem:
    """One item of the stream before decoding: ``n`` is its index in the part, ``url`` its URL's index."""

    n: int
    url: int
    j: int  # index of the item in its URL
    id: str
    image: bytes | None = None
    cls: bytes | None = None
    error: str = ""


def _url_items(url: str, k: int, on_open: Callable[[Any], None] | None = None) -> Iterator[tuple[str, bytes | None, bytes | None, str]]:
    """(id, image bytes, cls bytes, error) of the samples of one shard, in stream order, then its pseudo-items.

    Raises:
        SourceError: the transport failed (the URL cannot be opened, curl / the pipe command exited with an error).
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext

    stem = _shard_name(url, k)
    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"{url}: cannot be opened ({type(e).__name__}: {e})") from None
    if on_open is not None:
        on_open(stream)
    errors: list[tuple[str, str]] = []
    seen_names: set[str] = set()
    seen_keys: set[str] = set()
    cur: dict[str, Any] | None = None

    def finish(s: dict[str, Any] | None) -> tuple[str, bytes | None, bytes | None, str] | None:
        if s is None:
            return None
        err = s["error"]
        if s["image"] is None and not err:
            err = no_image_reason(s["key"], s["members"], s["cls"] is not None)
        return encode_id(s["key"]), s["image"], s["cls"], err

    try:
        try:
            for f in _tar_members(stream):
                if f["skip"]:  # a link or other non-file member: counted, as for local tars
                    if not os.path.basename(f["fname"]).startswith("__"):
                        errors.append(("link", f["skip"]))
                    continue
                key, ext = base_plus_ext(f["fname"])
                if key is None or os.path.basename(f["fname"]).startswith("__"):
                    continue
                if f["fname"] in seen_names:
                    errors.append(("repeated", f"repeated member name {f['fname']!r}: skipped (the first member of that "
                                               "name is used; the tar itself is readable)"))
                    continue
                seen_names.add(f["fname"])
                if cur is None or key != cur["key"]:
                    done = finish(cur)
                    if done:
                        yield done
                    if key in seen_keys:
                        errors.append(("repeated", f"member {f['fname']!r}: sample key {key!r} appears again after other "
                                                   "samples (members of a sample must be consecutive in a streamed tar): "
                                                   "skipped; the tar itself is readable"))
                        cur = None
                        continue
                    seen_keys.add(key)
                    cur = {"key": key, "image": None, "cls": None, "members": [], "error": ""}
                cur["members"].append(f["fname"])
                ext = ext.lower()
                if ext in WDS_IMAGE_EXTS and cur["image"] is None:
                    cur["image"] = f["data"]
                elif ext == "cls":
                    cur["cls"] = f["data"]
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            # the transport's status decides: a failed download/command stops the run, a damaged tar is a skip
            try:
                _drain(stream)
                stream.close()
            except Exception as ce:  # noqa: BLE001
                raise SourceError(f"{url}: reading failed ({type(ce).__name__}: {ce}); the rows committed so far are "
                                  "kept: rerun the same command to continue") from None
            errors.append(("unreadable", f"{stem}: tar stream unreadable after {len(seen_keys)} samples ({type(e).__name__}: {e})"))
            if cur is not None:
                cur["error"] = cur["error"] or f"tar stream broke off inside this sample ({type(e).__name__})"
        done = finish(cur)
        if done:
            yield done
        try:
            _drain(stream)  # the tar's end padding: a writer stopped by a closed pipe would look like a failure
            stream.close()
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{url}: reading failed ({type(e).__name__}: {e}); the rows committed so far are kept: "
                              "rerun the same command to continue") from None
        for sid, e in tar_problem_items(stem, errors):
            yield sid, None, None, e
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001, S110 - already reported above, or the consumer stopped early
            pass


def _tar_members(fileobj: Any) -> Iterator[dict[str, Any]]:
    """The members of a tar stream in order, as webdataset's ``tar_file_iterator`` reads them (regular files:
    ``{"fname", "data", "skip": ""}``), plus its links and other non-file members (``data`` None, ``skip`` the
    reason: :func:`visae.images.tar_member_skip`), which webdataset passes over silently; folder entries are
    ignored. Raises what ``tarfile`` raises for a damaged stream."""
    stream = tarfile.open(fileobj=fileobj, mode="r|*")
    for ti in stream:
        if ti.isreg():
            f = stream.extractfile(ti)
            yield {"fname": ti.name, "data": f.read() if f is not None else b"", "skip": ""}
        else:
            why = tar_member_skip(ti)
            if why:
                yield {"fname": ti.name, "data": None, "skip": why}
        stream.members = []


def _drain(stream: Any) -> None:
    while stream.read(1 << 16):
        pass


def decode_raw(raw: RawItem, preprocess: Callable[[Any], Any]) -> tuple[np.ndarray | None, int, str]:
    """Decode and preprocess one item -> (``[3, H, W]`` float32 pixels or None, label (-1 unknown), error or "").

    Same rules as :func:`visae.images.load_image` (the decoding policy, ``cls`` parsed as an int); never raises.
    """
    from PIL import Image

    if raw.error:
        return None, -1, raw.error
    label = -1
    try:
        if raw.cls is not None:
            label = parse_cls(raw.cls)
        with Image.open(io.BytesIO(raw.image or b"")) as im:
            img = as_browser_rgb(im)
    except Exception as e:  # noqa: BLE001 - any decode failure means: skip this image
        return None, label, f"{type(e).__name__}: {e}"
    try:
        x = preprocess(img)
    except Exception as e:  # noqa: BLE001
        return None, label, f"preprocess failed: {type(e).__name__}: {e}"
    return np.asarray(x, dtype=np.float32), label, ""


_WORKER_PREPROCESS: Any = None


def _worker_init(preprocess: Any) -> None:
    global _WORKER_PREPROCESS
    import torch

    torch.set_num_threads(1)
    _WORKER_PREPROCESS = preprocess


def _worker_decode(raws: list[RawItem]) -> list[tuple[np.ndarray | None, int, str]]:
    return [decode_raw(r, _WORKER_PREPROCESS) for r in raws]


# ----------------------------------------------------------------------------- progress file and resume


def read_progress(directory: str | Path) -> list[dict[str, Any]]:
    """The records of ``stream_progress.jsonl`` (a line cut off by a kill is ignored)."""
    f = Path(directory) / PROGRESS
    out = []
    if f.is_file():
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _append(directory: Path, recs: list[dict[str, Any]]) -> None:
    from visae.atomic import append_lines

    append_lines(directory / PROGRESS, [json.dumps(r, ensure_ascii=True) + "\n" for r in recs])


@dataclass(frozen=True)
class StreamPlan:
    """Where a (re)run of one part starts: URL index ``url`` (into the full list), ``skip`` items of it read but
    not decoded, first item ``first`` (part numbering), ``rows_before`` rows before item ``first``, and for each
    shard writer the rows of the run's first batches it already holds (``drops``; None: the writer is complete)."""

    url: int
    skip: int
    first: int
    rows_before: int
    drops: tuple[int | None, ...]


def _last_id(writer: Any) -> str:
    from visae.shards import ShardSet

    ss = ShardSet(writer.dir, require_complete=False)
    return str(ss.shard_meta(ss.num_shards - 1)["id"][-1])


def plan_stream_part(part_dir: Path, lo: int, writers: list[Any], batch_size: int) -> StreamPlan:
    """The resume point of a part from its writers' commit points (one writer per layer; all write the same rows).

    The writer furthest behind decides: with the batch size of the killed run, the batch its last commit cut
    is recomputed whole (identical batches, identical bytes); with another batch size the run starts at the
    first item not wholly written. ``lo``: the part's first URL (used when nothing is committed).

    Raises:
        visae.shards.ShardError: rows are committed but ``stream_progress.jsonl`` has no record of a writer's
            last committed row, or its id differs (the output belongs to another input or the file was edited).
    """
    from visae.shards import ShardError

    active = [w for w in writers if not w.complete]
    if not active:
        return StreamPlan(lo, 0, 0, 0, tuple(None for _ in writers))
    behind = min(active, key=lambda w: w.num_written)
    committed = behind.num_written
    if committed == 0:
        first, rows_before = 0, 0
        item0, url = 0, lo
    else:
        recs = read_progress(part_dir)
        rows = [r for r in recs if r.get("row") == committed - 1]
        if not rows:
            raise ShardError(f"{part_dir / PROGRESS}: no record of row {committed - 1}, the last committed row of {behind.dir}; "
                             "a streamed extraction resumes from it (use --overwrite to start over)")
        rec = rows[-1]
        last = _last_id(behind)
        if rec.get("id") != last:
            raise ShardError(f"{part_dir / PROGRESS}: row {committed - 1} is {rec.get('id')!r} there but {last!r} in "
                             f"{behind.dir}; the output belongs to another input (use --overwrite)")
        if rec.get("B") == batch_size:  # recompute the batch the commit cut, whole: identical batches, identical bytes
            first, rows_before = int(rec["batch"]), int(rec["rows_before"])
        else:
            first, rows_before = int(rec["next"]), committed - int(rec["done"])
        starts = [(int(r["item"]), int(r["url"])) for r in recs if "url" in r and "item" in r and int(r["item"]) <= first]
        if not starts:
            raise ShardError(f"{part_dir / PROGRESS}: no record of the shard holding item {first} (use --overwrite)")
        item0, url = max(starts)
    drops = tuple(None if w.complete else w.num_written - rows_before for w in writers)
    return StreamPlan(url, first - item0, first, rows_before, drops)


def stream_total(part_dir: Path) -> int | None:
    """Items the part's stream held, once it was read to the end (``{"end": n}``), else None."""
    ends = [int(r["end"]) for r in read_progress(part_dir) if "end" in r]
    return ends[-1] if ends else None


class _Window:
    """``todo[p]`` for the batch being processed: the extractor looks items up by position."""

    def __init__(self) -> None:
        self.items: dict[int, Item] = {}

    def __getitem__(self, p: int) -> Item:
        return self.items[p]


class StreamBatches:
    """Batches of a streamed part in the extractor's format (``pos``, ``labels``, ``errors``, ``ok``, ``pixels``).

    A reader thread streams URLs ``plan.url .. hi - 1`` (skipping ``plan.skip`` items of the first without
    decoding them) and cuts batches of ``batch_size`` items; ``num_workers`` processes (forked when this
    object is made, before any other thread of the run) decode them, at most ``2 * num_workers + 2`` batches
    ahead; batches come out in stream order. ``pos`` counts from the plan's first item. Before a batch is
    handed out, the progress records of its URL starts and shard-end rows are written to ``part_dir``.
    """

    def __init__(self, src: StreamSource, part_dir: Path, plan: StreamPlan, hi: int, *, batch_size: int,
                 preprocess: Any, num_workers: int, patch_rows: int | None, shard_size: int, limit: int | None = None):
        self.src, self.dir, self.plan, self.hi = src, Path(part_dir), plan, hi
        self.B, self.P, self.S = batch_size, patch_rows or 1, shard_size
        self.patch = patch_rows is not None
        self.preprocess, self.limit = preprocess, limit
        self.todo = _Window()
        self.n_read = plan.first  # items of the part handed out so far (part numbering)
        self.rows = plan.rows_before  # rows produced before the next batch
        self._stop = threading.Event()
        self._q: queue.Queue = queue.Queue(maxsize=2 * max(num_workers, 1) + 2)
        self._pool = None
        if num_workers > 0:
            import multiprocessing as mp

            self._pool = mp.get_context("fork").Pool(num_workers, initializer=_worker_init, initargs=(preprocess,))
        self._thread = threading.Thread(target=self._read, daemon=True, name="visae-wds-stream")
        self._started = False
        self._opened: list[Any] = []  # the stream the reader has open (close() stops its process)

    # -- the reader thread
    def _raw(self) -> Iterator[RawItem]:
        n = self.plan.first - self.plan.skip  # part number of the first item of URL plan.url
        for k in range(self.plan.url, self.hi):
            skip = self.plan.skip if k == self.plan.url else 0
            for j, (sid, image, cls, err) in enumerate(_url_items(self.src.urls[k], k, self._on_open)):
                if self._stop.is_set():
                    return
                if self.limit is not None and n >= self.limit:
                    return
                if j >= skip:  # the items before the resume point are read from the stream, never decoded
                    yield RawItem(n, k, j, sid, image, cls, err)
                n += 1

    def _on_open(self, stream: Any) -> None:
        self._opened = [stream]

    def _put(self, x: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(x, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            batch: list[RawItem] = []
            for r in self._raw():
                batch.append(r)
                if len(batch) == self.B:
                    if not self._submit(batch):
                        return
                    batch = []
            if batch and not self._submit(batch):
                return
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(("error", e))

    def _submit(self, batch: list[RawItem]) -> bool:
        fut = self._pool.apply_async(_worker_decode, (batch,)) if self._pool is not None else None
        return self._put(("batch", (batch, fut)))

    # -- the consumer
    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        if not self._started:
            self._thread.start()
            self._started = True
        while True:
            kind, val = self._q.get()
            if kind == "error":
                raise val
            if kind == "end":
                _append(self.dir, [{"end": self.n_read}])
                return
            raws, fut = val
            dec = fut.get() if fut is not None else [decode_raw(r, self.preprocess) for r in raws]
            pos = [r.n - self.plan.first for r in raws]
            ok = [d[0] is not None for d in dec]
            self.todo.items = {p: Item(id=r.id, path=self.src.urls[r.url], label=d[1]) for p, r, d in zip(pos, raws, dec)}
            self._record(raws, ok)
            self.n_read = raws[-1].n + 1
            good = [torch.from_numpy(d[0]) for d in dec if d[0] is not None]
            yield {"pos": pos, "labels": [d[1] for d in dec], "errors": [d[2] for d in dec], "ok": ok,
                   "pixels": torch.stack(good) if good else None}

    def _record(self, raws: list[RawItem], ok: list[bool]) -> None:
        recs: list[dict[str, Any]] = []
        recs += [{"url": r.url, "item": r.n} for r in raws if r.j == 0]
        good = [r for r, o in zip(raws, ok) if o]
        lo, hi = self.rows, self.rows + len(good) * self.P
        first_end = ((lo // self.S) + 1) * self.S - 1
        for row in range(first_end, hi, self.S):
            k, j = divmod(row - lo, self.P)
            it = good[k]
            whole = not self.patch or j == self.P - 1
            recs.append({"row": row, "id": f"{it.id}#p{j}" if self.patch else it.id, "item": it.n,
                         "next": it.n + 1 if whole else it.n, "done": 0 if whole else j + 1,
                         "batch": raws[0].n, "rows_before": lo, "B": self.B})
        _append(self.dir, recs)
        self.rows = hi

    def close(self) -> None:
        """Stop the reader thread and the decoding processes (after a normal end or an error)."""
        self._stop.set()
        for st in self._opened:  # a reader blocked on a slow download or command: end its process, the read returns
            proc = getattr(st, "proc", None)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
        if self._started:
            self._thread.join(timeout=30)
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
