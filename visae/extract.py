"""Feature extraction: run a vision model over an image collection into a shard set.

    python scripts/extract_features.py --model ViT-B-32 --pretrained laion2b_s34b_b79k \\
        --images /data/imagenet/train --out runs/in1k_b32 [--layer 8 --token mean]
    torchrun --nproc_per_node 8 scripts/extract_features.py ...   # same command, N processes

Python: ``extract(ExtractConfig(...)) -> ShardSet``. Format and options: docs/extraction.md.

What is read: by default the final image embedding after the projection (the CLIP space
where zero-shot classification and naming happen); with ``layer=L`` the residual stream
after block L (0-based, -1 = last) at the class token (``cls``), the mean of the patch
tokens (``mean``) or every patch token (``patch``: one row per patch, ids ``<id>#p<j>``).
``layer="4,8,11"`` or ``"all"`` reads several blocks from one forward pass per batch and writes one
shard set per block, ``out/layer_<L>/``, plus the index ``out/layers.json`` (written last).

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
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

from visae.atomic import append_lines, atomic_write_text, output_lock
from visae.config import ConfigError, absolute_paths, check_bounds, config_to_dict, parse_config
from visae.errors import VisaeError
from visae.resources import config_yaml
from visae.shards import MANIFEST, ShardError, ShardSet, ShardWriter, merge_shard_sets

log = logging.getLogger(__name__)

DEFAULT_YAML = config_yaml("extract.yaml")
SKIPPED = "skipped.jsonl"
REPORT = "extract_report.json"
PART = "part.json"
LAYERS_INDEX = "layers.json"  # several-layer output: the index, written last (docs/extraction.md)

__all__ = ["ExtractConfig", "extract", "main", "read_skipped", "normalise_layer_spec", "resolve_layers", "LAYERS_INDEX"]


@dataclass(frozen=True)
class ExtractConfig:
    """Run a vision model over images and write a shard set of its activations.

    Raises ConfigError when made with flags that would be ignored (``random_init`` with a ``pretrained`` tag or
    file; ``folder_labels`` with ``source`` imagenet, webdataset or toyworld), a bad ``--layer`` syntax or count.
    """

    images: str = field(default="", metadata={"help": "image source: a folder (recursive), an ImageNet-layout folder, "
                                                        "webdataset tars (file, brace pattern, glob or directory), a streamed "
                                                        "webdataset ('http://host/shard-{000..099}.tar', 'pipe:cat shard-{0..3}.tar') "
                                                        "or a toy-world directory"})
    source: Literal["auto", "folder", "imagenet", "webdataset", "toyworld"] = field(
        default="auto", metadata={"help": "kind of image source; auto detects it"})
    folder_labels: bool = field(default=False, metadata={"help": "folder source: label = first-level sub-folder (sorted class names, "
                                                                  "empty class folders included); not with --source imagenet, "
                                                                  "webdataset or toyworld"})
    out: str = field(default="runs/features", metadata={"help": "output shard-set directory (rerun the same command to resume)"})
    model: str = field(default="ViT-B-32:laion2b_s34b_b79k", metadata={"help": "backbone: open_clip name with tag (ViT-B-32:laion2b_s34b_b79k), "
                                                                               "timm:<name>, visae-toyclip (see docs/extraction.md)"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "pretrained tag or local checkpoint file, when not in --model "
                                                                       "(not with --random_init, whose weights are random)"})
    random_init: bool = field(default=False, metadata={"help": "random weights (seeded): for tests and throughput benchmarks"})
    seed: int = field(default=0, metadata={"help": "seed of the random initialisation"})
    layer: Union[int, str, None] = field(default=None, metadata={"help": "read the residual stream after this block (0-based, -1 = last); "
                                                                      "several from one forward pass: 4,8,11 or all (one shard set each "
                                                                      "in OUT/layer_<L>/); unset = the final image embedding"})
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

    def __post_init__(self) -> None:
        from visae.devices import check_device

        check_device(self.device, "ExtractConfig.device")
        # flags that would be ignored: refused, not accepted silently
        if self.random_init and self.pretrained is not None and self.pretrained.strip().lower() not in ("", "none", "null"):
            raise ConfigError(f"--random_init with --pretrained {self.pretrained}: random_init gives random weights, so the "
                              "pretrained weights would be ignored; drop one of the two (random weights with a tag's preprocessing: "
                              "write the tag into --model, e.g. --model ViT-B-32:openai --random_init)")
        if self.folder_labels and self.source in ("imagenet", "webdataset", "toyworld"):
            raise ConfigError(f"--folder_labels with --source {self.source}: folder_labels labels a folder source by its "
                              f"sub-folders; a {self.source} source has its own labels; drop --folder_labels or use --source folder")
        # --layer: None, one block (int) or several ("all" / "4,8,11", syntax checked here: a usage error before any work)
        object.__setattr__(self, "layer", normalise_layer_spec(self.layer))
        # counts refused when the config is made (a negative --threads was ignored: torch's default, all cores)
        check_bounds(self, {"batch_size": (1, None), "num_workers": (-1, None), "threads": (0, None),
                            "shard_size": (1, None), **({"limit": (1, None)} if self.limit is not None else {})},
                     {"num_workers": "(-1: auto, 0: in the main process)", "threads": "(0: torch's default)",
                      "limit": "(null: every image)"})


class _SimulatedKill(RuntimeError):
    """Raised by the test hook ``_fail_after_batches`` to interrupt a run."""


# ----------------------------------------------------------------------------- --layer: one block or several

_LAYER_HELP = "expected a block index (0-based, negative from the end: -1 = last), a comma-separated list of them such as 4,8,11, or all"


def normalise_layer_spec(value: Any) -> int | str | None:
    """``--layer`` as given -> ``None`` (final embedding), an ``int`` (one block) or a several-layer request.

    A several-layer request is ``"all"`` or a comma-separated list of at least two distinct block
    indices as written (``"4,8,-1"``; a YAML / Python list or tuple is accepted too); a list of one
    entry is that one block (an ``int``), so ``--layer 8`` and ``layer: "8"`` stay single-layer
    requests with today's output layout. Only the syntax is checked here (range needs the model:
    :func:`resolve_layers`).

    Raises:
        ConfigError: an empty entry, an entry that is not an integer, or an entry written twice.
    """
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() in ("null", "none"):
            return None
        if text.lower() == "all":
            return "all"
        parts = text.split(",")
    else:
        raise ConfigError(f"--layer {value!r}: {_LAYER_HELP}")
    ints = []
    for p in parts:
        p = p.strip()
        try:
            ints.append(int(p))
        except ValueError:
            what = "an empty entry" if not p else f"{p!r} is not an integer"
            raise ConfigError(f"--layer {value!r}: {what}; {_LAYER_HELP}") from None
    if not ints:
        raise ConfigError(f"--layer {value!r}: no block given; {_LAYER_HELP}")
    if len(ints) == 1:
        return ints[0]
    twice = sorted({i for i in ints if ints.count(i) > 1})
    if twice:
        raise ConfigError(f"--layer {value!r}: block {', '.join(map(str, twice))} given more than once")
    return ",".join(map(str, ints))


def is_several_layers(spec: int | str | None) -> bool:
    """Whether a normalised ``--layer`` asks for several layers (``"all"`` or a list): one shard set per layer."""
    return isinstance(spec, str)


def resolve_layers(spec: int | str, num_blocks: int, model: str = "the model") -> list[int]:
    """A normalised several-layer ``--layer`` (``"all"`` or ``"4,8,-1"``) -> sorted 0-based block indices.

    ``num_blocks``: residual blocks of the image tower. Raises ConfigError for an index out of
    range (-num_blocks..num_blocks-1) or two entries naming the same block (``11,-1`` of 12 blocks),
    and for a model without blocks.
    """
    if num_blocks <= 0:
        raise ConfigError(f"--layer {spec}: {model} has no residual blocks to read (only the final embedding: leave --layer unset)")
    if spec == "all":
        return list(range(num_blocks))
    given = [int(p) for p in str(spec).split(",")]
    bad = [i for i in given if not -num_blocks <= i < num_blocks]
    if bad:
        raise ConfigError(f"--layer {spec}: block {', '.join(map(str, bad))} out of range; {model} has {num_blocks} blocks "
                          f"(0..{num_blocks - 1}, or -{num_blocks}..-1 from the end)")
    resolved = [i % num_blocks for i in given]
    same = sorted({r for r in resolved if resolved.count(r) > 1})
    if same:
        names = "; ".join(f"{' and '.join(str(g) for g, r in zip(given, resolved) if r == s)} name the same block {s}" for s in same)
        raise ConfigError(f"--layer {spec}: {names} of {model} ({num_blocks} blocks); give each block once")
    return sorted(resolved)


def layer_dir(layer: int) -> str:
    """Sub-directory of a several-layer output holding the shard set of block ``layer``."""
    return f"layer_{layer}"


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
    # A line cut off by a kill is ended first, so the next record stays whole.
    append_lines(directory / SKIPPED, [_skipped_line(sid, why) for sid, why in rows])


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
    from visae.devices import resolve_device

    return resolve_device(cfg.device, "--device", dist_info.local_rank)


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


def _source_record(cfg: ExtractConfig, bb: Any, src: Any, precision: str, layers: list[int] | None = None,
                   layer: int | None = None) -> dict[str, Any]:
    """What the manifest says the activations are (must be identical on resume).

    Several-layer requests (``layers``, resolved): the record of block ``layer``'s set says ``layer``
    (0-based) and lists every block of the request in ``layers``, so resuming with another list is refused.
    """
    if layers is None:
        layer = cfg.layer
    rec = {
        "stage": "visae.extract",
        "model": bb.name,
        "pretrained": None if cfg.random_init else bb.pretrained,
        "random_init": cfg.random_init,
        "seed": cfg.seed if cfg.random_init else None,
        "layer": layer,
        "token": cfg.token if layer is not None else None,
        "read": "image_embedding" if layer is None else f"residual_after_block_{bb.resolve_layer(layer)}",
        "dataset": src.root,
        "dataset_kind": src.kind,
        "dataset_info": src.describe(),
        "limit": cfg.limit,
        "preprocess": bb.meta.get("preprocess", {}),
        "image_size": bb.meta.get("image_size"),
        "precision": precision,
        "logit_scale": bb.logit_scale if bb.has_text else None,
        "has_text": bb.has_text,
    }
    if layers is not None:
        rec["layers"] = list(layers)
    return _jsonable(rec)


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
    from visae.wds_stream import PROGRESS

    if not out.is_dir():
        return
    for f in out.iterdir():
        if f.name in (MANIFEST, SKIPPED, REPORT, PART, PROGRESS) or (f.name.startswith("shard_") and f.name.endswith((".acts.npy", ".meta.npz"))):
            f.unlink()
        elif f.name == LAYERS_INDEX:
            f.unlink()
        elif f.is_dir() and (f.name.startswith("rank_") or f.name.startswith(".merge_rank_") or _is_layer_dir(f.name)):
            shutil.rmtree(f)


def _is_layer_dir(name: str) -> bool:
    return name.startswith("layer_") and name[len("layer_"):].isdigit()


def _layout_conflict(out: Path, several: bool) -> str | None:
    """Why ``out`` cannot take this request without --overwrite: it holds the other layout (one set vs one per layer)."""
    if several and (out / MANIFEST).is_file():
        return f"{out} holds a single-layer extraction ({MANIFEST}); a several-layer --layer writes {out}/layer_<L>/ sets"
    if not several:
        layer_sets = sorted(f.name for f in out.iterdir() if _is_layer_dir(f.name) and (f / MANIFEST).is_file()) if out.is_dir() else []
        if (out / LAYERS_INDEX).is_file() or layer_sets:
            return f"{out} holds a several-layer extraction ({', '.join(layer_sets) or LAYERS_INDEX}); this request writes one shard set into {out}"
    return None


def _same_request(manifest_source: dict[str, Any], cfg: ExtractConfig, dataset: str) -> list[str]:
    """Fields in which a finished output differs from this request (cheap check, no model load).

    For a several-layer request ``manifest_source`` is the ``source`` of ``layers.json`` (with ``layers``
    and ``num_blocks``): the requested list, resolved with the recorded block count, must equal ``layers``.
    """
    if is_several_layers(cfg.layer):
        try:
            layers = resolve_layers(cfg.layer, int(manifest_source.get("num_blocks") or 0))
        except ConfigError:
            layers = cfg.layer
        want = {"random_init": cfg.random_init, "layers": layers, "token": cfg.token, "dataset": dataset, "limit": cfg.limit}
    else:
        want = {"random_init": cfg.random_init, "layer": cfg.layer, "token": cfg.token if cfg.layer is not None else None,
                "dataset": dataset, "limit": cfg.limit}
    diffs = [f"{k}: {manifest_source.get(k)!r} on disk, {v!r} now" for k, v in want.items() if manifest_source.get(k) != v]
    from visae.backbones import parse_backbone_name

    name, tag = parse_backbone_name(cfg.model, None if cfg.random_init else cfg.pretrained)
    if manifest_source.get("model") != name:
        diffs.append(f"model: {manifest_source.get('model')!r} on disk, {name!r} now")
    if not cfg.random_init and not _same_weights(manifest_source.get("pretrained"), tag):
        diffs.append(f"pretrained: {manifest_source.get('pretrained')!r} on disk, {tag!r} now")
    if cfg.random_init and "seed" in manifest_source and manifest_source["seed"] != cfg.seed:
        diffs.append(f"seed: {manifest_source['seed']!r} on disk, {cfg.seed!r} now")
    return diffs


def _check_same_items(out: Path, manifest_source: dict[str, Any], cfg: ExtractConfig) -> None:
    """A finished output is returned as is only for the same images: the source is listed again (no image is
    decoded) and its item count and ``items_sha256`` (ids and labels, :func:`visae.images.items_digest`) compared
    with ``manifest_source.dataset_info``. A record without the digest (an older visae) is compared by count only.

    Raises:
        ShardError: files were added, removed or renamed (or labels changed) since the output was made.
        visae.images.SourceError: the images cannot be listed any more.
    """
    from visae.images import items_digest, open_source

    info = manifest_source.get("dataset_info") or {}
    if not isinstance(info, dict) or info.get("num_items") is None:
        return
    src = open_source(cfg.images, cfg.source, folder_labels=cfg.folder_labels)
    items = src.items[: cfg.limit] if cfg.limit is not None else src.items
    n_now, n_rec = len(items), info["num_items"]
    why = None
    if n_now != n_rec:
        why = f"{n_now} items listed now, {n_rec} recorded"
    elif info.get("items_sha256") and items_digest(items) != info["items_sha256"]:
        why = (f"{n_now} items listed now as recorded, but their ids or labels differ (source.dataset_info.items_sha256): "
               "files renamed, replaced by others or relabelled")
    if why:
        raise ShardError(f"{out}: the images changed since this finished extraction was made ({why}); "
                         "use --overwrite or another --out")


def _finished_before(cfg: ExtractConfig) -> bool:
    """Whether ``cfg.out`` holds a finished output that ``extract(cfg)`` returns as is (no --overwrite)."""
    if cfg.overwrite:
        return False
    final = Path(cfg.out) / (LAYERS_INDEX if is_several_layers(cfg.layer) else MANIFEST)
    try:
        return bool(json.loads(final.read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def _same_weights(recorded: Any, now: str | None) -> bool:
    """Whether the weights a finished output records (``source.pretrained``: a tag, a file path as given, or the name
    a backbone gives its default weights, e.g. ``"shipped"``) are the ones this request names (``now``: its tag or
    file, None for the model's default). A file on either side must be the same file (relative or absolute); the
    default matches any recorded name that is not a file. A file's contents are not compared (the manifest does not
    hash them)."""
    def is_file(x: Any) -> bool:
        return isinstance(x, str) and os.path.isfile(x)

    if recorded == now:
        return True
    if is_file(recorded) and is_file(now):
        return os.path.samefile(recorded, now)
    if now is None:
        return not is_file(recorded)
    return False


def _same_storage(out: Path, index: dict[str, Any], cfg: ExtractConfig, several: bool) -> list[str]:
    """Fields of how a finished output stores its rows (``dtype``, ``shard_size``) that differ from this request: a
    rerun with ``--dtype float32`` must not return the float16 set as if it were what was asked for. ``index``: the
    output's manifest.json, or for several layers its layers.json (then the first layer's manifest is read)."""
    m = index
    if several:
        layers = index.get("layers") or []
        try:
            m = json.loads((out / layer_dir(int(layers[0])) / MANIFEST).read_text()) if layers else {}
        except (OSError, ValueError):
            return []  # a damaged layer is the shard set's own check to report when it is opened
    return [f"{k}: {m[k]!r} on disk, {v!r} now" for k, v in (("dtype", cfg.dtype), ("shard_size", cfg.shard_size))
            if k in m and m[k] != v]


# ----------------------------------------------------------------------------- the run


def _extract_part(cfg: ExtractConfig, part_dir: Path, bb: Any, src: Any, lo: int, hi: int, device: torch.device,
                  rank: int, world: int, fail_after: int | None, layers: list[int] | None = None) -> dict[str, Any]:
    """Extract items [lo, hi) of ``src`` into ``part_dir`` (resumable); returns the part's report.

    ``layers`` (resolved block indices, several-layer requests): one forward pass per batch
    (:meth:`Backbone.encode_layers`) feeds one shard writer per block, ``part_dir/layer_<L>/``; the
    skipped list is ``part_dir/skipped.jsonl`` (copied into every layer's set at the end). Every
    layer's writer resumes on its own commit point: the run restarts at the batch of the layer
    that is furthest behind and each writer drops the rows it already holds, so a kill between two
    layers' commits loses or repeats nothing. The sets are completed together: every layer's last
    rows are flushed first, then every manifest is marked complete.
    """
    from tqdm import tqdm

    from visae.wds_stream import StreamBatches, plan_stream_part, stream_total

    streaming = getattr(src, "streaming", False)  # pipe:/http(s) webdataset: no item list up front (visae/wds_stream.py)
    items = [] if streaming else src.items[lo:hi]
    amp, precision = _autocast(device, cfg.precision)
    read_layer = cfg.layer if layers is None else layers[0]
    patch_rows = _n_patch_tokens(bb) if (read_layer is not None and cfg.token == "patch") else None
    part_dir.mkdir(parents=True, exist_ok=True)
    part = {"rank": rank, "world_size": world, "lo": lo, "hi": hi}
    if world > 1:
        pf = part_dir / PART
        if pf.exists() and json.loads(pf.read_text()) != part and not cfg.overwrite:
            raise ShardError(f"{pf}: this part was written by a run with {json.loads(pf.read_text())}, now {part}; "
                             "rerun with the same number of processes or --overwrite")
    targets = [(cfg.layer, part_dir)] if layers is None else [(L, part_dir / layer_dir(L)) for L in layers]
    writers = [ShardWriter(
        d_out,
        d=bb.feature_dim(L),
        dtype=cfg.dtype,
        shard_size=cfg.shard_size,
        source=_source_record(cfg, bb, src, precision, layers, L),
        label_names=src.label_names,
        columns=src.columns,
        resume=True,
        overwrite=cfg.overwrite,
    ) for L, d_out in targets]
    if cfg.overwrite and (part_dir / SKIPPED).exists():
        (part_dir / SKIPPED).unlink()
    if world > 1:
        atomic_write_text(part_dir / PART, json.dumps(part))
    t0 = time.time()
    if all(w.complete for w in writers):
        skipped = read_skipped(part_dir)
        n_done = stream_total(part_dir) if streaming else len(items)
        return {"items": n_done, "rows": writers[0].num_written, "skipped": len(skipped), "resumed_at": n_done, "seconds": 0.0}
    skipped_before = set(read_skipped(part_dir))
    if streaming:  # resume by sample count from stream_progress.jsonl (the same rule, no item list needed)
        plan = plan_stream_part(part_dir, lo, writers, cfg.batch_size)
        start, drops = plan.first, list(plan.drops)
    else:
        # Each writer's resume point; a finished one (a kill while the layers were being completed) takes no rows.
        pos_of = {it.id: i for i, it in enumerate(items)}
        positions = [(len(items), 0) if w.complete else _resume_position(w, pos_of, patch_rows) for w in writers]
        start = min(p[0] for p in positions)
        # Resume at the start of the batch the (earliest) commit point cut, and drop the rows already committed: every batch
        # then holds the items it held in an uninterrupted run, so the activations are the same bytes (batched
        # kernels round differently for another batch composition). Items skipped before are not logged again.
        start = (start // cfg.batch_size) * cfg.batch_size
        drops = [None if w.complete else d + sum(patch_rows or 1 for it in items[start:s] if it.id not in skipped_before)
                 for w, (s, d) in zip(writers, positions)]  # None: this writer takes nothing more
    if start or any(drops):
        log.info("%s: resuming at item %d/%d (%d rows committed)", part_dir, start, len(items), min(w.num_written for w in writers))

    channels_last = cfg.channels_last == "true" or (cfg.channels_last == "auto" and device.type == "cuda")
    if channels_last:
        bb.model.to(memory_format=torch.channels_last)
    if streaming:  # decoding processes are forked here, before the writer threads exist
        stream = StreamBatches(src, part_dir, plan, hi, batch_size=cfg.batch_size, preprocess=bb.preprocess,
                               num_workers=cfg.num_workers, patch_rows=patch_rows, shard_size=cfg.shard_size, limit=src.limit)
        todo, batches = stream.todo, iter(stream)
    else:
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
        batches = iter(loader)  # fork the workers before the writer threads exist
    cols = list(src.columns)
    async_writers = [_AsyncWriter(w) for w in writers]
    n_skipped_before = len(skipped_before)
    n_skip = 0
    bar = tqdm(total=(src.limit if streaming else len(items)), initial=start, unit="img", dynamic_ncols=True, disable=not cfg.progress or rank != 0,
               desc=f"extract {bb.name}" + (f" [rank 0/{world}]" if world > 1 else ""))
    ok_run = False
    try:
        with torch.inference_mode():
            for b, batch in enumerate(batches):
                bad = [(todo[p].id, e) for p, e, ok in zip(batch["pos"], batch["errors"], batch["ok"])
                       if not ok and todo[p].id not in skipped_before]  # logged by the killed run
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
                        if layers is None:
                            feats_of = [bb.features(x, cfg.layer, cfg.token)]
                        else:
                            by_block = bb.encode_layers(x, layers, cfg.token)
                            feats_of = [by_block[L] for L in layers]
                    # contiguous: a class-token row is a view of the block's whole [B, N, W] output, which the
                    # writer queue would otherwise keep alive
                    feats_of = [f.float().cpu().contiguous() for f in feats_of]
                    good = [todo[p] for p, ok in zip(batch["pos"], batch["ok"]) if ok]
                    labels = [lab for lab, ok in zip(batch["labels"], batch["ok"]) if ok]
                    if patch_rows is None:
                        ids = [it.id for it in good]
                        lab = np.asarray(labels)
                        extra = {c: np.asarray([it.extra[j] for it in good]) for j, c in enumerate(cols)}
                    else:
                        P = feats_of[0].shape[1]
                        ids = [f"{it.id}#p{k}" for it in good for k in range(P)]
                        lab = np.repeat(labels, P)
                        extra = {c: np.repeat([it.extra[j] for it in good], P) for j, c in enumerate(cols)}
                    for k, (feats, aw) in enumerate(zip(feats_of, async_writers)):
                        rows = feats if patch_rows is None else feats.reshape(-1, feats.shape[-1])
                        drop = drops[k]
                        if drop is None or drop >= len(ids):  # finished, or every row of this batch is committed
                            drops[k] = None if drop is None else drop - len(ids)
                            continue
                        if drop:  # resuming inside a batch (or an image's patch rows): these rows are committed
                            aw.add(acts=rows[drop:], ids=ids[drop:], labels=lab[drop:],
                                   columns={c: v[drop:] for c, v in extra.items()} or None)
                            drops[k] = 0
                        else:
                            aw.add(acts=rows, ids=ids, labels=lab, columns=extra or None)
                bar.update(len(batch["pos"]))
                bar.set_postfix(skipped=n_skipped_before + n_skip, refresh=False)
                if fail_after is not None and b + 1 >= fail_after:
                    raise _SimulatedKill(f"test hook: stopping after {b + 1} batches")
        for aw in async_writers:
            aw.finish()
        if layers is None:
            writers[0].close()
        else:
            # all layers' last rows first, then every manifest complete: no layer is finished while another lacks rows
            for w in writers:
                if not w.complete and w._buffered:
                    w._flush(w._buffered)
            skipped_text = (part_dir / SKIPPED).read_text(encoding="utf-8") if (part_dir / SKIPPED).is_file() else ""
            for w in writers:
                if not w.complete:
                    atomic_write_text(w.dir / SKIPPED, skipped_text)
            for w in writers:
                w.close()
        ok_run = True
    finally:
        bar.close()
        if streaming:
            stream.close()
        if not ok_run:
            # like a kill: keep committed shards only; the rerun resumes after them
            for aw in async_writers:
                with contextlib.suppress(BaseException):
                    aw.finish()
            for w in writers:
                w.__exit__(RuntimeError, None, None)
    rows_written = [w.num_written for w in writers]
    if len(set(rows_written)) != 1:  # every layer reads the same images and tokens
        raise ShardError(f"{part_dir}: the layers' sets hold different row counts {dict(zip(layers or [cfg.layer], rows_written))}")
    secs = time.time() - t0
    skipped = read_skipped(part_dir)
    n_items = stream.n_read if streaming else len(items)  # streaming: the samples read (this run and before)
    return {"items": n_items, "rows": rows_written[0], "skipped": len(skipped), "resumed_at": start,
            "seconds": round(secs, 3), "images_per_s_this_run": round((n_items - start) / secs, 2) if secs > 0 else None}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _merge_parts(out: Path, world: int, layers: list[int] | None = None) -> ShardSet:
    """Merge out/rank_*/ into out/ (rank order); several layers: out/rank_*/layer_L/ into out/layer_L/ for each L.

    Safe to rerun after a kill at any point: the parts are removed only after every set is merged.
    """
    parts = [out / f"rank_{k}" for k in range(world)]
    skipped_lines = []
    for p in parts:
        skipped_lines += [_skipped_line(sid, why) for sid, why in read_skipped(p).items()]
    atomic_write_text(out / SKIPPED, "".join(skipped_lines))
    ss = None
    for sub in ([""] if layers is None else [layer_dir(L) for L in layers]):
        # visae.shards.merge_shard_sets moves files; merge hard-linked copies so the parts stay
        # intact until the merged manifest is committed (a killed merge is simply redone)
        staging = []
        for k, p in enumerate(parts):
            st = out / (f".merge_rank_{k}" + (f"_{sub}" if sub else ""))
            shutil.rmtree(st, ignore_errors=True)
            st.mkdir()
            for f in (p / sub).iterdir():
                if f.name == MANIFEST or f.name.startswith("shard_"):
                    _link_or_copy(f, st / f.name)
            staging.append(st)
        if sub:
            (out / sub).mkdir(exist_ok=True)
            atomic_write_text(out / sub / SKIPPED, "".join(skipped_lines))
        ss = merge_shard_sets(staging, out / sub, remove_parts=True)
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
    return ss  # type: ignore[return-value]


def extract(cfg: ExtractConfig, *, backbone: Any = None, _fail_after_batches: int | None = None) -> ShardSet | dict[int, ShardSet]:
    """Extract activations as ``cfg`` says; returns the (complete) shard set in ``cfg.out``.

    A several-layer ``cfg.layer`` (``"4,8,11"``, ``"all"``) returns ``{block index: ShardSet}``, the sets
    ``cfg.out/layer_<L>/`` written from one forward pass per batch (docs/extraction.md, "Several layers").
    Raises ConfigError for a layer list that does not fit the model (out of range, one block twice)
    after loading the model and before anything is written into ``cfg.out``.

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
    fresh = not out.exists()
    with output_lock(out, "visae extract"):
        try:
            return _extract_locked(cfg, out, dist_info, device, backbone, _fail_after_batches)
        except VisaeError:
            if fresh:  # refused before writing (a bad layer list, model or source): leave no directory behind
                _remove_if_only_locks(out)
            raise


def _remove_if_only_locks(out: Path) -> None:
    """Remove ``out`` if it holds nothing but lock files (we created it for the lock, then refused the request)."""
    with contextlib.suppress(OSError):
        entries = list(out.iterdir())
        if all(f.is_file() and f.name.startswith(".visae") and f.name.endswith(".lock") for f in entries):
            for f in entries:
                f.unlink()
            out.rmdir()


def _extract_locked(cfg: ExtractConfig, out: Path, dist_info: Any, device: torch.device, backbone: Any,
                    _fail_after_batches: int | None) -> ShardSet | dict[int, ShardSet]:
    """``extract`` under the output directory's lock: validate the whole request, then (--overwrite) clean, then run."""
    from visae.backbones import load_backbone
    from visae.images import is_stream_spec, open_source, rank_bounds
    from visae.wds_stream import open_stream

    rank, world = dist_info.rank, dist_info.world
    several = is_several_layers(cfg.layer)
    try:
        dataset_path = _dataset_path(cfg.images)
        final = out / (LAYERS_INDEX if several else MANIFEST)
        if final.is_file() and not cfg.overwrite:
            m = json.loads(final.read_text())
            if m.get("complete"):  # finished before (for several ranks: merged; leftovers of a killed cleanup go)
                diffs = _same_request(m.get("source", {}), cfg, dataset_path) + _same_storage(out, m, cfg, several)
                if diffs:
                    raise ShardError(f"{out} already holds a finished extraction of something else ({'; '.join(diffs)}); "
                                     "use another --out or --overwrite")
                if not is_stream_spec(str(cfg.images)):  # a stream has no item list to compare (not probed again)
                    _check_same_items(out, m.get("source", {}), cfg)
                dist_info.barrier()
                if rank == 0:
                    for k in range(max(world, 1)):
                        shutil.rmtree(out / f"rank_{k}", ignore_errors=True)
                if several:
                    return {int(L): ShardSet(out / layer_dir(int(L))) for L in m["layers"]}
                return ShardSet(out)
        conflict = None if cfg.overwrite else _layout_conflict(out, several)
        if conflict:
            raise ShardError(f"{conflict}; use another --out or --overwrite")

        if backbone is not None:
            bb = backbone.to(device)
        else:
            bb = load_backbone(cfg.model, cfg.pretrained, random_init=cfg.random_init, device=device, seed=cfg.seed)
        layers = None
        if several:
            layers = resolve_layers(cfg.layer, bb.num_layers, bb.name)
            if cfg.token == "cls" and not bb.has_cls_token:
                raise ConfigError(f"--token cls: {bb.name} has no class token; use --token mean or patch")
        elif cfg.layer is not None:
            bb.resolve_layer(cfg.layer)
        if is_stream_spec(str(cfg.images)):  # pipe: / http(s) URLs: a webdataset stream, validated by open_stream
            if cfg.source not in ("auto", "webdataset"):
                raise ConfigError(f"{cfg.images}: a pipe:/http(s) source is a webdataset stream; --source must be auto "
                                  f"or webdataset, not {cfg.source!r}")
            src = open_stream(str(cfg.images))
        else:
            src = open_source(cfg.images, cfg.source, folder_labels=cfg.folder_labels)
        src.root = dataset_path
        if cfg.limit is not None and getattr(src, "streaming", False):
            if world > 1:
                raise ConfigError("--limit with a streaming source (pipe:/http(s)) needs one process: a rank cannot "
                                  "know how many samples the shards before its own hold")
            src.limit = cfg.limit
        elif cfg.limit is not None:
            src.items = src.items[: cfg.limit]
            if src.boundaries is not None:
                src.boundaries = [b for b in src.boundaries if b < cfg.limit]
        # Only now, with the model, layer and images known to be usable, may --overwrite delete the old output.
        if cfg.overwrite and rank == 0:
            _clean_output(out)
        dist_info.barrier()
        lo, hi = rank_bounds(src, rank, world)
        part_dir = out if world == 1 else out / f"rank_{rank}"
        report = _extract_part(cfg, part_dir, bb, src, lo, hi, device, rank, world, _fail_after_batches, layers)
        if world > 1:
            atomic_write_text(part_dir / REPORT, json.dumps(report))
        dist_info.barrier()
        if world > 1 and rank == 0:
            reports = [json.loads((out / f"rank_{k}" / REPORT).read_text()) for k in range(world)]
            ss = _merge_parts(out, world, layers)
            report = {
                "items": sum(r["items"] for r in reports),
                "rows": len(ss),
                "skipped": sum(r["skipped"] for r in reports),
                "world_size": world,
                "ranks": reports,
            }
        dist_info.barrier()
        if rank == 0:
            # file and directory arguments recorded absolute (as typed, relative, they did not say which from
            # elsewhere); --images as the manifest's source.dataset (a pipe:/http(s) stream as given)
            rec = {**absolute_paths(config_to_dict(cfg), ("out",), if_file=("pretrained",)), "images": src.root}
            report = {**report, "config": rec, "skipped_file": SKIPPED if report["skipped"] else None}
            if layers is not None:
                report["layers"] = {str(L): layer_dir(L) for L in layers}
            atomic_write_text(out / REPORT, json.dumps(report, indent=1))
            if layers is not None:  # the commit point of the whole several-layer output, written last
                _write_layers_index(out, cfg, bb, src, layers)
        if layers is not None:
            dist_info.barrier()
            return {L: ShardSet(out / layer_dir(L)) for L in layers}
        return ShardSet(out)
    finally:
        dist_info.close()


def _write_layers_index(out: Path, cfg: ExtractConfig, bb: Any, src: Any, layers: list[int]) -> None:
    """``OUT/layers.json`` (format in docs/extraction.md), once every layer's set is complete."""
    sets = {L: ShardSet(out / layer_dir(L)) for L in layers}  # checks each one is complete
    counts = {len(ss) for ss in sets.values()}
    if len(counts) != 1:
        raise ShardError(f"{out}: the layers' sets hold different row counts {({L: len(ss) for L, ss in sets.items()})}")
    source = {k: v for k, v in sets[layers[0]].source.items() if k not in ("layer", "read")}
    source["num_blocks"] = bb.num_layers
    index = {"format": "visae.extract_layers", "version": 1, "layers": list(layers),
             "sets": {str(L): layer_dir(L) for L in layers}, "token": cfg.token, "num_examples": counts.pop(),
             "source": source, "complete": True}
    atomic_write_text(out / LAYERS_INDEX, json.dumps(index, indent=1))


def _dataset_path(spec: str) -> str:
    from visae.wds_stream import expand_stream_urls, is_stream_spec

    if is_stream_spec(spec):  # a URL / pipe: command is kept as given; its brace syntax is checked now, before any work
        expand_stream_urls(spec)
        return spec
    if os.path.exists(spec):
        return str(Path(spec).resolve())
    return os.path.abspath(spec)  # brace patterns / globs: keep the pattern, absolute


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:

    from visae.errors import VisaeError, report

    try:
        cfg = parse_config(ExtractConfig, argv, default_yaml=DEFAULT_YAML, prog="visae extract")
        done_before = _finished_before(cfg)
        ss = extract(cfg)
    except VisaeError as e:  # a bad flag, model, image source or output (exit 2), or a lock held (1): visae.errors
        return report("visae extract", e)
    if int(os.environ.get("RANK", "0")) == 0:
        rep = json.loads((Path(cfg.out) / REPORT).read_text()) if (Path(cfg.out) / REPORT).exists() else {}
        listed = f", listed in {Path(cfg.out) / SKIPPED}" if rep.get("skipped") else ""
        counts = f"{rep.get('items', '?')} images, {rep.get('skipped', 0)} skipped{listed}"
        if isinstance(ss, dict):
            first = next(iter(ss.values()))
            what = f"{len(ss)} layers ({', '.join(map(str, ss))}) x {len(first)} rows of d={first.d}"
            where = f"{Path(cfg.out)}/layer_<L>/"
        else:
            what, where = f"{len(ss)} rows of d={ss.d}", str(ss.path)
        if done_before:  # a finished output of the same request and images, returned as is
            print(f"already complete: {what} in {where} ({counts}; nothing to do; --overwrite to extract again)")
        else:
            print(f"wrote {what} to {where} ({counts})")
    return 0


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.extract", main))
