"""Extraction inputs that changed or conflict: a finished output of other images, ImageNet-looking folders with
strays, folder aliases, empty class folders, bad webdataset labels, resume refusals that name the field,
flag conflicts, several-layer outputs given to a shard reader, link members in tars, truthful skip reasons."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visae.backbones import TINY_CLIP_NAME
from visae.config import ConfigError
from visae.extract import ExtractConfig, _SimulatedKill, extract, main, read_skipped
from visae.images import SourceError, load_image, open_source
from visae.shards import ShardError, ShardSet, ShardWriter

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8), "RGB").save(b, "PNG")
    return b.getvalue()


def _cfg(images, out, **kw) -> ExtractConfig:
    base = dict(images=str(images), out=str(out), model=TINY_CLIP_NAME, random_init=True, batch_size=4,
                num_workers=0, progress=False, dtype="float32", device="cpu")
    base.update(kw)
    return ExtractConfig(**base)


def _cli(images, out, *extra) -> list[str]:
    return ["--images", str(images), "--out", str(out), "--model", TINY_CLIP_NAME, "--random_init", "--threads", "1",
            "--num_workers", "0", "--no_progress", "--device", "cpu", "--dtype", "float32", "--batch_size", "4", *extra]


def _tar(path: Path, members: list[tuple[str, bytes]], links: list[tuple[str, str, bytes]] = ()) -> None:
    """``members``: (name, data) regular files; ``links``: (name, target, type) link members."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for name, target, kind in links:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = kind, target
            tf.addfile(ti)


# ----------------------------------------------------------------------------- 1. images changed since


