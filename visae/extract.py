"""Feature extraction: run a vision model over an image collection into a shard set.

    python scripts/extract_features.py --model ViT-B-32 --pretrained laion2b_s34b_b79k \\
        --images /data/imagenet/train --out runs/in1k_b32 [--layer 8 --token mean]
    torchrun --nproc_per_node 8 scripts/extract_features.py ...   # same command, N processes

Python: ``extract(ExtractConfig(...)) -> ShardSet``. Format and options: docs/extraction.md.

What is read: by default the final image embedding after the projection (the CLIP space
where zero-shot classification and naming happen); with ``layer=L`` the residual stream
after block L (0-based, -1 = last) at the class token (``cls``), the mean of the patch
tokens (``mean``) or every patch token (``patch``: one row per patch, ids ``<id>#p<j>``).

Resumption: the input order is deterministic (sorted), rows are committed shard by shard,
and a rerun of the same command finds the last committed id and continues right after it
(mid-image for patch rows), so nothing is lost or duplicated. Undecodable images are
skipped, counted and listed in ``skipped.jsonl`` (one JSON object ``{"id", "reason"}`` a line).

Multi-process (torchrun): rank k takes a contiguous slice of the items (whole tar files for
webdataset sources), writes ``out/rank_k/``; after a barrier rank 0 merges the parts in rank
order, so the result holds exactly the rows of a one-process run, in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from visae.atomic import atomic_write_text, output_lock
from visae.config import ConfigError, config_to_dict, parse_config
from visae.resources import config_yaml
from visae.shards import MANIFEST, ShardError, ShardSet, ShardWriter, merge_shard_sets

log = logging.getLogger(__name__)

DEFAULT_YAML = config_yaml("extract.yaml")
SKIPPED = "skipped.jsonl"
REPORT = "extract_report.json"
PART = "part.json"

__all__ = ["ExtractConfig", "extract", "main", "read_skipped"]


@dataclass(frozen=True)
class ExtractConfig:
    """Run a vision model over images and write a shard set of its activations."""

    images: str = field(default="", metadata={"help": "image source: a folder (recursive), an ImageNet-layout folder, "
                                                        "webdataset tars (file, brace pattern, glob or directory) or a toy-world directory"})
    source: Literal["auto", "folder", "imagenet", "webdataset", "toyworld"] = field(
        default="auto", metadata={"help": "kind of image source; auto detects it"})
    folder_labels: bool = field(default=False, metadata={"help": "folder source: label = first-level sub-folder (sorted class names)"})
    out: str = field(default="runs/features", metadata={"help": "output shard-set directory (rerun the same command to resume)"})
    model: str = field(default="ViT-B-32:laion2b_s34b_b79k", metadata={"help": "backbone: open_clip name with tag (ViT-B-32:laion2b_s34b_b79k), "
                                                                               "timm:<name>, visae-toyclip (see docs/extraction.md)"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "pretrained tag or local checkpoint file, when not in --model "
                                                                       "(with random_init: only picks the tag's preprocessing)"})
    random_init: bool = field(default=False, metadata={"help": "random weights (seeded): for tests and throughput benchmarks"})
    seed: int = field(default=0, metadata={"help": "seed of the random initialisation"})
    layer: Optional[int] = field(default=None, metadata={"help": "read the residual stream after this block (0-based, -1 = last); "
                                                                  "unset = the final image embedding"})
    token: Literal["cls", "patch", "mean"] = field(default="cls", metadata={"help": "with --layer: class token, every patch token, or mean of patch tokens"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass"})
    num_workers: int = field(default=-1, metadata={"help": "DataLoader worker processes decoding images (0 = in the main process, "
                                                            "-1 = auto: 1 on CPU, min(8, cpus per rank - 1) on GPU)"})
    threads: int = field(default=0, metadata={"help": "torch threads of the main process (0 = torch's default, all cores; "
                                                       "on a CPU shared with other jobs 1 can be much faster, see BENCHMARKS.md)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1 or auto (the rank's GPU if any)"})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={"help": "autocast dtype; auto = bf16 on GPU (fp16 if unsupported), fp32 on CPU"})
    channels_last: Literal["auto", "true", "false"] = field(default="auto", metadata={"help": "channels-last images and conv weights (auto: on GPU)"})
    dtype: Literal["float16", "float32"] = field(default="float16", metadata={"help": "storage dtype of the shards"})
    shard_size: int = field(default=65536, metadata={"help": "rows per shard"})
    limit: Optional[int] = field(default=None, metadata={"help": "only the first N images of the (sorted) source"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing output instead of resuming it"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (images/s)"})


class _SimulatedKill(RuntimeError):
    """Raised by the test hook ``_fail_after_batches`` to interrupt a run."""


# ----------------------------------------------------------------------------- helpers


def _jsonable(x: Any) -> Any:
    # the manifest is compared after a JSON round trip on resume: tuples -> lists etc.
    return json.loads(json.dumps(x, default=str))


def _skipped_line(sid: str, why: str) -> str:
    # JSON with ASCII escapes: any id (tabs, newlines, unpaired surrogates) and reason fits on one line
    return json.dumps({"id": sid, "reason": " ".join(str(why).split())}, ensure_ascii=True) + "\n"


def read_skipped(directory: str | Path) -> dict[str, str]:
    """``{id: reason}`` of the images an extraction skipped (``skipped.jsonl``; later duplicates ignored).

    A line cut off by a kill mid-append (the last one) is ignored: the item is redone on resume.
    """
    f = Path(directory) / SKIPPED
    out: dict[str, str] = {}
    if f.is_file():
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault(rec["id"], rec["reason"])
    return out


def _append_skipped(directory: Path, rows: list[tuple[str, str]]) -> None:
    path = directory / SKIPPED
    torn = False  # a line cut off by a kill: start on a fresh line so the next record stays whole
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as g:
            g.seek(-1, os.SEEK_END)
            torn = g.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        if torn:
            f.write("\n")
        for sid, why in rows:
            f.write(_skipped_line(sid, why))
        f.flush()
        os.fsync(f.fileno())


class _DistInfo:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.ours = False

    def init(self, device: torch.device) -> None:
        if self.world <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            # long timeout: ranks wait at the barrier for the slowest one to finish its share
            dist.init_process_group(backend=backend, timeout=timedelta(hours=12))
            self.ours = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.ours:
            import torch.distributed as dist

            dist.destroy_process_group()


def _auto_workers(device: torch.device) -> int:
    """DataLoader workers for ``num_workers=-1``.

    On CPU one worker is enough: decoding + preprocessing costs ~5 ms of CPU per ImageNet
    JPEG against ~110 ms for a ViT-B/32 forward (BENCHMARKS.md), and every extra process
    takes cores from the model. A GPU eats images far faster: up to 8 per rank.
    """
    if device.type != "cuda":
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 2
    per_rank = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_rank - 1))


def _resolve_device(cfg: ExtractConfig, dist_info: _DistInfo) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_info.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(cfg.device)


def _autocast(device: torch.device, precision: str) -> tuple[contextlib.AbstractContextManager, str]:
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), precision
    dt = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dt), precision


class _ItemDataset(torch.utils.data.Dataset):
    """Decodes + preprocesses items in DataLoader workers; failures come back as errors."""

    def __init__(self, items: list, preprocess: Any):
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, int, str]:
        from visae.images import load_image

        img, label, err = load_image(self.items[i])
        x = None
        if img is not None:
            try:
                x = self.preprocess(img)
            except Exception as e:  # noqa: BLE001 - a bad image must not kill the run
                err = f"preprocess failed: {type(e).__name__}: {e}"
        return i, x, label, err


def _collate(batch: list[tuple[int, torch.Tensor | None, int, str]]) -> dict[str, Any]:
    ok = [b for b in batch if b[1] is not None]
    return {
        "pos": [b[0] for b in batch],
        "labels": [b[2] for b in batch],
        "errors": [b[3] for b in batch],
        "ok": [b[1] is not None for b in batch],
        "pixels": torch.stack([b[1] for b in ok]) if ok else None,
    }


class _AsyncWriter:
    """Runs ShardWriter.add in a thread so normalising and writing overlap the next forward."""

    def __init__(self, writer: ShardWriter, depth: int = 4):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.err: BaseException | None = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.err is None:
                try:
                    self.writer.add(**job)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                    self.err = e

    def add(self, **job: Any) -> None:
        if self.err is not None:
            raise self.err
        self.q.put(job)

    def finish(self) -> None:
        self.q.put(None)
        self.t.join()
        if self.err is not None:
            raise self.err


def _source_record(cfg: ExtractConfig, bb: Any, src: Any, precision: str) -> dict[str, Any]:
    """What the manifest says the activations are (must be identical on resume)."""
    return _jsonable({
        "stage": "visae.extract",
        "model": bb.name,
        "pretrained": None if cfg.random_init else bb.pretrained,
        "random_init": cfg.random_init,
        "seed": cfg.seed if cfg.random_init else None,
        "layer": cfg.layer,
        "token": cfg.token if cfg.layer is not None else None,
        "read": "image_embedding" if cfg.layer is None else f"residual_after_block_{bb.resolve_layer(cfg.layer)}",
        "dataset": src.root,
        "dataset_kind": src.kind,
        "dataset_info": src.describe(),
        "limit": cfg.limit,
        "preprocess": bb.meta.get("preprocess", {}),
        "image_size": bb.meta.get("image_size"),
        "precision": precision,
        "logit_scale": bb.logit_scale if bb.has_text else None,
        "has_text": bb.has_text,
    })


def _resume_position(writer: ShardWriter, pos_of: dict[str, int], patch_rows: int | None) -> tuple[int, int]:
    """(first item to process, rows of it already written) from the last committed id."""
    if writer.num_written == 0:
        return 0, 0
    ss = ShardSet(writer.dir, require_complete=False)
    last = str(ss.shard_meta(ss.num_shards - 1)["id"][-1])
    base, sep, j = last.rpartition("#p")
    if patch_rows is not None and sep and j.isdigit():
        if base not in pos_of:
            raise ShardError(f"{writer.dir}: last committed id {last!r} is not in the input; the output belongs to another input (use --overwrite)")
        done = int(j) + 1
        return (pos_of[base] + 1, 0) if done >= patch_rows else (pos_of[base], done)
    if last not in pos_of:
        raise ShardError(f"{writer.dir}: last committed id {last!r} is not in the input; the output belongs to another input (use --overwrite)")
    return pos_of[last] + 1, 0


def _n_patch_tokens(bb: Any) -> int:
    with torch.inference_mode():
        x = torch.zeros(1, 3, *bb.image_size, device=bb.device)
        return int(bb.encode_layer(x, 0, "patch").shape[1])


def _clean_output(out: Path) -> None:
    """--overwrite: remove what a previous extraction wrote into ``out`` (only our files)."""
    if not out.is_dir():
        return
    for f in out.iterdir():
        if f.name in (MANIFEST, SKIPPED, REPORT, PART) or (f.name.startswith("shard_") and f.name.endswith((".acts.npy", ".meta.npz"))):
            f.unlink()
        elif f.is_dir() and (f.name.startswith("rank_") or f.name.startswith(".merge_rank_")):
            shutil.rmtree(f)


def _same_request(manifest_source: dict[str, Any], cfg: ExtractConfig, dataset: str) -> list[str]:
    """Fields in which a finished output differs from this request (cheap check, no model load)."""
    want = {"random_init": cfg.random_init, "layer": cfg.layer, "token": cfg.token if cfg.layer is not None else None,
            "dataset": dataset, "limit": cfg.limit}
    diffs = [f"{k}: {manifest_source.get(k)!r} on disk, {v!r} now" for k, v in want.items() if manifest_source.get(k) != v]
    from visae.backbones import parse_backbone_name

    name, tag = parse_backbone_name(cfg.model, None if cfg.random_init else cfg.pretrained)
    if manifest_source.get("model") != name:
        diffs.append(f"model: {manifest_source.get('model')!r} on disk, {name!r} now")
    return diffs


# ----------------------------------------------------------------------------- the run


def _extract_part(cfg: ExtractConfig, part_dir: Path, bb: Any, src: Any, lo: int, hi: int, device: torch.device,
                  rank: int, world: int, fail_after: int | None) -> dict[str, Any]:
    """Extract items [lo, hi) of ``src`` into ``part_dir`` (resumable); returns the part's report."""
    from tqdm import tqdm

    items = src.items[lo:hi]
    amp, precision = _autocast(device, cfg.precision)
    patch_rows = _n_patch_tokens(bb) if (cfg.layer is not None and cfg.token == "patch") else None
    part_dir.mkdir(parents=True, exist_ok=True)
    part = {"rank": rank, "world_size": world, "lo": lo, "hi": hi}
    if world > 1:
        pf = part_dir / PART
        if pf.exists() and json.loads(pf.read_text()) != part and not cfg.overwrite:
            raise ShardError(f"{pf}: this part was written by a run with {json.loads(pf.read_text())}, now {part}; "
                             "rerun with the same number of processes or --overwrite")
    writer = ShardWriter(
        part_dir,
        d=bb.feature_dim(cfg.layer),
        dtype=cfg.dtype,
        shard_size=cfg.shard_size,
        source=_source_record(cfg, bb, src, precision),
        label_names=src.label_names,
        columns=src.columns,
        resume=True,
        overwrite=cfg.overwrite,
    )
    if cfg.overwrite and (part_dir / SKIPPED).exists():
        (part_dir / SKIPPED).unlink()
    if world > 1:
        atomic_write_text(part_dir / PART, json.dumps(part))
    t0 = time.time()
    if writer.complete:
        skipped = read_skipped(part_dir)
        return {"items": len(items), "rows": writer.num_written, "skipped": len(skipped), "resumed_at": len(items), "seconds": 0.0}
    start, drop = _resume_position(writer, {it.id: i for i, it in enumerate(items)}, patch_rows)
    # Resume at the start of the batch the commit point cut, and drop the rows already committed: every batch
    # then holds the items it held in an uninterrupted run, so the activations are the same bytes (batched
    # kernels round differently for another batch composition). Items of that batch skipped before are not
    # logged again.
    relogged = 0
    aligned = (start // cfg.batch_size) * cfg.batch_size
    if aligned < start:
        skipped_before = set(read_skipped(part_dir))
        drop += sum(patch_rows or 1 for it in items[aligned:start] if it.id not in skipped_before)
        relogged, start = start - aligned, aligned
    if start or drop:
        log.info("%s: resuming at item %d/%d (%d rows committed)", part_dir, start, len(items), writer.num_written)

    channels_last = cfg.channels_last == "true" or (cfg.channels_last == "auto" and device.type == "cuda")
    if channels_last:
        bb.model.to(memory_format=torch.channels_last)
    todo = items[start:]
    loader = torch.utils.data.DataLoader(
        _ItemDataset(todo, bb.preprocess),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        persistent_workers=False,
    )
    cols = list(src.columns)
    batches = iter(loader)  # fork the workers before the writer thread exists
    async_writer = _AsyncWriter(writer)
    n_skipped_before = len(read_skipped(part_dir))
    n_skip = 0
    bar = tqdm(total=len(items), initial=start, unit="img", dynamic_ncols=True, disable=not cfg.progress or rank != 0,
               desc=f"extract {bb.name}" + (f" [rank 0/{world}]" if world > 1 else ""))
    ok_run = False
    try:
        with torch.inference_mode():
            for b, batch in enumerate(batches):
                bad = [(todo[p].id, e) for p, e, ok in zip(batch["pos"], batch["errors"], batch["ok"])
                       if not ok and p >= relogged]  # items before the resume point were logged by the killed run
                if bad:
                    _append_skipped(part_dir, bad)
                    for sid, e in bad:
                        log.warning("skipped %s: %s", sid, e)
                    n_skip += len(bad)
                if batch["pixels"] is not None:
                    x = batch["pixels"].to(device, non_blocking=True)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with amp:
                        feats = bb.features(x, cfg.layer, cfg.token)
                    feats = feats.float().cpu()
                    good = [todo[p] for p, ok in zip(batch["pos"], batch["ok"]) if ok]
                    labels = [lab for lab, ok in zip(batch["labels"], batch["ok"]) if ok]
                    if patch_rows is None:
                        rows = feats
                        ids = [it.id for it in good]
                        lab = labels
                        extra = {c: [it.extra[j] for it in good] for j, c in enumerate(cols)}
                    else:
                        P = feats.shape[1]
                        rows = feats.reshape(-1, feats.shape[-1])
                        ids = [f"{it.id}#p{k}" for it in good for k in range(P)]
                        lab = np.repeat(labels, P)
                        extra = {c: np.repeat([it.extra[j] for it in good], P) for j, c in enumerate(cols)}
                    if drop:  # resuming inside a batch (or an image's patch rows): these rows are committed
                        rows, ids, lab = rows[drop:], ids[drop:], np.asarray(lab)[drop:]
                        extra = {c: np.asarray(v)[drop:] for c, v in extra.items()}
                        drop = 0
                    async_writer.add(acts=rows, ids=ids, labels=lab, columns=extra or None)
                bar.update(len(batch["pos"]))
                bar.set_postfix(skipped=n_skipped_before + n_skip, refresh=False)
                if fail_after is not None and b + 1 >= fail_after:
                    raise _SimulatedKill(f"test hook: stopping after {b + 1} batches")
        async_writer.finish()
        writer.close()
        ok_run = True
    finally:
        bar.close()
        if not ok_run:
            # like a kill: keep committed shards only; the rerun resumes after them
            with contextlib.suppress(BaseException):
                async_writer.finish()
            writer.__exit__(RuntimeError, None, None)
    secs = time.time() - t0
    skipped = read_skipped(part_dir)
    return {"items": len(items), "rows": writer.num_written, "skipped": len(skipped), "resumed_at": start,
            "seconds": round(secs, 3), "images_per_s_this_run": round((len(items) - start) / secs, 2) if secs > 0 else None}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _merge_parts(out: Path, world: int) -> ShardSet:
    """Merge out/rank_*/ into out/ (rank order). Safe to rerun after a kill at any point."""
    parts = [out / f"rank_{k}" for k in range(world)]
    # visae.shards.merge_shard_sets moves files; merge hard-linked copies so the parts stay
    # intact until the merged manifest is committed (a killed merge is simply redone)
    staging = []
    for k, p in enumerate(parts):
        st = out / f".merge_rank_{k}"
        shutil.rmtree(st, ignore_errors=True)
        st.mkdir()
        for f in p.iterdir():
            if f.name == MANIFEST or f.name.startswith("shard_"):
                _link_or_copy(f, st / f.name)
        staging.append(st)
    skipped_lines = []
    for p in parts:
        skipped_lines += [_skipped_line(sid, why) for sid, why in read_skipped(p).items()]
    atomic_write_text(out / SKIPPED, "".join(skipped_lines))
    ss = merge_shard_sets(staging, out, remove_parts=True)
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
    return ss


def extract(cfg: ExtractConfig, *, backbone: Any = None, _fail_after_batches: int | None = None) -> ShardSet:
    """Extract activations as ``cfg`` says; returns the (complete) shard set in ``cfg.out``.

    ``backbone``: an already loaded :class:`visae.backbones.Backbone` to use instead of
    loading ``cfg.model`` (it must be that model; the manifest records ``backbone.name``).
    Holds the lock of ``cfg.out`` (:func:`visae.atomic.output_lock`) while it runs; with
    ``--overwrite`` the old output is deleted only after the model, layer and images were
    opened successfully.
    """
    if not cfg.images:
        raise ConfigError("--images is required: a folder, ImageNet-layout folder, webdataset tars or toy-world directory")
    if cfg.layer is None and cfg.token != "cls":
        raise ConfigError(f"--token {cfg.token} needs --layer: the final image embedding is one vector per image")
    if cfg.batch_size <= 0 or cfg.num_workers < -1 or cfg.shard_size <= 0:
        raise ConfigError("batch_size and shard_size must be positive, num_workers >= 0 (or -1 = auto)")

    if cfg.limit is not None and cfg.limit <= 0:
        raise ConfigError(f"--limit must be positive, got {cfg.limit}")
    if cfg.pretrained is not None and cfg.pretrained.strip().lower() in ("", "none", "null"):
        cfg = dataclasses.replace(cfg, pretrained=None)
    out = Path(cfg.out)
    dist_info = _DistInfo()
    device = _resolve_device(cfg, dist_info)
    if cfg.num_workers == -1:
        cfg = dataclasses.replace(cfg, num_workers=_auto_workers(device))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dist_info.init(device)
    with output_lock(out, "visae extract"):
        return _extract_locked(cfg, out, dist_info, device, backbone, _fail_after_batches)


def _extract_locked(cfg: ExtractConfig, out: Path, dist_info: Any, device: torch.device, backbone: Any,
                    _fail_after_batches: int | None) -> ShardSet:
    """``extract`` under the output directory's lock: validate the whole request, then (--overwrite) clean, then run."""
    from visae.backbones import load_backbone
    from visae.images import open_source, rank_bounds

    rank, world = dist_info.rank, dist_info.world
    try:
        dataset_path = _dataset_path(cfg.images)
        final = out / MANIFEST
        if final.is_file() and not cfg.overwrite:
            m = json.loads(final.read_text())
            if m.get("complete"):  # finished before (for several ranks: merged; leftovers of a killed cleanup go)
                diffs = _same_request(m.get("source", {}), cfg, dataset_path)
                if diffs:
                    raise ShardError(f"{out} already holds a finished extraction of something else ({'; '.join(diffs)}); "
                                     "use another --out or --overwrite")
                dist_info.barrier()
                if rank == 0:
                    for k in range(max(world, 1)):
                        shutil.rmtree(out / f"rank_{k}", ignore_errors=True)
                return ShardSet(out)

        if backbone is not None:
            bb = backbone.to(device)
        else:
            bb = load_backbone(cfg.model, cfg.pretrained, random_init=cfg.random_init, device=device, seed=cfg.seed)
        if cfg.layer is not None:
            bb.resolve_layer(cfg.layer)
        src = open_source(cfg.images, cfg.source, folder_labels=cfg.folder_labels)
        src.root = dataset_path
        if cfg.limit is not None:
            src.items = src.items[: cfg.limit]
            if src.boundaries is not None:
                src.boundaries = [b for b in src.boundaries if b < cfg.limit]
        # Only now, with the model, layer and images known to be usable, may --overwrite delete the old output.
        if cfg.overwrite and rank == 0:
            _clean_output(out)
        dist_info.barrier()
        lo, hi = rank_bounds(src, rank, world)
        part_dir = out if world == 1 else out / f"rank_{rank}"
        report = _extract_part(cfg, part_dir, bb, src, lo, hi, device, rank, world, _fail_after_batches)
        if world > 1:
            atomic_write_text(part_dir / REPORT, json.dumps(report))
        dist_info.barrier()
        if world > 1 and rank == 0:
            reports = [json.loads((out / f"rank_{k}" / REPORT).read_text()) for k in range(world)]
            ss = _merge_parts(out, world)
            report = {
                "items": sum(r["items"] for r in reports),
                "rows": len(ss),
                "skipped": sum(r["skipped"] for r in reports),
                "world_size": world,
                "ranks": reports,
            }
        dist_info.barrier()
        if rank == 0:
            report = {**report, "config": config_to_dict(cfg), "skipped_file": SKIPPED if report["skipped"] else None}
            atomic_write_text(out / REPORT, json.dumps(report, indent=1))
        return ShardSet(out)
    finally:
        dist_info.close()


def _dataset_path(spec: str) -> str:
    if os.path.exists(spec):
        return str(Path(spec).resolve())
    return os.path.abspath(spec)  # brace patterns / globs: keep the pattern, absolute


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from visae.backbones import BackboneError, WeightsNotAvailableError
    from visae.images import SourceError

    try:
        cfg = parse_config(ExtractConfig, argv, default_yaml=DEFAULT_YAML, prog="visae extract")
    except ConfigError as e:
        print(f"visae extract: error: {e}", file=sys.stderr)
        return 2
    try:
        ss = extract(cfg)
    except (WeightsNotAvailableError, BackboneError, SourceError, ConfigError, ShardError) as e:
        print(f"visae extract: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        rep = json.loads((Path(cfg.out) / REPORT).read_text()) if (Path(cfg.out) / REPORT).exists() else {}
        print(f"wrote {len(ss)} rows of d={ss.d} to {ss.path} ({rep.get('items', '?')} images, {rep.get('skipped', 0)} skipped"
              + (f", listed in {ss.path / SKIPPED}" if rep.get("skipped") else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
