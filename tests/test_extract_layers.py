"""Several layers from one extraction pass (issue 13 item 4): ``visae extract --layer 0,2`` / ``--layer all``.

Each multi-layer set is compared row for row with a single-layer run of the same block (same images, same batches).
Tolerance (``_assert_same_rows``): the forward pass is the same float operations in both paths by construction
(``Backbone.encode_layers`` hooks the same block modules; ``tests/test_extract.py`` checks it bit for bit), so the
raw activations agree; the code after it differs (one writer per layer, a contiguous copy of the rows). Where the
two paths could still round differently is the storage pipeline of a row: the float64 norm (d terms, relative
error ~d·u64, negligible), its cast to float32 (1 rounding), the division (1 rounding) and the cast to the float16
storage dtype (1 rounding). The float32 roundings (3·u32 = 1.8e-7) are far below one float16 rounding (u16 = 4.9e-4),
so two evaluations may land on adjacent float16 values at most: |diff| <= 2·gamma_2(float16)·|value|. Stored
float32 norms: one rounding of a float64 norm each, 2·gamma_2(float32)·norm. (Measured: the rows are equal bit for bit.)
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tolerances import assert_close_derived
from visae.backbones import TINY_CLIP_NAME, load_backbone
from visae.config import ConfigError, config_from_dict, parse_config
from visae.extract import LAYERS_INDEX, ExtractConfig, _SimulatedKill, extract, main, read_skipped
from visae.shards import MANIFEST, ShardError, ShardSet


def _img(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY_CLIP_NAME, random_init=True)  # 3 blocks, 32 px, 16 patches


@pytest.fixture()
def folder(tmp_path) -> Path:
    """9 images in two class folders and one that cannot be decoded."""
    root = tmp_path / "imgs"
    for i in range(9):
        sub = root / ("cats" if i % 2 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        _img(i, (30 + 3 * i, 20 + 5 * i)).save(sub / f"im{i}.png")
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(200)))
    return root


def _cfg(images, out, **kw) -> ExtractConfig:
    base = dict(images=str(images), out=str(out), model=TINY_CLIP_NAME, random_init=True, batch_size=4,
                num_workers=0, progress=False, folder_labels=True)
    base.update(kw)
    return ExtractConfig(**base)


def _assert_same_rows(got: ShardSet, ref: ShardSet, what: str) -> None:
    """Same ids, labels, norms and stored rows (tolerances derived in the module docstring)."""
    assert len(got) == len(ref), (what, len(got), len(ref))
    gm, rm = got.metadata(), ref.metadata()
    assert list(gm["id"]) == list(rm["id"]) and list(gm["label"]) == list(rm["label"]), what
    assert_close_derived(gm["norm"], rm["norm"], n_terms=2, scale=np.abs(rm["norm"]), dtype=torch.float32,
                         computations=2, msg=f"{what}: norms")
    idx = np.arange(len(ref))
    ref_rows = ref.read(idx)
    assert_close_derived(got.read(idx), ref_rows, n_terms=2, scale=np.abs(ref_rows), dtype=torch.float16,
                         computations=2, msg=f"{what}: stored rows")


@pytest.mark.parametrize("token", ["cls", "patch"])
def test_all_layers_equal_single_layer_runs(folder, tmp_path, tiny, token):
    multi = extract(_cfg(folder, tmp_path / "multi", layer="all", token=token, shard_size=7))
    assert sorted(multi) == [0, 1, 2]
    rows = 9 * (16 if token == "patch" else 1)
    for L, spec in [(0, 0), (1, 1), (2, -1)]:  # the last block asked for as -1 in the single-layer run
        single = extract(_cfg(folder, tmp_path / f"single{L}", layer=spec, token=token, shard_size=7), backbone=tiny)
        got = multi[L]
        assert got.path == tmp_path / "multi" / f"layer_{L}" and len(got) == rows
        _assert_same_rows(got, single, f"layer {L} ({token})")
        s = got.source
        assert s["layer"] == L and s["layers"] == [0, 1, 2] and s["token"] == token
        assert s["read"] == single.source["read"] == f"residual_after_block_{L}"
        assert got.label_names == single.label_names and got.d == single.d == tiny.width
        assert read_skipped(got.path) == read_skipped(single.path) == read_skipped(tmp_path / "multi")
        assert list(read_skipped(got.path)) == ["dogs/broken.jpg"]
    index = json.loads((tmp_path / "multi" / LAYERS_INDEX).read_text())
    assert index["complete"] and index["layers"] == [0, 1, 2] and index["num_examples"] == rows
    assert index["sets"] == {"0": "layer_0", "1": "layer_1", "2": "layer_2"} and index["source"]["num_blocks"] == 3
    assert not (tmp_path / "multi" / MANIFEST).exists()  # the top directory is not itself a shard set
    rep = json.loads((tmp_path / "multi" / "extract_report.json").read_text())
    assert rep["items"] == 10 and rep["rows"] == rows and rep["skipped"] == 1 and rep["config"]["layer"] == "all"
    # a rerun of the finished request returns it; the same blocks spelled with negative indices too
    again = extract(_cfg(folder, tmp_path / "multi", layer="0,-2,-1", token=token, shard_size=7))
    assert sorted(again) == [0, 1, 2] and all(len(v) == rows for v in again.values())


def test_blocks_after_the_deepest_are_not_run(folder, tmp_path, tiny):
    """--layer 0,1 of a 3-block model: block 2 never runs (its hook would raise)."""
    def boom(*_):
        raise AssertionError("block 2 ran")

    h = tiny.blocks[2].register_forward_hook(boom)
    try:
        got = extract(_cfg(folder, tmp_path / "out", layer="1,0", limit=5), backbone=tiny)
    finally:
        h.remove()
    assert sorted(got) == [0, 1] and len(got[0]) == len(got[1]) == 4  # the first 5 items hold dogs/broken.jpg
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["layer_0", "layer_1"]


def _roll_back_last_shard(set_dir: Path) -> None:
    """The state a kill leaves when it came after another layer's commit of a shard and before this layer's:
    the manifest without its last shard (the shard's files stay as debris), not complete."""
    m = json.loads((set_dir / MANIFEST).read_text())
    last = m["shards"].pop()
    m["num_examples"] -= last["count"]
    m["complete"] = False
    (set_dir / MANIFEST).write_text(json.dumps(m))


def test_resume_after_kill_equals_uninterrupted(folder, tmp_path, tiny):
    kw = dict(layer="0,2", token="patch", shard_size=20, batch_size=2)
    full = extract(_cfg(folder, tmp_path / "full", **kw), backbone=tiny)
    out = tmp_path / "resumed"
    with pytest.raises(_SimulatedKill):
        extract(_cfg(folder, out, **kw), backbone=tiny, _fail_after_batches=3)
    assert not (out / LAYERS_INDEX).exists()
    parts = {L: ShardSet(out / f"layer_{L}", require_complete=False) for L in (0, 2)}
    assert all(not p.manifest["complete"] and 0 < len(p) < len(full[0]) for p in parts.values())
    with pytest.raises(ShardError, match="not complete|complete"):
        ShardSet(out / "layer_0")  # an interrupted layer set is refused by readers
    # the layers stopped at different commit points: layer 2 lost its last shard
    _roll_back_last_shard(out / "layer_2")
    assert len(ShardSet(out / "layer_2", require_complete=False)) < len(ShardSet(out / "layer_0", require_complete=False))
    # another layer list into the interrupted output is refused (the sets record the whole request)
    with pytest.raises(ShardError, match="cannot resume"):
        extract(_cfg(folder, out, **dict(kw, layer="0,1")), backbone=tiny)
    res = extract(_cfg(folder, out, **kw), backbone=tiny)
    for L in (0, 2):
        _assert_same_rows(res[L], full[L], f"resumed layer {L}")
        # same command, same batches: the shard files are the same bytes as the uninterrupted run's
        for f in sorted((full[L].path).glob("shard_*")):
            assert (res[L].path / f.name).read_bytes() == f.read_bytes(), f.name
    assert read_skipped(out) == read_skipped(tmp_path / "full") and len(read_skipped(out)) == 1
    assert (out / "skipped.jsonl").read_text().count("\n") == 1  # not logged again by the rerun


def test_kill_while_completing_the_layers(folder, tmp_path, tiny):
    """Killed after layer 0 was marked complete and before layer 2 (its last short shard not yet written): the
    rerun completes layer 2 from its own commit point and writes the index; layer 0 is left as it is."""
    kw = dict(layer="0,2", token="cls", shard_size=4, batch_size=4)
    full = extract(_cfg(folder, tmp_path / "full", **kw), backbone=tiny)
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "full", out)
    (out / LAYERS_INDEX).unlink()
    _roll_back_last_shard(out / "layer_2")
    before = (out / "layer_0" / MANIFEST).read_bytes()
    res = extract(_cfg(folder, out, **kw), backbone=tiny)
    assert (out / "layer_0" / MANIFEST).read_bytes() == before and (out / LAYERS_INDEX).is_file()
    for L in (0, 2):
        _assert_same_rows(res[L], full[L], f"completed layer {L}")