def test_a_finished_output_of_other_images_is_refused_not_returned(tmp_path, capsys):
    """A folder whose files were renamed (same count), added or removed after a finished extraction: the rerun
    returned the old rows (ids naming deleted files) with "wrote N rows" and exit 0."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(_png(1))
    (imgs / "b.png").write_bytes(_png(2))
    out = tmp_path / "out"
    assert main(_cli(imgs, out)) == 0
    assert "wrote 2 rows" in capsys.readouterr().out
    info = ShardSet(out).source["dataset_info"]
    assert info["num_items"] == 2 and len(info["items_sha256"]) == 64
    # the same command again: returned as is, and said so (not "wrote")
    assert main(_cli(imgs, out)) == 0
    said = capsys.readouterr().out
    assert said.startswith("already complete: 2 rows") and "nothing to do" in said and "wrote" not in said
    # a same-count rename
    (imgs / "b.png").rename(imgs / "c.png")
    assert main(_cli(imgs, out)) == 2
    err = capsys.readouterr().err
    assert "the images changed since" in err and "2 items listed now as recorded" in err and "--overwrite" in err
    with pytest.raises(ShardError, match="images changed since"):
        extract(_cfg(imgs, out))
    assert [str(i) for i in ShardSet(out).metadata()["id"]] == ["a.png", "b.png"]  # left as it was
    # a file added: the count differs
    (imgs / "d.png").write_bytes(_png(3))
    with pytest.raises(ShardError, match="3 items listed now, 2 recorded"):
        extract(_cfg(imgs, out))
    # --overwrite extracts the new listing
    ss = extract(_cfg(imgs, out, overwrite=True))
    assert [str(i) for i in ss.metadata()["id"]] == ["a.png", "c.png", "d.png"]
    # a record from an older visae (no digest): compared by count only
    m = json.loads((out / "manifest.json").read_text())
    del m["source"]["dataset_info"]["items_sha256"]
    (out / "manifest.json").write_text(json.dumps(m))
    (imgs / "d.png").rename(imgs / "e.png")
    assert len(extract(_cfg(imgs, out))) == 3
    (imgs / "e.png").unlink()
    with pytest.raises(ShardError, match="2 items listed now, 3 recorded"):
        extract(_cfg(imgs, out))


def test_resuming_an_unfinished_output_of_renamed_images_is_refused(tmp_path):
    """The kill left an unfinished set; a same-count rename before the rerun must not be resumed (the digest is part
    of the manifest's source), and the refusal names the nested field rather than dumping both source records."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(8):
        (imgs / f"im{i}.png").write_bytes(_png(i))
    out = tmp_path / "out"
    with pytest.raises(_SimulatedKill):
        extract(_cfg(imgs, out, batch_size=2, shard_size=2), _fail_after_batches=1)
    (imgs / "im7.png").rename(imgs / "zz.png")
    with pytest.raises(ShardError, match=r"source\.dataset_info\.items_sha256: '[0-9a-f]+' on disk, '[0-9a-f]+' now") as e:
        extract(_cfg(imgs, out, batch_size=2, shard_size=2))
    assert len(str(e.value)) < 600 and "'stage'" not in str(e.value)


# ----------------------------------------------------------------------------- 6. resume refusals name the field


def test_resume_refusal_names_only_the_differing_nested_keys(tmp_path):
    src = {"model": "m", "dataset_kind": "imagenet", "preprocess": {"mean": [0.1] * 50},
           "dataset_info": {"num_items": 98, "kind": "imagenet", "path": "/x" * 200}}
    ShardWriter(tmp_path / "s", d=4, source=src)
    now = dict(src, dataset_kind="folder", dataset_info=dict(src["dataset_info"], num_items=100, extra=1))
    with pytest.raises(ShardError) as e:
        ShardWriter(tmp_path / "s", d=4, source=now)
    msg = str(e.value)
    assert "source.dataset_info.num_items: 98 on disk, 100 now" in msg
    assert "source.dataset_kind: 'imagenet' on disk, 'folder' now" in msg
    assert "source.dataset_info.extra: (absent) on disk, 1 now" in msg
    assert "preprocess" not in msg and "/x/x" not in msg and len(msg) < 500


# ----------------------------------------------------------------------------- 2. ImageNet folder with strays


def test_auto_warns_when_an_imagenet_folder_has_files_without_a_wnid(tmp_path, caplog):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, w in enumerate(WNIDS):
        (flat / f"{w}_{i}.JPEG").write_bytes(_png(i))
    with caplog.at_level(logging.WARNING, logger="visae.images"):
        assert open_source(flat).kind == "imagenet"
    assert not caplog.records
    (flat / "IMG_0001.JPEG").write_bytes(_png(9))
    with caplog.at_level(logging.WARNING, logger="visae.images"):
        src = open_source(flat)
    assert src.kind == "folder"
    [rec] = caplog.records
    msg = rec.getMessage()
    assert "\n" not in msg and "4 of 5 images have ImageNet names" in msg and "1 do not" in msg
    assert "'IMG_0001.JPEG'" in msg and "--source imagenet" in msg and "rename or remove" in msg
    # a class folder that is not a wnid is named
    nested = tmp_path / "nested"
    for i, w in enumerate(WNIDS):
        (nested / w).mkdir(parents=True)
        (nested / w / "x.JPEG").write_bytes(_png(i))
    (nested / "cats").mkdir()
    (nested / "cats" / "y.jpg").write_bytes(_png(8))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visae.images"):
        assert open_source(nested).kind == "folder"
    assert "class folder(s) not named by a wnid: 'cats/'" in caplog.records[0].getMessage()
    # a folder where most files have no wnid is an ordinary folder: no warning
    caplog.clear()
    for i in range(6):
        (nested / "cats" / f"z{i}.jpg").write_bytes(_png(20 + i))
    with caplog.at_level(logging.WARNING, logger="visae.images"):
        assert open_source(nested).kind == "folder"
    assert not caplog.records


# ----------------------------------------------------------------------------- 3. folder aliases


def test_a_folder_link_never_takes_the_place_of_the_real_folder(tmp_path):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        (root / c / "1.png").write_bytes(_png(len(c)))
    (root / "dog" / "2.png").write_bytes(_png(7))
    (root / "a_alias").symlink_to(root / "cat")
    (root / "a_file_alias.png").symlink_to(root / "dog" / "2.png")
    src = open_source(root, "folder", folder_labels=True)
    good = {it.id: it.label for it in src.items if not it.error}
    errs = {it.id: it.error for it in src.items if it.error}
    assert good == {"cat/1.png": 0, "dog/1.png": 1, "dog/2.png": 1}
    assert src.label_names["label"] == ["cat", "dog"]
    assert set(errs) == {"a_alias/", "a_file_alias.png"}
    assert "folder link to 'cat/', which is already read under its own name" in errs["a_alias/"]
    assert "same file as 'dog/2.png'" in errs["a_file_alias.png"]
    # a link to a folder outside the root is still read, under the link's name
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "3.png").write_bytes(_png(3))
    (root / "bird").symlink_to(outside)
    src = open_source(root, "folder", folder_labels=True)
    assert src.label_names["label"] == ["bird", "cat", "dog"]
    assert {it.id for it in src.items if not it.error} == {"bird/3.png", "cat/1.png", "dog/1.png", "dog/2.png"}


# ----------------------------------------------------------------------------- 4. empty class folders


def test_empty_class_folders_keep_their_class_index(tmp_path, caplog):
    splits = {}
    for split, empty in (("train", None), ("val", "b")):
        root = tmp_path / split
        for i, c in enumerate("abc"):
            (root / c).mkdir(parents=True)
            if c != empty:
                (root / c / f"{i}.png").write_bytes(_png(i))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="visae.images"):
            splits[split] = open_source(root, folder_labels=True)
        if empty:
            assert "1 class folder(s) hold no images: 'b/'" in caplog.records[0].getMessage()
        else:
            assert not caplog.records
    for src in splits.values():
        assert src.label_names["label"] == ["a", "b", "c"]
    assert {it.id: it.label for it in splits["val"].items} == {"a/0.png": 0, "c/2.png": 2}


# ----------------------------------------------------------------------------- 5. webdataset labels


