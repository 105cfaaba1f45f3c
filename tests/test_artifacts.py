"""Issue 11 items 1, 5, 6, 8, 10: artifacts prove they are whole and the right ones; destructive steps only
after validation; one writer per output directory; multi-file results committed as one step.

Each test builds its small input here, asserts the outcome (a clear error naming the file, or the right
value) and that nothing already on disk was damaged (a hash of the output tree before and after; names
starting with "." -- the lock file, temporaries -- are not artifacts and are left out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from visae.atomic import OutputLockedError, output_lock, remove_stale_temps, temp_name
from visae.backbones import TINY_CLIP_NAME, load_backbone
from visae.sae import SAEConfig, SAEFormatError, build_sae, load_sae
from visae.shards import ShardError, ShardSet, ShardWriter


def tree_hash(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every artifact file under ``root`` (dot-names excluded)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _sae(d_in=8, d_sae=16, seed=0):
    return build_sae(SAEConfig(architecture="relu", d_in=d_in, d_sae=d_sae), generator=torch.Generator().manual_seed(seed))


def _unit_rows(n, d, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _write_shards(path: Path, n=100, d=8, source=None, shard_size=32, dtype="float32", seed=0) -> ShardSet:
    with ShardWriter(path, d, dtype=dtype, shard_size=shard_size, source=source or {}) as w:
        w.add(_unit_rows(n, d, seed), ids=[f"img{i}.png" for i in range(n)])
    return ShardSet(path)


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY_CLIP_NAME, random_init=True)


# ----------------------------------------------------------------------------- item 6: weights prove they are intact


def test_damaged_or_non_finite_weights_are_refused_naming_the_file(tmp_path):
    d = _sae().save(tmp_path / "sae", extra={"shards": {"source": {"model": "m"}}})
    doc = json.loads((d / "cfg.json").read_text())
    assert doc["checksums"]["weights.safetensors"]["bytes"] == (d / "weights.safetensors").stat().st_size
    good = tree_hash(d)
    w = d / "weights.safetensors"
    # a byte flipped inside the tensor data (past the header): loads silently without a checksum
    _flip(w, w.stat().st_size - 100)
    with pytest.raises(SAEFormatError, match=r"weights\.safetensors is damaged: its SHA-256 differs"):
        load_sae(d)
    # NaN weights with a consistent checksum (saved by a diverged run): refused, the tensor named
    bad = _sae()
    with torch.no_grad():
        bad.W_dec[0, 3, 1] = float("nan")
    bd = bad.save(tmp_path / "nan")
    with pytest.raises(SAEFormatError, match=r"nan/weights\.safetensors: tensor 'W_dec' holds 1 non-finite"):
        load_sae(bd)
    # an edited cfg.json (scale_factor changed: would load silently with other outputs)
    d2 = _sae().save(tmp_path / "edited")
    doc = json.loads((d2 / "cfg.json").read_text())
    doc["scale_factor"] = 2.0
    (d2 / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(SAEFormatError, match=r"edited/cfg\.json is damaged or was edited"):
        load_sae(d2)
    # nothing was written by the failed loads
    assert tree_hash(d) != good and set(tree_hash(d)) == set(good)


def test_sae_without_checksums_from_another_tool_loads_with_a_warning(tmp_path):
    from visae.naming import check_shards_for_sae

    d = _sae().save(tmp_path / "sae")
    doc = json.loads((d / "cfg.json").read_text())
    doc.pop("checksums")  # as a converter that writes visae's layout but records none
    (d / "cfg.json").write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="records no checksums"):
        sae = load_sae(d)
    assert torch.equal(sae.W_dec, _sae().W_dec)
    # and its unknown provenance is accepted with a warning against any shard set
    ss = _write_shards(tmp_path / "shards", source={"model": "ViT-B-32", "layer": None, "token": "cls"})
    with pytest.warns(UserWarning, match="provenance .* is unknown"):
        check_shards_for_sae(ss, None, "SAE x")


def test_damaged_checkpoint_is_refused(tmp_path):
    from visae.train import TrainError, load_checkpoint
    from visae.train.state import save_checkpoint

    path = tmp_path / "checkpoint" / "checkpoint.safetensors"
    tensors = {"sae.W_dec": torch.randn(1, 16, 8), "opt.step": torch.tensor([3.0])}
    save_checkpoint(path, tensors, {"step": 3})
    t, st = load_checkpoint(path)
    assert st == {"step": 3} and torch.equal(t["sae.W_dec"], tensors["sae.W_dec"])
    _flip(path, path.stat().st_size - 20)
    with pytest.raises(TrainError, match="checkpoint .*checkpoint.safetensors is damaged"):
        load_checkpoint(path)
    tensors["sae.W_dec"][0, 0, 0] = float("inf")
    save_checkpoint(path, tensors, {"step": 3})
    with pytest.raises(TrainError, match="tensor 'sae.W_dec' holds 1 non-finite"):
        load_checkpoint(path)


def test_shard_set_cheap_check_by_default_full_hash_on_request(tmp_path):
    # one shard of 1000 x 64 float32 = 256 000 bytes of data: the sampled digest reads 0-64 KiB, the middle
    # 64 KiB and the last 64 KiB; a byte at 70 000 lies in none of them
    ss = _write_shards(tmp_path / "s", n=1000, d=64, shard_size=1000)
    f = tmp_path / "s" / "shard_00000.acts.npy"
    rec = ss.manifest["shards"][0]["files"][".acts.npy"]
    assert rec["bytes"] == f.stat().st_size and len(rec["sha256"]) == 64
    ss.validate(full=False)
    ss.validate(full=True)
    _flip(f, 70_000)
    ShardSet(tmp_path / "s").validate(full=False)  # outside the sampled blocks: the cheap check cannot see it
    with pytest.raises(ShardError, match=r"shard_00000\.acts\.npy is damaged: its SHA-256 differs"):
        ShardSet(tmp_path / "s").validate(full=True)
    _flip(f, 70_000)  # back
    _flip(f, f.stat().st_size - 10)  # inside the last sampled block
    with pytest.raises(ShardError, match=r"shard_00000\.acts\.npy is damaged: its sampled digest differs"):
        ShardSet(tmp_path / "s").validate(full=False)
    # a truncated or extended file is caught on open, from the recorded size
    _flip(f, f.stat().st_size - 10)
    with open(f, "ab") as fh:
        fh.write(b"\0" * 8)
    with pytest.raises(ShardError, match=r"shard_00000\.acts\.npy is damaged: 256136 bytes, .* recorded 256128"):
        ShardSet(tmp_path / "s")


# ----------------------------------------------------------------------------- item 8: temporaries and locks


def test_stale_temp_files_are_removed_by_the_next_run_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    (out / "trials" / "a").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale_file = out / "trials" / "a" / f".weights.safetensors.{dead_pid}.0123abcd.tmp"
    stale_file.write_bytes(b"x" * 1000)
    stale_dir = out / f".best.{dead_pid}.89abcdef.tmp"
    (stale_dir / "sub").mkdir(parents=True)
    live = temp_name(out / "manifest.json")  # this process's: in use
    live.write_text("{}")
    keep = out / "trials" / "a" / "weights.safetensors"
    keep.write_bytes(b"w")
    with output_lock(out, "visae test"):
        assert not stale_file.exists() and not stale_dir.exists()
        assert live.exists() and keep.read_bytes() == b"w"
    assert remove_stale_temps(out) == []


_HOLD = """
import sys, time
from visae.atomic import output_lock
with output_lock(sys.argv[1], "visae sweep"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_of_the_same_out_is_refused(tmp_path):
    from visae.cli import main as cli_main
    from visae.sweep import SweepConfig, sweep
    from visae.train import TrainConfig, train

    shards = _write_shards(tmp_path / "shards", n=64, d=8)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = tree_hash(out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=r"run: another process is writing this output directory"):
            train(TrainConfig(shards=str(shards.path), out=str(out), num_epochs=1, progress=False, plot=False))
        with pytest.raises(OutputLockedError, match="give visae sweep another --out"):
            sweep(SweepConfig(out=str(out), train=TrainConfig(shards=str(shards.path), num_epochs=1, progress=False,
                                                              plot=False), lrs=(1e-3,), l1_coeffs=(1e-3,),
                              expansion_factors=(2,), select=False))
        assert cli_main(["train", "--shards", str(shards.path), "--out", str(out), "--num_epochs", "1"]) == 1
        # visae select locks the sweep it was given (--sweep): it has no --out to offer, so it says only to wait
        with pytest.raises(OutputLockedError, match=r"wait for it to finish$"):
            with output_lock(out, "visae select", flag=None):
                pass
        # within one process the lock is re-entrant (sweep selects under its own lock) -- tested by holding it twice
    finally:
        holder.kill()
        holder.wait()
    assert tree_hash(out) == before
    with output_lock(out), output_lock(out):  # released by the killed holder; re-entrant here
        pass


# ----------------------------------------------------------------------------- item 1: validate, then destroy


def _images(root: Path, n=5) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    return root


def test_extract_overwrite_with_bad_images_or_model_keeps_the_finished_shard_set(tmp_path, tiny):
    from visae.backbones import BackboneError, WeightsNotAvailableError
    from visae.extract import ExtractConfig, extract
    from visae.images import SourceError

    imgs = _images(tmp_path / "imgs")
    kw = dict(model=TINY_CLIP_NAME, random_init=True, batch_size=4, num_workers=0, progress=False, shard_size=2)
    bb = tiny
    ss = extract(ExtractConfig(images=str(imgs), out=str(tmp_path / "f"), **kw), backbone=bb)
    assert len(ss) == 5 and ss.num_shards == 3
    before = tree_hash(tmp_path / "f")
    with pytest.raises(SourceError):
        extract(ExtractConfig(images=str(tmp_path / "imgz"), out=str(tmp_path / "f"), overwrite=True, **kw),
                backbone=bb)
    assert tree_hash(tmp_path / "f") == before
    bad_model = {**kw, "model": "ViT-Nope-99", "random_init": False}
    with pytest.raises((BackboneError, WeightsNotAvailableError, ValueError)):
        extract(ExtractConfig(images=str(imgs), out=str(tmp_path / "f"), overwrite=True, **bad_model))
    assert tree_hash(tmp_path / "f") == before
    ShardSet(tmp_path / "f").validate(full=True)


def test_train_overwrite_with_bad_init_from_keeps_the_checkpoint(tmp_path):
    from visae.train import TrainConfig, TrainError, train

    shards = _write_shards(tmp_path / "shards", n=64, d=8, shard_size=64)
    cfg = TrainConfig(shards=str(shards.path), out=str(tmp_path / "run"), num_epochs=3, max_steps=2, batch_size=16,
                      expansion_factor=2, progress=False, plot=False, lr_warmup_steps=0, l1_warmup_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)  # stopped by max_steps: the checkpoint is the resume point
    ckpt = tmp_path / "run" / "checkpoint" / "checkpoint.safetensors"
    assert ckpt.is_file()
    before = tree_hash(tmp_path / "run")
    import dataclasses

    with pytest.raises(TrainError, match="--init_from"):
        train(dataclasses.replace(cfg, overwrite=True, init_from=str(tmp_path / "no_such_sae")))
    assert tree_hash(tmp_path / "run") == before


# ----------------------------------------------------------------------------- item 10: one-step commits


def test_select_killed_between_best_and_selection_json_reads_one_consistent_choice(tmp_path):
    from visae.sweepdir import SweepDir

    sd = SweepDir(tmp_path / "sweep")
    for i, t in enumerate(("a", "b")):
        _sae(seed=i).save(sd.trial_dir(t))
    sd.commit_selection("a", {"trial": "a"})
    assert sd.read_selection()["trial"] == "a"

    def killed(info):  # the process dies after best/ was swapped in, before selection.json
        raise KeyboardInterrupt

    sd.write_selection = killed
    with pytest.raises(KeyboardInterrupt):
        sd.commit_selection("b", {"trial": "b"})
    sd = SweepDir(tmp_path / "sweep")
    assert json.loads(sd.selection_file.read_text())["trial"] == "a"  # the stale copy
    assert sd.read_selection()["trial"] == "b"  # readers trust best/, the commit point
    assert torch.equal(load_sae(sd.best_dir).W_dec, load_sae(sd.trial_dir("b")).W_dec)
    assert not [p for p in sd.path.iterdir() if p.name.endswith(".tmp")]


def _named_sae(tmp_path: Path, tiny, source: dict, seed: int) -> tuple[Path, Path]:
    d = tiny.embed_dim
    shards = _write_shards(tmp_path / f"shards{seed}", n=48, d=d, source=source, seed=seed)
    sae = _sae(d_in=d, d_sae=12, seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    sae_dir = sae.save(tmp_path / f"sae{seed}", extra={"shards": {"path": str(shards.path), "source": source}})
    return sae_dir, shards.path


def test_name_killed_after_top_images_is_not_paired_with_the_old_concepts(tmp_path, tiny, monkeypatch):
    import visae.naming as naming
    from visae.naming import NameConfig, name_concepts
    from visae.topimages import TopImages

    src = {"model": TINY_CLIP_NAME, "pretrained": None, "random_init": True, "layer": None, "token": "cls"}
    (tmp_path / "vocab.txt").write_text("cat\ndog\nsea\ntree\ncar\n")
    a_dir, _ = _named_sae(tmp_path, tiny, src, 0)
    b_dir, _ = _named_sae(tmp_path, tiny, src, 1)
    out = tmp_path / "concepts"
    kw = dict(vocab=str(tmp_path / "vocab.txt"), vocab_size=0, text_cache=None, out=str(out), n_top=4, n_random=2)
    name_concepts(NameConfig(sae=str(a_dir), **kw), backbone=tiny)
    a_stats = TopImages.load(out)
    a_doc = json.loads((out / "concepts.json").read_text())
    assert a_doc["top_images_file"]["sha256"] == hashlib.sha256((out / "top_images.npz").read_bytes()).hexdigest()

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(naming, "write_concepts", killed)
    with pytest.raises(KeyboardInterrupt):
        name_concepts(NameConfig(sae=str(b_dir), **kw), backbone=tiny)  # B's top_images.npz written, then killed
    assert json.loads((out / "concepts.json").read_text()) == a_doc
    with pytest.raises(ValueError, match="top_images.npz does not belong to .*concepts.json"):
        TopImages.load(out)
    assert a_stats.n_examples == 48


# ----------------------------------------------------------------------------- item 5: the right, whole input


def test_incomplete_shard_set_is_refused_by_train_and_name(tmp_path, tiny):
    from visae.naming import NameConfig, NamingError, name_concepts
    from visae.train import TrainConfig, TrainError, train

    path = tmp_path / "partial"
    with pytest.raises(RuntimeError):
        with ShardWriter(path, 8, shard_size=16) as w:
            w.add(_unit_rows(40, 8), ids=[str(i) for i in range(40)])
            raise RuntimeError("killed")
    before = tree_hash(path)
    with pytest.raises(TrainError, match=r"partial/manifest.json: shard set is not complete .*32 examples committed"):
        train(TrainConfig(shards=str(path), out=str(tmp_path / "run"), num_epochs=1, progress=False, plot=False))
    assert not (tmp_path / "run" / "weights.safetensors").exists()
    sae_dir = _sae(d_in=8).save(tmp_path / "sae", extra={"shards": {"path": str(path), "source": {}}})
    with pytest.raises(NamingError, match="not complete"):  # refused before the vocabulary is embedded
        name_concepts(NameConfig(sae=str(sae_dir), shards=str(path), out=str(tmp_path / "c"), text_cache=None,
                                 assume_embedding_space=True, model=TINY_CLIP_NAME, random_init=True), backbone=tiny)
    assert tree_hash(path) == before


def test_name_checks_the_shards_as_every_command_does(tmp_path):
    """visae name's shard check is zeroshot.site_mismatch: a block counted from the end and its resolved index are
    one block (the check of its own refused them), other pretrained weights are not; unknown provenance warns."""
    from visae.naming import NamingError, check_shards_for_sae

    b11 = {"model": "ViT-B-32", "pretrained": "openai", "random_init": False, "layer": 11, "token": "cls",
           "read": "residual_after_block_11"}
    ss = _write_shards(tmp_path / "b11", source=b11)
    check_shards_for_sae(ss, dict(b11, layer=-1), "SAE x")  # -1 of a 12-block model, recorded resolved
    check_shards_for_sae(ss, dict(b11, pretrained="OpenAI"), "SAE x")  # open_clip reads tags case-blind
    with pytest.raises(NamingError, match=r"pretrained: trained on 'laion2b_s34b_b79k', given 'openai'"):
        check_shards_for_sae(ss, dict(b11, pretrained="laion2b_s34b_b79k"), "SAE x")
    with pytest.raises(NamingError, match=r"layer: trained on block -2, given block -1"):
        check_shards_for_sae(_write_shards(tmp_path / "m1", source=dict(b11, layer=-1, read=None)),
                             dict(b11, layer=-2, read=None), "SAE x")
    check_shards_for_sae(ss, dict(b11, pretrained="laion2b_s34b_b79k"), "SAE x", allow_other=True)
    with pytest.warns(UserWarning, match="provenance .* is unknown"):
        check_shards_for_sae(_write_shards(tmp_path / "none", source={}), b11, "SAE x")
    # the model's weights are checked too: names from another text tower would live in another space
    from visae.naming import NameConfig, _resolve_model

    with pytest.raises(NamingError, match=r"weights 'openai' .* but --pretrained is 'laion2b_s34b_b79k'"):
        _resolve_model(NameConfig(sae="x", model="ViT-B-32", pretrained="laion2b_s34b_b79k"), b11, "SAE x")
    assert _resolve_model(NameConfig(sae="x", model="ViT-B-32", pretrained="OpenAI"), b11, "SAE x")[1] == "OpenAI"


def test_name_refuses_shards_of_another_model_unless_overridden(tmp_path, tiny):
    from visae.naming import NameConfig, NamingError, name_concepts

    src = {"model": TINY_CLIP_NAME, "pretrained": None, "random_init": True, "layer": None, "token": "cls"}
    sae_dir, _ = _named_sae(tmp_path, tiny, src, 0)
    other = _write_shards(tmp_path / "other", n=48, d=tiny.embed_dim, source={**src, "model": "ViT-B-32"})
    wide = _write_shards(tmp_path / "wide", n=48, d=tiny.embed_dim + 1, source=src)
    (tmp_path / "vocab.txt").write_text("cat\ndog\nsea\n")
    kw = dict(sae=str(sae_dir), vocab=str(tmp_path / "vocab.txt"), vocab_size=0, text_cache=None,
              out=str(tmp_path / "c"))
    with pytest.raises(NamingError, match=r"other holds activations of something else .*model: trained on "
                                          r"'visae-tiny-test', given 'ViT-B-32'.*--allow_other_shards"):
        name_concepts(NameConfig(shards=str(other.path), **kw), backbone=tiny)
    with pytest.raises(NamingError, match=r"width d=\d+ but the SAE has d_in"):
        name_concepts(NameConfig(shards=str(wide.path), **kw), backbone=tiny)
    assert not (tmp_path / "c" / "concepts.json").exists()
    out = name_concepts(NameConfig(shards=str(other.path), allow_other_shards=True, **kw), backbone=tiny)
    assert json.loads((out / "concepts.json").read_text())["num_concepts"] == 12


def test_full_validation_finds_rows_not_unit_norm_and_shards_listed_twice(tmp_path):
    # rows stored un-normalised under a manifest that says unit_norm (a converter's mistake)
    with ShardWriter(tmp_path / "s", 8, shard_size=32, normalization="none") as w:
        w.add(3 * _unit_rows(64, 8), ids=[str(i) for i in range(64)])
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**m, "normalization": "unit_norm"}))
    ShardSet(tmp_path / "s").validate(full=False)  # the cheap check reads no rows
    with pytest.raises(ShardError, match=r"shard_00000.acts.npy row 0: norm [\d.]+, but .* 'normalization': 'unit_norm'"):
        ShardSet(tmp_path / "s").validate(full=True)
    # a shard listed twice
    ss = _write_shards(tmp_path / "t", n=64, d=8, shard_size=32)
    m = ss.manifest
    twice = {**m, "shards": m["shards"] + [m["shards"][0]], "num_examples": m["num_examples"] + 32}
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(twice))
    with pytest.raises(ShardError, match="shard 'shard_00000' is listed more than once"):
        ShardSet(tmp_path / "t")
    # ... or copied under another name
    for sfx in (".acts.npy", ".meta.npz"):
        shutil.copyfile(tmp_path / "t" / f"shard_00000{sfx}", tmp_path / "t" / f"shard_00002{sfx}")
    copied = {**twice, "shards": m["shards"] + [{**m["shards"][0], "name": "shard_00002"}]}
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(copied))
    with pytest.raises(ShardError, match="shard_00002.acts.npy has the same content as .*shard_00000"):
        ShardSet(tmp_path / "t").validate(full=True)