@pytest.mark.parametrize("spec, message", [
    ("0,0", "block 0 given more than once"),
    ("0,,2", "empty entry"),
    ("1,x", "'x' is not an integer"),
    ("0,3", "block 3 out of range; visae-tiny-test has 3 blocks"),
    ("-4,0", "block -4 out of range"),
    ("2,-1", "2 and -1 name the same block 2"),
])
def test_bad_layer_lists_exit_2_before_writing(folder, tmp_path, capsys, spec, message):
    out = tmp_path / "out"
    rc = main(["--images", str(folder), "--out", str(out), "--model", TINY_CLIP_NAME, "--random_init",
               f"--layer={spec}", "--num_workers", "0", "--no_progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("visae extract: error: --layer"), err
    assert not out.exists()  # nothing written, not even the directory the lock would have made


def test_layer_flag_and_yaml_forms():
    """--layer 8 and --layer -1 stay one block (int, today's layout); lists and all are several; null is unset."""
    def parse(*argv):
        return parse_config(ExtractConfig, list(argv), prog="visae extract").layer

    assert parse("--layer", "8") == 8 and parse("--layer", "-1") == -1 and parse() is None
    assert parse("--layer", "4,8,11") == "4,8,11" and parse("--layer", "all") == "all"
    assert parse("--layer=-1,4") == "-1,4" and parse("--layer", "null") is None and parse("--layer", "4, 8") == "4,8"
    assert config_from_dict(ExtractConfig, {"layer": [4, 8, 11]}).layer == "4,8,11"
    assert config_from_dict(ExtractConfig, {"layer": "7"}).layer == 7
    with pytest.raises(ConfigError, match="given more than once"):
        parse("--layer", "4,8,4")


def test_layouts_do_not_mix(folder, tmp_path, tiny):
    """A single-layer output is not resumed as a several-layer one, nor the other way round (--overwrite replaces)."""
    extract(_cfg(folder, tmp_path / "one", layer=1, limit=3), backbone=tiny)
    with pytest.raises(ShardError, match="holds a single-layer extraction"):
        extract(_cfg(folder, tmp_path / "one", layer="0,1", limit=3), backbone=tiny)
    multi = extract(_cfg(folder, tmp_path / "one", layer="0,1", limit=3, overwrite=True), backbone=tiny)
    assert sorted(multi) == [0, 1] and not (tmp_path / "one" / MANIFEST).exists()
    with pytest.raises(ShardError, match="holds a several-layer extraction"):
        extract(_cfg(folder, tmp_path / "one", layer=1, limit=3), backbone=tiny)
    with pytest.raises(ShardError, match="something else"):  # a finished several-layer output, another list
        extract(_cfg(folder, tmp_path / "one", layer="0,2", limit=3), backbone=tiny)
    with pytest.raises(ShardError, match="dtype: 'float16' on disk, 'float32' now"):  # or another storage dtype
        extract(_cfg(folder, tmp_path / "one", layer="0,1", limit=3, dtype="float32"), backbone=tiny)
    single = extract(_cfg(folder, tmp_path / "one", layer=1, limit=3, overwrite=True), backbone=tiny)
    assert len(single) == 3 and not list((tmp_path / "one").glob("layer_*")) and not (tmp_path / "one" / LAYERS_INDEX).exists()


@pytest.mark.slow  # two torchrun processes: ~15 s of start-up alone
def test_torchrun_two_ranks_several_layers_equal_one_rank(folder, tmp_path, tiny):
    """Two ranks (gloo, CPU) split the images; rank 0 merges every layer's parts: the same rows as one process."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    one = extract(_cfg(folder, tmp_path / "one", layer="0,2", batch_size=2, shard_size=3), backbone=tiny)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(repo / "scripts" / "extract_features.py"), "--images", str(folder), "--out", str(tmp_path / "two"),
           "--model", TINY_CLIP_NAME, "--random_init", "--folder_labels", "--layer", "0,2", "--batch_size", "2",
           "--shard_size", "3", "--num_workers", "0", "--no_progress", "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    two = tmp_path / "two"
    for L in (0, 2):
        # LEFT without a derived bound, as test_extract's two-rank test: the ranks batch the images differently
        # from one process, and float32 transformer rows of different batch compositions have no useful bound
        got, ref = ShardSet(two / f"layer_{L}"), one[L]
        assert list(got.metadata()["id"]) == list(ref.metadata()["id"]) and list(got.metadata()["label"]) == list(ref.metadata()["label"])
        assert np.allclose(got.read(np.arange(len(got))), ref.read(np.arange(len(ref))), atol=1e-3)
        assert got.source["layer"] == L and read_skipped(got.path) == read_skipped(ref.path)
    assert json.loads((two / LAYERS_INDEX).read_text())["layers"] == [0, 2]
    assert not list(two.glob("rank_*")) and not list(two.glob(".merge_*")) and not (two / MANIFEST).exists()
    rep = json.loads((two / "extract_report.json").read_text())
    assert rep["world_size"] == 2 and rep["rows"] == len(one[0]) and rep["skipped"] == 1
