"""visae.images sources: every image read exactly once whatever the layout (symlink loops, links to
files already read, repeated tar members, orphan labels), and ids that lead back to their file even
when the file name is not valid UTF-8."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from visae.images import decode_id, encode_id, load_image, open_source


def _png(colour) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(b, "PNG")
    return b.getvalue()


def _folder(tmp_path, n=3):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(n):
        (root / f"img{i}.png").write_bytes(_png((40 * i, 0, 0)))
    return root


def test_symlink_loop_is_read_once_and_counted(tmp_path):
    root = _folder(tmp_path)
    (root / "loop").symlink_to(root)
    src = open_source(root, "folder")
    good = [it for it in src.items if not it.error]
    bad = [it for it in src.items if it.error]
    assert sorted(it.id for it in good) == ["img0.png", "img1.png", "img2.png"]
    assert [it.id for it in bad] == ["loop/"] and "already read" in bad[0].error


def test_links_to_files_already_read_are_counted_repeats(tmp_path):
    root = _folder(tmp_path)
    (root / "zz_link.png").symlink_to(root / "img1.png")
    os.link(root / "img2.png", root / "zz_hard.png")
    (root / "dangling.png").symlink_to(root / "missing.png")
    src = open_source(root, "folder")
    errs = {it.id: it.error for it in src.items if it.error}
    assert set(errs) == {"zz_link.png", "zz_hard.png", "dangling.png"}
    assert "'img1.png'" in errs["zz_link.png"] and "'img2.png'" in errs["zz_hard.png"]
    assert sum(not it.error for it in src.items) == 3


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_repeated_tar_member_is_skipped_not_merged(tmp_path):
    tar = tmp_path / "a.tar"
    _tar(tar, [("sample_0.png", _png((255, 0, 0))), ("sample_0.cls", b"1"),
               ("sample_0.png", _png((0, 0, 255))), ("sample_0.cls", b"3"),
               ("sample_1.png", _png((0, 255, 0))), ("sample_1.cls", b"2"),
               ("sample_2.cls", b"4"),  # an orphan label
               ("sample_3.png", _png((9, 9, 9)))])  # a missing label in a labelled set
    src = open_source(tar, "webdataset")
    by_id = {it.id: it for it in src.items}
    img, label, err = load_image(by_id["sample_0"])
    assert err == "" and label == 1 and np.asarray(img)[0, 0].tolist() == [255, 0, 0]  # red keeps its own label
    assert load_image(by_id["sample_1"])[1:] == (2, "")
    errors = [it.error for it in src.items if it.error]
    assert sum("repeated member name 'sample_0.png'" in e for e in errors) == 1
    assert sum("repeated member name 'sample_0.cls'" in e for e in errors) == 1
    assert "orphan label" in by_id["sample_2"].error
    assert "no cls member" in by_id["sample_3"].error
    assert len(errors) == 4


def test_id_escape_round_trips_any_name():
    for name in ["plain/a.jpg", "caf\udce9.jpg", "%b:looks-escaped.jpg", "tab\tand\nnewline.png", "\u00e9t\u00e9/x.png",
                 "100%.png"]:
        sid = encode_id(name)
        sid.encode("utf-8")  # always valid UTF-8 (JSON, CSV, HTML)
        assert decode_id(sid) == name
    assert encode_id("plain/a.jpg") == "plain/a.jpg" and encode_id("caf\udce9.jpg") == "%b:caf%E9.jpg"


def test_non_utf8_file_name_survives_extraction_json_and_thumbnails(tmp_path):
    """A Latin-1 file name: extracted, stored as an escaped id, written to JSON, and its thumbnail found."""
    from visae.backbones import register_tiny_clip
    from visae.browse.images import ImageResolver, make_thumbnails
    from visae.extract import ExtractConfig, extract

    root = _folder(tmp_path, n=2)
    raw = os.path.join(os.fsencode(root), b"caf\xe9.png")
    with open(raw, "wb") as f:
        f.write(_png((0, 200, 0)))
    out = tmp_path / "shards"
    ss = extract(ExtractConfig(model=register_tiny_clip(), random_init=True, images=str(root), out=str(out),
                               batch_size=4, num_workers=0, device="cpu", progress=False))
    ids = [str(i) for i in ss.metadata()["id"]]
    assert "%b:caf%E9.png" in ids and len(ids) == 3
    json.dumps(ids).encode("utf-8")
    thumbs = make_thumbnails(ImageResolver(ss.source), ids, tmp_path / "thumbs", size=16, workers=1, progress=False)
    assert thumbs["%b:caf%E9.png"] is not None


def test_a_file_named_tar_that_holds_no_tar_is_an_error_naming_it(tmp_path):
    """Issue 11 (bad-input corpus): garbage named .tar gave exit 0 and an empty shard set; now a SourceError."""
    import pytest

    from visae.images import SourceError

    bad = tmp_path / "d.tar"
    bad.write_text("not a tar\n" * 100)
    with pytest.raises(SourceError, match=r"d\.tar: the tar shards hold no samples .*not a readable tar file"):
        open_source(str(bad), "webdataset")