def test_a_nan_row_makes_naming_fail_clearly(tmp_path, tiny):
    from visae.naming import NameConfig, NamingError, name_concepts

    src = {"model": TINY_CLIP_NAME, "pretrained": None, "random_init": True, "layer": None, "token": "cls"}
    sae_dir, shards = _named_sae(tmp_path, tiny, src, 0)
    mm = np.load(shards / "shard_00001.acts.npy", mmap_mode="r+")
    mm[5, 2] = np.nan
    mm.flush()
    del mm
    (tmp_path / "vocab.txt").write_text("cat\ndog\n")
    with pytest.raises(NamingError, match=r"shard_00001.acts.npy row 5: activation holds NaN"):
        name_concepts(NameConfig(sae=str(sae_dir), vocab=str(tmp_path / "vocab.txt"), vocab_size=0, text_cache=None,
                                 out=str(tmp_path / "c")), backbone=tiny)
    assert not (tmp_path / "c" / "concepts.json").exists() and not (tmp_path / "c" / "top_images.npz").exists()


# ----------------------------------------------------------------------------- item 7: errors, not tracebacks


def _broken_sae_dirs(root: Path) -> dict[str, tuple[Path, str]]:
    """{case: (SAE directory, what the one-line error must say)}: the ways an SAE directory breaks."""
    cases: dict[str, tuple[Path, str]] = {}

    def fresh(name):
        d = _sae().save(root / name)
        return d, json.loads((d / "cfg.json").read_text())

    cases["missing directory"] = (root / "nope", "does not exist")
    (root / "afile").write_text("x")
    cases["a file, not a directory"] = (root / "afile", "does not exist")
    d, _ = fresh("no_cfg")
    (d / "cfg.json").unlink()
    cases["cfg.json missing"] = (d, "cfg.json is missing")
    d, _ = fresh("no_weights")
    (d / "weights.safetensors").unlink()
    cases["weights missing"] = (d, "weights.safetensors is missing")
    d, _ = fresh("not_json")
    (d / "cfg.json").write_text("{not json")
    cases["cfg.json not JSON"] = (d, "cfg.json is not valid JSON")
    d, _ = fresh("not_utf8")
    (d / "cfg.json").write_bytes(b'{"format": "\xff"}')
    cases["cfg.json not UTF-8"] = (d, "cfg.json is not valid JSON")
    d, _ = fresh("a_list")
    (d / "cfg.json").write_text("[1, 2]")
    cases["cfg.json a list"] = (d, "expected a JSON object, got list")
    d, doc = fresh("other_format")
    (d / "cfg.json").write_text(json.dumps({**doc, "format": "sae_lens"}))
    cases["another format"] = (d, "field 'format' is 'sae_lens'")
    d, doc = fresh("unknown_arch")
    doc.pop("checksums")
    (d / "cfg.json").write_text(json.dumps({**doc, "architecture": "gated"}))
    cases["unknown architecture"] = (d, "unknown SAE architecture 'gated'")
    d, doc = fresh("shape")
    doc.pop("checksums")
    (d / "cfg.json").write_text(json.dumps({**doc, "d_sae": 50}))
    cases["shapes do not fit"] = (d, "tensors do not fit")
    d, _ = fresh("truncated")
    w = d / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:40])
    cases["weights truncated"] = (d, "weights.safetensors is damaged")
    d, doc = fresh("garbage")
    doc.pop("checksums")
    (d / "cfg.json").write_text(json.dumps(doc))
    (d / "weights.safetensors").write_bytes(b"\x00" * 7)
    cases["weights not safetensors (unverified)"] = (d, "not a readable safetensors file")
    return cases


