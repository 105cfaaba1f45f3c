"""Feature extraction: sources, read-outs, norms, resumption, bad inputs, torchrun, CLI."""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tolerances import assert_close_derived
from visae.backbones import TINY_CLIP_NAME, load_backbone
from visae.extract import ExtractConfig, _SimulatedKill, extract, main, read_skipped
from visae.images import imagenet_classnames, imagenet_wnids, load_image, open_source, rank_bounds
from visae.shards import ShardSet

REPO = Path(__file__).resolve().parents[1]


def _img(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _jpeg_bytes(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=90)
    return b.getvalue()


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY_CLIP_NAME, random_init=True)


@pytest.fixture()
def folder(tmp_path) -> Path:
    """9 images in nested folders, two classes, mixed formats and sizes."""
    root = tmp_path / "imgs"
    for i in range(9):
        sub = root / ("cats" if i % 2 else "dogs") / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        ext = ".png" if i % 4 == 0 else ".jpg"
        _img(i, (30 + 3 * i, 20 + 5 * i)).save(sub / f"im{i}{ext}")
    (root / "notes.txt").write_text("not an image")
    return root


def _cfg(images, out, **kw) -> ExtractConfig:
    base = dict(images=str(images), out=str(out), model=TINY_CLIP_NAME, random_init=True, batch_size=4,
                num_workers=0, progress=False, dtype="float32")
    base.update(kw)
    return ExtractConfig(**base)


def _direct(bb, items, layer=None, token="cls", batch_size=4) -> torch.Tensor:
    """bb.features of ``items`` in the batches extraction uses (``batch_size``, no skipped items): float32 rows
    of a transformer depend in their last bits on the batch they ran in, so the same batches give the same bits."""
    with torch.inference_mode():
        x = torch.stack([bb.preprocess(load_image(it)[0]) for it in items])
        return torch.cat([bb.features(x[i:i + batch_size], layer, token) for i in range(0, len(x), batch_size)])


def _assert_raw_rows(got_raw, direct, what):
    """Stored rows read back raw vs the same features computed directly (same batches, so the same float32 bits):
    unit-norm storage divides by the float64 norm rounded to float32 and ``read(raw=True)`` multiplies by it again,
    so each element went through 3 roundings of its own size (norm cast, divide, multiply)."""
    assert_close_derived(got_raw, direct, n_terms=3, scale=np.abs(np.asarray(direct, dtype=np.float64)),
                         dtype=torch.float32, computations=1, msg=what)


# ----------------------------------------------------------------------------- sources


def test_folder_source(folder):
    src = open_source(folder)
    assert src.kind == "folder" and len(src) == 9
    ids = [it.id for it in src.items]
    assert ids == sorted(ids) and "cats/im1.jpg" in ids and "dogs/deep/im0.png" in ids
    assert all(it.label == -1 for it in src.items)
    lab = open_source(folder, folder_labels=True)
    assert lab.label_names["label"] == ["cats", "dogs"]
    assert {it.id: it.label for it in lab.items}["cats/im1.jpg"] == 0
    assert {it.id: it.label for it in lab.items}["dogs/deep/im0.png"] == 1


def test_imagenet_source_and_class_order(tmp_path, imagenet_sample):
    wnids, names = imagenet_wnids(), imagenet_classnames()
    files = sorted(p.name for p in imagenet_sample.glob("*.JPEG"))
    assert [f.split("_", 1)[0] for f in files] == wnids  # the shipped list is the sample's 1000 wnids
    # open_clip's cleaned class names line up with the sorted wnids: the sample's file names
    # (original synset names) agree for most classes, and for none when shifted by one
    def agree(shift):
        return np.mean([f.split("_", 1)[1].rsplit(".", 1)[0].replace("_", " ").lower() == names[(i + shift) % 1000].lower()
                        for i, f in enumerate(files)])
    assert agree(0) > 0.65 and agree(1) < 0.02
    # flat <wnid>_<name>.JPEG layout
    flat = tmp_path / "flat"
    flat.mkdir()
    pick = [files[0], files[1], files[500], files[999]]
    for f in pick:
        shutil.copy(imagenet_sample / f, flat / f)
    src = open_source(flat)
    assert src.kind == "imagenet" and [it.label for it in src.items] == [0, 1, 500, 999]
    assert src.label_names["label"][999] == names[999]
    # wnid sub-folder layout
    nested = tmp_path / "nested"
    for f in pick:
        (nested / f.split("_", 1)[0]).mkdir(parents=True)
        shutil.copy(imagenet_sample / f, nested / f.split("_", 1)[0] / "x.JPEG")
    src2 = open_source(nested, "imagenet")
    assert [it.label for it in src2.items] == [0, 1, 500, 999]
    (nested / "stray.jpg").write_bytes((imagenet_sample / files[3]).read_bytes())
    with pytest.raises(ValueError, match="no ImageNet wnid"):
        open_source(nested, "imagenet")