def test_cls_values_outside_int64_negative_or_not_ascii_are_counted_skips(tmp_path):
    tar = tmp_path / "w.tar"
    cls = {"s0": b"3", "s1": b"99999999999999999999", "s2": b"-5", "s3": "\u0663".encode(), "s4": b" 7\n", "s5": b"+2"}
    _tar(tar, [m for k, v in cls.items() for m in ((f"{k}.png", _png(int(k[1]))), (f"{k}.cls", v))])
    out = tmp_path / "out"
    ss = extract(_cfg(tar, out))  # an OverflowError from the writer thread killed the whole run
    meta = ss.metadata()
    assert {str(i): int(lab) for i, lab in zip(meta["id"], meta["label"])} == {"s0": 3, "s4": 7}
    skipped = read_skipped(out)
    assert set(skipped) == {"s1", "s2", "s3", "s5"}
    assert "larger than the largest label" in skipped["s1"] and "negative label" in skipped["s2"]
    assert "ASCII digits" in skipped["s3"] and "ASCII digits" in skipped["s5"]
    assert json.loads((out / "extract_report.json").read_text())["skipped"] == 4
    from visae.images import parse_cls

    assert parse_cls(b"9223372036854775807") == 2**63 - 1
    with pytest.raises(SourceError, match="larger"):
        parse_cls(b"9223372036854775808")


# ----------------------------------------------------------------------------- 7. truthful messages, 10. links


def test_a_tar_given_twice_is_named_as_listed_twice(tmp_path):
    tar = tmp_path / "a.tar"
    _tar(tar, [("s0.png", _png(0))])
    with pytest.raises(SourceError, match=r"shard .*a\.tar is listed twice") as e:
        open_source(f"{tar}::{tar}")
    assert "keys repeat" not in str(e.value)


def test_tar_skip_reasons_are_truthful_and_links_are_counted(tmp_path):
    tar = tmp_path / "t.tar"
    _tar(tar, [("s0.png", _png(0)), ("s0.png", _png(1)), ("s7.a.jpg", _png(7)), ("s8.png", _png(8))],
         links=[("s9.png", "s8.png", tarfile.SYMTYPE), ("s10.png", "s8.png", tarfile.LNKTYPE),
                ("dir", "", tarfile.DIRTYPE)])
    src = open_source(tar)
    errs = {it.id: it.error for it in src.items if it.error}
    assert set(errs) == {"t.tar#repeated-0", "s7", "t.tar#link-0", "t.tar#link-1"}, errs
    assert "repeated member name 's0.png'" in errs["t.tar#repeated-0"] and "readable" in errs["t.tar#repeated-0"]
    assert "reads 's7.a.jpg' as key 's7', extension 'a.jpg'" in errs["s7"]
    assert "'s9.png' is a symbolic link to 's8.png'" in errs["t.tar#link-0"]
    assert "'s10.png' is a hard link to 's8.png'" in errs["t.tar#link-1"]
    assert load_image(next(it for it in src.items if it.id == "s8"))[2] == ""
    # the stream reader gives the same items and reasons
    from visae.wds_stream import _url_items

    streamed = {sid: err for sid, _, _, err in _url_items(f"pipe:cat {tar}", 0) if err}
    assert set(streamed) == set(errs) and all(streamed[k] == errs[k] for k in errs if k != "t.tar#repeated-0")
    assert "repeated member name 's0.png'" in streamed["t.tar#repeated-0"]


# ----------------------------------------------------------------------------- 8. flag conflicts


def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--random_init with --pretrained openai"):
        _cfg(tmp_path, tmp_path / "o", pretrained="openai")
    with pytest.raises(ConfigError, match="--folder_labels with --source imagenet"):
        _cfg(tmp_path, tmp_path / "o", folder_labels=True, source="imagenet")
    assert _cfg(tmp_path, tmp_path / "o", pretrained="none").pretrained == "none"  # "none": no tag, accepted
    assert main(_cli(tmp_path, tmp_path / "o", "--pretrained", "openai")) == 2
    assert "--random_init with --pretrained" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # auto detection of a source with its own labels, with --folder_labels: refused by the source
    tar = tmp_path / "a.tar"
    _tar(tar, [("s0.png", _png(0))])
    with pytest.raises(SourceError, match="folder_labels .* applies to folder sources only; this is a webdataset"):
        open_source(tar, folder_labels=True)


# ----------------------------------------------------------------------------- 9. several-layer outputs


def test_a_several_layer_output_given_as_a_shard_set_names_its_layer_sets(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        (imgs / f"{i}.png").write_bytes(_png(i))
    out = tmp_path / "out"
    extract(_cfg(imgs, out, layer="0,1"))
    with pytest.raises(ShardError, match=rf"several-layer extraction .*{out}/layer_0, {out}/layer_1"):
        ShardSet(out)
    shutil.rmtree(out / "layer_1")
    with pytest.raises(ShardError, match="not a shard set") as e:
        ShardSet(tmp_path / "imgs")
    assert "several-layer" not in str(e.value)