def test_broken_sae_directories_give_one_line_errors_in_visae_name(tmp_path, capsys):
    from visae.cli import main as cli_main

    for case, (d, want) in _broken_sae_dirs(tmp_path).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = cli_main(["name", "--sae", str(d), "--out", str(tmp_path / "c"), "--text_cache", "null"])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc != 0 and "Traceback" not in err, (case, err)
        assert len(lines) == 1 and lines[0].startswith("visae name: error:") and want in lines[0], (case, err)


_TRAIN_LONG = ["--num_epochs", "100000", "--batch_size", "8", "--expansion_factor", "2", "--checkpoint_every_steps",
               "5", "--no_progress", "--no_plot", "--lr_warmup_steps", "0", "--l1_warmup_steps", "0"]


def test_ctrl_c_says_which_checkpoint_was_saved_and_how_to_continue(tmp_path):
    import signal
    import time

    shards = _write_shards(tmp_path / "shards", n=256, d=8, shard_size=256)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VISAE_TRACEBACK", None)
    # SIGINT's default disposition in the child: a shell starts background jobs (``pytest ... &``) with SIGINT
    # ignored, the child would inherit that, and Python keeps an ignored SIGINT ignored (no KeyboardInterrupt)
    p = subprocess.Popen([sys.executable, "-m", "visae.cli", "train", "--shards", str(shards.path), "--out", str(out),
                          *_TRAIN_LONG], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ckpt = out / "checkpoint" / "checkpoint.safetensors"
        deadline = time.monotonic() + 120
        while not ckpt.is_file() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert ckpt.is_file(), p.stderr.read() if p.poll() is not None else "no checkpoint within 120 s"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:  # never leave a 100,000-epoch run behind on a failure
            p.kill()
            p.wait()
    assert p.returncode == 130 and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("visae train: interrupted")]
    assert len(line) == 1, err
    assert f"the checkpoint {ckpt} holds step" in line[0] and "rerun the same command to continue" in line[0], err
    from visae.train import load_checkpoint

    load_checkpoint(ckpt)  # intact


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch, capsys):
    import errno

    import visae.atomic
    from visae.cli import main as cli_main

    shards = _write_shards(tmp_path / "shards", n=64, d=8, shard_size=64)

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(visae.atomic, "_fsync_file", full)
    monkeypatch.delenv("VISAE_TRACEBACK", raising=False)
    rc = cli_main(["train", "--shards", str(shards.path), "--out", str(tmp_path / "run"), "--num_epochs", "1",
                   "--no_progress", "--no_plot"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"visae train: error: No space left on device ({tmp_path / 'run'}" in err and ".tmp)" not in err, err
    assert not [p for p in (tmp_path / "run").rglob("*.tmp")]


# ----------------------------------------------------------------------------- item 9: resume, consistently


def test_train_continues_by_default_and_a_moved_run_folder_resumes(tmp_path, capsys):
    import dataclasses

    from visae.train import TrainConfig, TrainError, train

    shards = _write_shards(tmp_path / "shards", n=96, d=8, shard_size=96)
    cfg = TrainConfig(shards=str(shards.path), out=str(tmp_path / "full"), num_epochs=3, batch_size=16,
                      expansion_factor=2, progress=False, plot=False, lr_warmup_steps=0, l1_warmup_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)  # uninterrupted
        train(dataclasses.replace(cfg, out=str(tmp_path / "a"), max_steps=7))  # stopped mid-run
        shutil.move(tmp_path / "a", tmp_path / "moved")  # the run folder moved elsewhere
        capsys.readouterr()
        train(dataclasses.replace(cfg, out=str(tmp_path / "moved")))  # the same command, no flag: continues
    assert "resuming" in capsys.readouterr().err
    full, moved = load_sae(tmp_path / "full"), load_sae(tmp_path / "moved")
    for k, v in full.state_dict().items():
        assert torch.equal(v, moved.state_dict()[k]), k
    # other data under the same width and count: refused by its fingerprint, not by its path
    other = _write_shards(tmp_path / "other", n=96, d=8, shard_size=96, seed=5)
    train(dataclasses.replace(cfg, out=str(tmp_path / "b"), max_steps=3))
    before = tree_hash(tmp_path / "b")
    with pytest.raises(TrainError, match="holds other data than the run was trained on"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "b"), shards=str(other.path)))
    assert tree_hash(tmp_path / "b") == before
    # --overwrite starts over (same result as a fresh run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(dataclasses.replace(cfg, out=str(tmp_path / "b"), overwrite=True))
    assert torch.equal(load_sae(tmp_path / "b").W_dec, full.W_dec)