def _write_tar(path: Path, samples: list[tuple[str, bytes | None, int | None]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, jpg, cls in samples:
            for ext, data in (("jpg", jpg), ("cls", None if cls is None else str(cls).encode())):
                if data is None:
                    continue
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


@pytest.fixture()
def tars(tmp_path) -> Path:
    d = tmp_path / "wds"
    d.mkdir()
    k = 0
    for t, n in enumerate([3, 4, 2]):
        _write_tar(d / f"part-{t:03d}.tar", [(f"s{(k := k + 1):04d}", _jpeg_bytes(_img(100 + k)), k % 5) for _ in range(n)])
    return d


def test_webdataset_source(tars, tmp_path):
    src = open_source(str(tars / "part-{000..002}.tar"))
    assert src.kind == "webdataset" and len(src) == 9
    assert [it.id for it in src.items] == [f"s{i:04d}" for i in range(1, 10)]
    assert src.boundaries == [0, 3, 7]
    img, label, err = load_image(src.items[4])
    assert err == "" and img.size == (40, 30) and label == 5 % 5
    # directory and glob forms give the same items; ranks get whole tars, disjoint, in order
    assert [it.id for it in open_source(tars).items] == [it.id for it in src.items]
    assert [it.id for it in open_source(str(tars / "part-*.tar")).items] == [it.id for it in src.items]
    b = [rank_bounds(src, r, 2) for r in range(2)]
    assert b[0][0] == 0 and b[0][1] == b[1][0] and b[1][1] == 9 and b[0][1] in (3, 7)
    # keys repeated across shards get the shard name as prefix
    dup = tmp_path / "dup"
    dup.mkdir()
    for t in range(2):
        _write_tar(dup / f"d{t}.tar", [("a", _jpeg_bytes(_img(t)), None)])
    assert [it.id for it in open_source(dup).items] == ["d0.tar/a", "d1.tar/a"]


def _toyworld(root: Path, n=6) -> Path:
    (root / "images").mkdir(parents=True)
    factors = {"shape": ["circle", "square", "star"], "colour": ["red", "green"], "colour_shape": [f"{c} {s}" for c in ["red", "green"] for s in ["circle", "square", "star"]]}
    (root / "world.json").write_text(json.dumps({"format": "visae.toyworld", "version": 1, "factors": factors, "n": n, "seed": 3, "label": "colour_shape"}))
    lines = []
    for i in range(n):
        s, c = i % 3, (i // 3) % 2
        _img(i, (16, 16)).save(root / "images" / f"{i:06d}.png")
        lines.append(json.dumps({"id": f"{i:06d}", "file": f"images/{i:06d}.png", "factors": {"shape": s, "colour": c, "colour_shape": c * 3 + s},
                                 "captions": ["x"]}))
    (root / "world.jsonl").write_text("\n".join(reversed(lines)) + "\n")  # order on disk does not matter
    return root


def test_toyworld_source_and_extraction(tmp_path, tiny):
    world = _toyworld(tmp_path / "world")
    src = open_source(world)
    assert src.kind == "toyworld" and [it.id for it in src.items] == [f"{i:06d}" for i in range(6)]
    assert src.columns == {"shape": "int64", "colour": "int64", "colour_shape": "int64"}
    ss = extract(_cfg(world, tmp_path / "out"))
    meta = ss.metadata()
    assert list(meta["shape"]) == [i % 3 for i in range(6)] and list(meta["colour"]) == [(i // 3) % 2 for i in range(6)]
    assert list(meta["label"]) == [((i // 3) % 2) * 3 + i % 3 for i in range(6)]
    assert ss.label_names["shape"] == ["circle", "square", "star"] and ss.label_names["label"][4] == "green square"
    assert ss.source["dataset_kind"] == "toyworld"


# ----------------------------------------------------------------------------- read-outs and values


def test_embedding_norms_and_raw_values(folder, tmp_path, tiny):
    ss = extract(_cfg(folder, tmp_path / "out", folder_labels=True))
    src = open_source(folder, folder_labels=True)
    assert len(ss) == 9 and ss.d == tiny.embed_dim and ss.manifest["complete"]
    meta = ss.metadata()
    assert list(meta["id"]) == [it.id for it in src.items]
    assert list(meta["label"]) == [it.label for it in src.items]
    unit = ss.read(np.arange(9))
    # float32 norm of rows x / |x| (2 roundings each): d squares summed, a sqrt, vs exactly 1
    assert_close_derived(np.linalg.norm(unit, axis=1), np.ones(9), n_terms=ss.d + 3, scale=1.0,
                         dtype=torch.float32, computations=1, msg="norm of the unit rows")
    direct = _direct(tiny, src.items).numpy()
    # the stored norm is the float64 norm of the same float32 rows (the same bits: same batches)
    assert_close_derived(meta["norm"], np.linalg.norm(direct.astype(np.float64), axis=1), n_terms=1,
                         scale=np.linalg.norm(direct.astype(np.float64), axis=1), dtype=torch.float32,
                         computations=1, msg="stored norms")
    _assert_raw_rows(ss.read(np.arange(9), raw=True), direct, "raw rows")
    s = ss.source
    assert s["model"] == TINY_CLIP_NAME and s["random_init"] and s["layer"] is None and s["read"] == "image_embedding"
    assert s["dataset"] == str(folder.resolve()) and s["preprocess"]["mean"][0] == pytest.approx(0.48145466)
    rep = json.loads((tmp_path / "out" / "extract_report.json").read_text())
    assert rep["items"] == 9 and rep["rows"] == 9 and rep["skipped"] == 0


def test_the_report_records_its_paths_absolute(folder, tmp_path, monkeypatch):
    """extract_report.json recorded --images / --out as typed (relative): it did not say which from elsewhere."""
    monkeypatch.chdir(tmp_path)
    extract(_cfg("imgs", "out", limit=2))
    rec = json.loads((tmp_path / "out" / "extract_report.json").read_text())["config"]
    assert rec["images"] == str(folder.resolve()) and rec["out"] == str(tmp_path / "out"), rec


@pytest.mark.parametrize("token", ["cls", "mean", "patch"])
def test_layer_tokens(folder, tmp_path, tiny, token):
    ss = extract(_cfg(folder, tmp_path / "out", layer=1, token=token, limit=5))
    items = open_source(folder).items[:5]
    direct = _direct(tiny, items, layer=1, token=token)
    P = 16  # 32x32 images, patch 8
    if token == "patch":
        assert direct.shape == (5, P, tiny.width)
        direct = direct.reshape(-1, tiny.width)
        assert len(ss) == 5 * P and list(ss.metadata()["id"][:3]) == [f"{items[0].id}#p{j}" for j in range(3)]
    else:
        assert len(ss) == 5
    assert ss.d == tiny.width and ss.source["token"] == token and ss.source["read"] == "residual_after_block_1"
    _assert_raw_rows(ss.read(np.arange(len(ss)), raw=True), direct.numpy(), f"raw {token} rows")


def test_timm_layer_extraction(folder, tmp_path):
    bb = load_backbone("timm:vit_tiny_patch16_224", random_init=True, model_kwargs={"img_size": 32, "patch_size": 8, "depth": 3})
    ss = extract(_cfg(folder, tmp_path / "out", model="timm:vit_tiny_patch16_224", layer=2, token="mean", limit=3), backbone=bb)
    assert len(ss) == 3 and ss.d == 192 and ss.source["model"] == "timm:vit_tiny_patch16_224"
    direct = _direct(bb, open_source(folder).items[:3], layer=2, token="mean").numpy()
    _assert_raw_rows(ss.read(np.arange(3), raw=True), direct, "raw timm rows")


# ----------------------------------------------------------------------------- bad inputs, resumption


def _add_bad_images(root: Path) -> list[str]:
    good = _jpeg_bytes(_img(7, (64, 64)))
    (root / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    (root / "aa_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "cats" / "empty.png").write_bytes(b"")
    return ["aa_truncated.jpg", "cats/empty.png", "zz_corrupt.jpg"]


def test_bad_images_skipped_and_reported(folder, tmp_path, capsys):
    bad = _add_bad_images(folder)
    out = tmp_path / "out"
    rc = main(["--images", str(folder), "--out", str(out), "--model", TINY_CLIP_NAME, "--random_init",
               "--num_workers", "2", "--batch_size", "3", "--no_progress"])
    assert rc == 0
    ss = ShardSet(out, require_complete=True)
    assert len(ss) == 9 and not set(bad) & set(ss.metadata()["id"])
    skipped = read_skipped(out)
    assert sorted(skipped) == bad and all(skipped.values())
    assert "truncated" in skipped["aa_truncated.jpg"].lower()
    rep = json.loads((out / "extract_report.json").read_text())
    assert rep["skipped"] == 3 and rep["items"] == 12 and rep["skipped_file"] == "skipped.jsonl"
    assert "3 skipped" in capsys.readouterr().out


def test_truncated_tar_skipped_and_reported(tars, tmp_path):
    # cut the last tar in the middle of its second image: that sample is skipped, the rest kept
    last = tars / "part-002.tar"
    with tarfile.open(last) as tf:
        m = [ti for ti in tf.getmembers() if ti.name.endswith(".jpg")][1]
    data = last.read_bytes()[: m.offset_data + m.size // 2]
    last.write_bytes(data)
    # and a tar that is garbage after its first member header block
    g = tars / "part-003.tar"
    _write_tar(g, [("s0100", _jpeg_bytes(_img(1)), 1), ("s0101", _jpeg_bytes(_img(2)), 2)])
    raw = bytearray(g.read_bytes())
    with tarfile.open(g) as tf:
        second = tf.getmembers()[2]
    raw[second.offset:second.offset + 512] = os.urandom(512)
    g.write_bytes(bytes(raw))
    ss = extract(_cfg(tars, tmp_path / "out", batch_size=4))
    ids = list(ss.metadata()["id"])
    skipped = read_skipped(tmp_path / "out")
    assert "s0009" in skipped and "truncated" in skipped["s0009"]
    assert "part-002.tar#unreadable-0" in skipped and "part-003.tar#unreadable-0" in skipped
    assert "damaged tar header" in skipped["part-003.tar#unreadable-0"]
    assert ids == [f"s{i:04d}" for i in range(1, 9)] + ["s0100"]
    assert list(ss.metadata()["label"][:3]) == [1, 2, 3]
    assert json.loads((tmp_path / "out" / "extract_report.json").read_text())["skipped"] == len(skipped) == 3


@pytest.mark.parametrize("token, layer, shard_size, kill_after", [("cls", None, 3, 3), ("patch", 0, 20, 3)])
def test_resume_after_kill_equals_uninterrupted(folder, tmp_path, token, layer, shard_size, kill_after):
    _add_bad_images(folder)
    kw = dict(layer=layer, token=token, shard_size=shard_size, batch_size=2, num_workers=2)
    full = extract(_cfg(folder, tmp_path / "full", **kw))
    out = tmp_path / "resumed"
    with pytest.raises(_SimulatedKill):
        extract(_cfg(folder, out, **kw), _fail_after_batches=kill_after)
    part = ShardSet(out, require_complete=False)
    assert not part.manifest["complete"] and 0 < len(part) < len(full)
    if token == "patch":  # the kill fell inside an image's patch rows: the rerun must finish that image
        last = str(part.metadata()["id"][-1])
        assert "#p" in last and not last.endswith("#p15")
    # rerun the same command (different batch size / workers are fine): continues after the last committed row
    res = extract(_cfg(folder, out, **dict(kw, batch_size=3, num_workers=0)))
    assert len(res) == len(full)
    assert list(res.metadata()["id"]) == list(full.metadata()["id"])
    # (batches are composed differently after a resume: equal up to float32 batching noise). LEFT as it was
    # (issue 10): float32 transformer rows from different batch compositions have no useful derived bound.
    assert np.allclose(res.read(np.arange(len(res)), raw=True), full.read(np.arange(len(full)), raw=True), rtol=1e-5, atol=1e-6)
    assert read_skipped(out) == read_skipped(tmp_path / "full") and len(read_skipped(out)) == 3
    # a third run of a finished output does nothing and returns it
    again = extract(_cfg(folder, out, **kw))
    assert len(again) == len(full)
    # ... but refuses another request into the same directory, storage included (a finished float16 set was
    # returned for --dtype float16 (or the other way), and one of another --shard_size as is: the newcomer's report)
    with pytest.raises(ValueError, match="something else"):
        extract(_cfg(folder, out, layer=1, token="mean"))
    with pytest.raises(ValueError, match="dtype: 'float32' on disk, 'float16' now"):
        extract(_cfg(folder, out, **dict(kw, dtype="float16")))
    with pytest.raises(ValueError, match=f"shard_size: {shard_size} on disk, {shard_size + 1} now"):
        extract(_cfg(folder, out, **dict(kw, shard_size=shard_size + 1)))
    with pytest.raises(ValueError, match="seed: 0 on disk, 1 now"):  # other random weights
        extract(_cfg(folder, out, **dict(kw, seed=1)))


def test_a_finished_output_of_other_weights_is_refused_not_returned(tmp_path, monkeypatch):
    """The weights a finished output was made with are part of the request: a rerun with another weights file got
    the old rows back with "wrote ..." (the newcomer's report); the same file named relatively or absolutely, a tag
    against the same tag, and the default weights against the name a backbone records for them are the same."""
    from visae.extract import _same_request

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    cfg = _cfg(tmp_path, tmp_path / "out", model="visae-toyclip2", random_init=False, pretrained=str(a))
    src = {"model": "visae-toyclip2", "random_init": False, "layer": None, "token": None, "dataset": "d", "limit": None}
    assert _same_request({**src, "pretrained": str(a)}, cfg, "d") == []
    monkeypatch.chdir(tmp_path)
    assert _same_request({**src, "pretrained": "a.safetensors"}, cfg, "d") == []
    assert _same_request({**src, "pretrained": str(b)}, cfg, "d") == [f"pretrained: {str(b)!r} on disk, {str(a)!r} now"]
    assert _same_request({**src, "pretrained": "shipped"}, cfg, "d") != []  # the shipped weights, now a file
    default = dataclasses.replace(cfg, pretrained=None)
    assert _same_request({**src, "pretrained": "shipped"}, default, "d") == []
    assert _same_request({**src, "pretrained": str(a)}, default, "d") != []  # a file, now the default
    tagged = dataclasses.replace(cfg, model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    src32 = {**src, "model": "ViT-B-32"}
    assert _same_request({**src32, "pretrained": "laion2b_s34b_b79k"}, tagged, "d") == []
    assert _same_request({**src32, "pretrained": "openai"}, tagged, "d") != []


def test_torchrun_two_ranks_equal_one_rank(tars, tmp_path):
    one = extract(_cfg(tars, tmp_path / "one", batch_size=2, shard_size=2))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "scripts" / "extract_features.py"), "--images", str(tars), "--out", str(tmp_path / "two"),
           "--model", TINY_CLIP_NAME, "--random_init", "--batch_size", "2", "--shard_size", "2",
           "--num_workers", "0", "--dtype", "float32", "--no_progress", "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    two = ShardSet(tmp_path / "two", require_complete=True)
    assert list(two.metadata()["id"]) == list(one.metadata()["id"])
    assert list(two.metadata()["label"]) == list(one.metadata()["label"])
    # LEFT as it was (issue 10): two ranks batch the rows differently from one, and float32 transformer rows
    # from different batch compositions have no useful derived bound
    assert np.allclose(two.read(np.arange(len(two))), one.read(np.arange(len(one))), atol=1e-5)
    assert not list((tmp_path / "two").glob("rank_*")) and not list((tmp_path / "two").glob(".merge_*"))
    rep = json.loads((tmp_path / "two" / "extract_report.json").read_text())
    # rank 0 took tar 0 (3 samples), rank 1 tars 1-2 (6): whole files, disjoint
    assert rep["world_size"] == 2 and [r["items"] for r in rep["ranks"]] == [3, 6] and rep["rows"] == 9


def test_cli_offline_pretrained_fails_fast(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rc = main(["--images", str(folder), "--out", str(tmp_path / "o"), "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"])
    err = capsys.readouterr().err
    # exit 1: the command is right, the machine is offline without the weights (visae.errors)
    assert rc == 1 and "open_clip_pytorch_model.bin" in err and "--pretrained /path/to/" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_config_yaml_matches_defaults():
    from visae.config import load_yaml_config

    assert load_yaml_config(ExtractConfig, REPO / "configs" / "extract.yaml") == ExtractConfig()


def test_toyworld_from_generator_with_toyclip(tmp_path):
    """The real toy-world writer's output reads as a source; the toy CLIP extracts it with factor columns."""
    from visae import toyworld

    world = toyworld.generate_world(tmp_path / "world", n=6, seed=1, progress=False)
    meta, recs = toyworld.read_world(world)
    src = open_source(world)
    assert src.kind == "toyworld" and len(src) == 6 and set(src.columns) == set(meta["factors"])
    ss = extract(_cfg(world, tmp_path / "out", model="visae-toyclip", random_init=False))  # the shipped weights
    md = ss.metadata()
    by_id = {r["id"]: r for r in recs}
    for i, sid in enumerate(md["id"]):
        for f in meta["factors"]:
            assert md[f][i] == by_id[sid]["factors"].get(f, -1)
        assert md["label"][i] == by_id[sid]["factors"][meta["label"]]
    assert ss.d == 96 and ss.source["model"] == "visae-toyclip" and ss.label_names["label"] == meta["factors"][meta["label"]]
    assert ss.source["pretrained"] == "shipped" and not ss.source["random_init"]
    # same values as the toy CLIP's own loader and preprocessing
    from visae import toyclip

    model, preprocess, _ = toyclip.load_toyclip()
    with torch.inference_mode():
        x = torch.stack([preprocess(Image.open(world / by_id[sid]["file"]).convert("RGB")) for sid in md["id"]])
        ref = model.encode_image(x).numpy()
    # LEFT as it was (issue 10): the toy CLIP's own loader and the visae backbone are two implementations of the
    # float32 forward (measured 1.4e-6 apart), and float32 transformer rounding has no useful derived bound
    assert np.allclose(ss.read(np.arange(6), raw=True), ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- several layers from one pass (issue 13 item 4)


@pytest.mark.parametrize("family", ["open_clip", "timm"])
@pytest.mark.parametrize("token", ["cls", "patch", "mean"])
def test_encode_layers_equals_single_layer_passes_and_skips_later_blocks(family, token):
    """One forward with hooks on blocks 0, 1 (and 1 - n = 1 again) equals the single-layer passes. The bound is 0:
    the blocks up to the deepest run the same operations on the same inputs in both (the same hook mechanism stops
    the pass), so on a deterministic CPU every row is the same float32 bits. The blocks after block 1 never run."""
    from visae.backbones import load_backbone, register_tiny_clip

    if family == "open_clip":
        bb = load_backbone(register_tiny_clip(), random_init=True)
    else:
        bb = load_backbone("timm:vit_tiny_patch16_224", random_init=True,
                           model_kwargs={"img_size": 32, "patch_size": 8, "depth": 5})
    n = len(bb.blocks)
    assert n >= 3  # so that at least one block comes after the deepest requested one
    layers = [0, 1, 1 - n]
    x = torch.randn(3, 3, *bb.image_size, generator=torch.Generator().manual_seed(0))
    ran: list[int] = []
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, blk in enumerate(bb.blocks)]
    try:
        with torch.inference_mode():
            multi = bb.encode_layers(x, layers, token)
            ran_multi = sorted(set(ran))
            single = {bb.resolve_layer(layer): bb.encode_layer(x, layer, token) for layer in layers}
    finally:
        for h in hooks:
            h.remove()
    deepest = max(single)
    assert sorted(multi) == sorted(single) and ran_multi == list(range(deepest + 1)), (sorted(multi), ran_multi)
    for i in single:
        diff = (multi[i] - single[i]).abs().max().item()
        assert multi[i].shape == single[i].shape and torch.equal(multi[i], single[i]), (i, diff)