def test_resumed_extraction_is_byte_identical_when_the_kill_cut_a_batch(tmp_path, tiny, monkeypatch):
    from visae.extract import ExtractConfig, _SimulatedKill, extract, read_skipped

    imgs = _images(tmp_path / "imgs", n=8)
    (imgs / "im2b.png").write_bytes(b"")  # a bad image inside the first batches: skipped once, logged once
    bb = tiny
    seen: list[int] = []
    orig = bb.features

    def features(x, *a, **k):
        seen.append(int(x.shape[0]))
        return orig(x, *a, **k)

    monkeypatch.setattr(bb, "features", features)
    kw = dict(model=TINY_CLIP_NAME, random_init=True, batch_size=3, num_workers=0, progress=False, shard_size=2,
              dtype="float32")
    full = extract(ExtractConfig(images=str(imgs), out=str(tmp_path / "full"), **kw), backbone=bb)
    batches_full, seen[:] = list(seen), []
    with pytest.raises(_SimulatedKill):  # 2 batches = 6 items (5 good rows): shards of 2 commit 4 rows, item 4 of 6
        extract(ExtractConfig(images=str(imgs), out=str(tmp_path / "r"), **kw), backbone=bb, _fail_after_batches=2)
    part = ShardSet(tmp_path / "r", require_complete=False)
    assert len(part) == 4
    seen[:] = []
    res = extract(ExtractConfig(images=str(imgs), out=str(tmp_path / "r"), **kw), backbone=bb)
    # the resumed run re-ran the cut batch whole (items 3..5: 3 images), then the same batches as the full run
    assert seen == batches_full[1:], (seen, batches_full)
    for f in sorted((tmp_path / "full").glob("shard_*")):
        assert (tmp_path / "r" / f.name).read_bytes() == f.read_bytes(), f.name
    assert list(res.metadata()["id"]) == list(full.metadata()["id"])
    assert read_skipped(tmp_path / "r") == read_skipped(tmp_path / "full") and len(read_skipped(tmp_path / "r")) == 1


def test_a_moved_sweep_directory_resumes(tmp_path, capsys):
    from visae.sweep import SweepConfig, sweep
    from visae.train import TrainConfig

    shards = _write_shards(tmp_path / "shards", n=96, d=8, shard_size=96)
    tcfg = TrainConfig(shards=str(shards.path), num_epochs=2, batch_size=16, progress=False, plot=False,
                       lr_warmup_steps=0, l1_warmup_steps=0)
    kw = dict(lrs=(1e-3,), l1_coeffs=(1e-3,), expansion_factors=(2,), select=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sweep(SweepConfig(out=str(tmp_path / "s"), train=dataclasses.replace(tcfg, max_steps=5), **kw))
        shutil.move(tmp_path / "s", tmp_path / "moved")
        capsys.readouterr()
        sweep(SweepConfig(out=str(tmp_path / "moved"), train=dataclasses.replace(tcfg, max_steps=5), **kw))
    err = capsys.readouterr().err
    assert "resuming" in err and "moved/groups/" in err and "step 5" in err, err  # not refused for its new path


def test_loading_an_unfinished_training_run_says_how_to_finish_it(tmp_path):
    """An SAE directory of a killed `visae train` (a checkpoint/, no cfg.json yet) is not "not an SAE directory": the
    error says the run is unfinished and how to finish it; a directory with neither stays "not an SAE directory"."""
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    with pytest.raises(SAEFormatError, match=r"run holds an unfinished training run .*rerun `visae train` with the same"):
        load_sae(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEFormatError, match="is not an SAE directory"):
        load_sae(tmp_path / "empty")


def test_an_sae_saved_twice_gives_the_same_bytes_whatever_the_metadata_order(tmp_path):
    """safetensors writes its metadata map in a random order; visae's files sort it (safetensors_bytes), so the same
    SAE saved in two processes has one SHA-256 (a retrained-identical sweep trial does not look changed), and the
    file still loads as a safetensors file with the same tensors and metadata."""
    from safetensors import safe_open

    code = ("import sys, torch; from visae.sae import SAEConfig, build_sae; "
            "build_sae(SAEConfig(architecture='relu', d_in=8, d_sae=16), generator=torch.Generator().manual_seed(0))"
            ".save(sys.argv[1])")
    digests = set()
    for i in range(2):  # separate processes (the in-process check below repeats it 20 times)
        out = tmp_path / f"s{i}"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env={**os.environ, "PYTHONHASHSEED": str(i)})
        digests.add(hashlib.sha256((out / "weights.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(tmp_path / "s0" / "weights.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "visae.sae", "format_version": "1", "architecture": "relu"}
        assert sorted(f.keys()) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    load_sae(tmp_path / "s0")  # its recorded checksum matches
    from visae.integrity import safetensors_bytes

    meta = {"format": "visae.sae", "format_version": "1", "architecture": "relu", "x": "y"}
    assert len({safetensors_bytes({"a": torch.zeros(3)}, meta) for _ in range(20)}) == 1  # raw save: ~6 orders in 20
