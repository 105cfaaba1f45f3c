"""Bad-input corpus (issue 11, "Tests must show"): every case through the real ``visae`` CLI.

Each case is generated small in its own temporary directory (images, tars, shard sets, SAE
directories, vocabularies, configs; every input the issue names is one of them), run as a
subprocess of the installed ``visae`` command, and classified automatically from

- the exit code, and whether stderr holds a Python traceback;
- a SHA-256 of every file of the case directory's protected trees (the artifacts that were on
  disk before the command: a finished shard set, an SAE, a site) before and after;
- the case's expected outcome: ``error`` (a clear error: exit != 0, no traceback, a one-line
  message naming what the case names), ``skip`` (exit 0 and the bad item counted as a skip),
  ``accept`` (exit 0 and the result has the right value, checked per case).

Classes (each case lands in exactly one): ``ok_error_or_skip``, ``ok_accept``, ``traceback``,
``silent_wrong`` (exit 0 where an error was due, or a wrong result / uncounted skip),
``damage`` (a protected artifact changed), ``refused_valid`` (a valid input refused: not in the
issue's table, reported beside it).

    python benchmarks/bad_inputs.py --out runs/bad_inputs.json --workers 2

Uses the tiny random CLIP (``visae-tiny-test``), 12-image folders and 8-row shards: each case
costs one interpreter start plus a few milliseconds of model time.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

import numpy as np

VISAE = shutil.which("visae") or "visae"
EX = ["--model", "visae-tiny-test", "--random_init", "--device", "cpu", "--num_workers", "0", "--batch_size", "8",
      "--shard_size", "8", "--threads", "1", "--no_progress"]
TR = ["--num_epochs", "1", "--batch_size", "8", "--expansion_factor", "2", "--no_plot", "--no_progress", "--device", "cpu",
      "--threads", "1", "--val_fraction", "0.25"]


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    return subprocess.run([VISAE, *argv], cwd=cwd, capture_output=True, text=True, errors="replace", timeout=timeout,
                          env=env)


def tree_hash(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != ".visae.lock":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------- inputs
def png(path: Path, colour=(200, 30, 30), size=(32, 32), mode="RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def folder(path: Path, n: int = 3) -> Path:
    for i in range(n):
        png(path / f"im{i}.png", (40 * i, 120, 200 - 30 * i))
    return path


def img_bytes(colour, fmt="JPEG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format=fmt)
    return buf.getvalue()


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def report(d: Path) -> dict:
    return json.loads((d / "extract_report.json").read_text())


def rows(d: Path) -> int:
    return int(sum(s["count"] for s in json.loads((d / "manifest.json").read_text())["shards"]))


def ids(d: Path) -> list[str]:
    from visae.shards import ShardSet

    return [str(x) for x in ShardSet(d).metadata()["id"]]


def acts(d: Path) -> np.ndarray:
    from visae.shards import ShardSet

    ss = ShardSet(d)
    return np.concatenate([np.asarray(ss.load_shard(i), dtype=np.float32) for i in range(len(ss.shards))]) \
        if hasattr(ss, "load_shard") else np.load(d / "shard_00000.acts.npy").astype(np.float32)


def skipped(d: Path) -> list[dict]:
    p = d / "skipped.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


# ----------------------------------------------------------------------------- cases
class Case:
    def __init__(self, name: str, group: str, expect: str, setup: Callable[[Path, Path], list[str]],
                 check: Callable[[Path, subprocess.CompletedProcess], bool] | None = None,
                 protect: tuple[str, ...] = (), names: str | None = None, hold: Callable | None = None):
        self.name, self.group, self.expect, self.setup, self.check = name, group, expect, setup, check
        self.protect, self.names, self.hold = protect, names, hold


CASES: list[Case] = []


def case(name, group, expect, check=None, protect=(), names=None, hold=None):
    def deco(fn):
        CASES.append(Case(name, group, expect, fn, check, protect, names, hold))
        return fn
    return deco


def extract_case(name, expect, make, check=None, extra=(), names=None, group="images"):
    """A folder/tar case for ``visae extract``: ``make(c)`` builds the input and returns its path."""
    def setup(c, base):
        src = make(c)
        return ["extract", "--images", str(src), "--out", str(c / "out"), *EX, *extra]
    CASES.append(Case(name, group, expect, setup, check, (), names))


def n_skips(n, n_rows):
    return lambda c, r: report(c / "out")["skipped"] == n and rows(c / "out") == n_rows and len(skipped(c / "out")) == n


def n_rows(n):
    return lambda c, r: rows(c / "out") == n and report(c / "out")["skipped"] == 0


# images ----------------------------------------------------------------------
def _ramp16(c):
    from PIL import Image

    d = c / "imgs"
    d.mkdir()
    ramp = (np.linspace(0, 65535, 32, dtype=np.float64)[None, :].repeat(32, 0)).astype(np.uint16)
    Image.fromarray(ramp).save(d / "a16.png")  # mode I;16
    Image.fromarray((ramp.astype(np.float64) * 255 / 65535).round().astype(np.uint8), mode="L").save(d / "b8.png")
    return d


def _cos16(c, r):
    a = acts(c / "out")
    i = ids(c / "out")
    x, y = a[i.index("a16.png")], a[i.index("b8.png")]
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) > 0.999


extract_case("16-bit greyscale PNG ramp (I;16) = its 8-bit picture", "accept", _ramp16, _cos16)


def _loop(c):
    d = folder(c / "imgs", 3)
    os.symlink(".", d / "loop")
    return d


extract_case("folder with a symlink loop (loop -> .), 3 images", "accept", _loop,
             lambda c, r: rows(c / "out") == 3)


def _badnames(c):
    d = folder(c / "imgs", 2)
    (d / "bad\nname.png").write_bytes(b"not an image")
    (d / "bad\ttab.png").write_bytes(b"")
    return d


extract_case("newline and tab in names of two broken files", "skip", _badnames, n_skips(2, 2))


def _latin1(c):
    d = folder(c / "imgs", 1)
    shutil.copy(d / "im0.png", os.path.join(os.fsencode(d), b"caf\xe9.png"))
    return d


extract_case("file name with a Latin-1 byte (not UTF-8)", "accept", _latin1, lambda c, r: rows(c / "out") == 2)


def _broken(kind):
    def make(c):
        d = folder(c / "imgs", 2)
        good = (d / "im0.png").read_bytes()
        data = {"truncated": good[: len(good) // 2], "empty": b"", "text": b"hello, not a picture\n",
                "html": b"<html><body>404</body></html>", "jpeg_header_only": b"\xff\xd8\xff\xe0" + b"\0" * 20}[kind]
        (d / f"x_{kind}.{'png' if kind == 'truncated' else 'jpg'}").write_bytes(data)
        return d
    return make


for _k in ("truncated", "empty", "text", "html", "jpeg_header_only"):
    extract_case(f"broken image file: {_k}", "skip", _broken(_k), n_skips(1, 2))


def _mode(mode, colour, fmt="png", **kw):
    def make(c):
        from PIL import Image

        d = c / "imgs"
        d.mkdir()
        im = Image.new(mode, (32, 32), colour)
        im.save(d / f"m.{fmt}", **kw)
        return d
    return make


for _m, _col, _fmt, _kw in [("RGBA", (255, 0, 0, 128), "png", {}), ("P", 3, "png", {"transparency": 3}),
                            ("1", 1, "png", {}), ("L", 128, "png", {}), ("LA", (100, 50), "png", {}),
                            ("CMYK", (0, 255, 255, 0), "jpg", {}), ("RGB", (1, 2, 3), "webp", {}),
                            ("RGB", (1, 2, 3), "bmp", {}), ("RGB", (9, 9, 9), "gif", {})]:
    extract_case(f"image mode {_m} as .{_fmt}", "accept", _mode(_m, _col, _fmt, **_kw), n_rows(1))
extract_case("32-bit float TIFF (mode F, no defined range)", "skip", _mode("F", 0.5, "tif"), n_skips(1, 0))
extract_case("32-bit integer TIFF (mode I, no defined range)", "skip", _mode("I", 300, "tif"), n_skips(1, 0))


def _tiny(c):
    return png(c / "imgs" / "one.png", size=(1, 1)).parent


extract_case("1x1 pixel image", "accept", _tiny, n_rows(1))


def _gif(c):
    from PIL import Image

    d = c / "imgs"
    d.mkdir()
    fr = [Image.new("RGB", (32, 32), col) for col in ((255, 0, 0), (0, 0, 255))]
    fr[0].save(d / "anim.gif", save_all=True, append_images=fr[1:], duration=100, loop=0)
    return d


extract_case("animated GIF (2 frames)", "accept", _gif, n_rows(1))


def _exif_rot(c):
    from PIL import Image

    d = c / "imgs"
    d.mkdir()
    im = Image.new("RGB", (48, 32), (0, 200, 0))
    ex = Image.Exif()
    ex[0x0112] = 6
    im.save(d / "rot.jpg", exif=ex)
    return d


extract_case("JPEG with an EXIF orientation tag", "accept", _exif_rot, n_rows(1))


def _hardlink(c):
    d = folder(c / "imgs", 2)
    os.link(d / "im0.png", d / "z_link.png")
    return d


extract_case("hard link to an image already read", "skip", _hardlink, n_skips(1, 2))


def _symlink_file(c):
    d = folder(c / "imgs", 2)
    os.symlink("im0.png", d / "z_sym.png")
    return d


extract_case("symlink to an image already read", "skip", _symlink_file, n_skips(1, 2))


def _dangling(c):
    d = folder(c / "imgs", 2)
    os.symlink("nowhere.png", d / "z_dangling.png")
    return d


extract_case("dangling symlink among images", "skip", _dangling, n_skips(1, 2))
extract_case("empty image folder", "error", lambda c: (c / "imgs").mkdir() or c / "imgs", names="imgs")
extract_case("--images that does not exist", "error", lambda c: c / "no_such_dir", names="no_such_dir")
extract_case("--images is a text file", "error",
             lambda c: (c / "list.txt").write_text("a.png\n") and c / "list.txt", names="list.txt")
extract_case("folder with only non-image files", "error",
             lambda c: (c / "imgs").mkdir() or (c / "imgs" / "readme.md").write_text("x") and c / "imgs", names="imgs")


# tars ------------------------------------------------------------------------
def _tar_dup(c):
    return tar_of(c / "data.tar", [("sample_0.jpg", img_bytes((255, 0, 0))), ("sample_0.cls", b"1"),
                                   ("sample_0.jpg", img_bytes((0, 0, 255))), ("sample_0.cls", b"3"),
                                   ("sample_1.jpg", img_bytes((0, 255, 0))), ("sample_1.cls", b"2")])


def _tar_dup_check(c, r):
    from visae.shards import ShardSet

    ss = ShardSet(c / "out")
    meta = ss.metadata()
    lab = dict(zip([str(x).split("/")[-1] for x in meta["id"]], [int(x) for x in meta["label"]])) \
        if "label" in meta else {}
    return report(c / "out")["skipped"] >= 1 and rows(c / "out") == 2 and lab.get("sample_0") == 1


extract_case("webdataset tar with a repeated member name (red .cls 1, then blue .cls 3)", "skip", _tar_dup,
             _tar_dup_check, group="tars")
extract_case("tar with an orphan label (.cls without image)", "skip",
             lambda c: tar_of(c / "d.tar", [("a.jpg", img_bytes((1, 2, 3))), ("a.cls", b"0"), ("b.cls", b"1")]),
             lambda c, r: rows(c / "out") == 1 and report(c / "out")["skipped"] == 1, group="tars")
extract_case("tar with a corrupt JPEG member", "skip",
             lambda c: tar_of(c / "d.tar", [("a.jpg", img_bytes((1, 2, 3))), ("b.jpg", b"\xff\xd8garbage")]),
             n_skips(1, 1), group="tars")


def _trunc_tar(c):
    p = tar_of(c / "d.tar", [(f"s{i}.jpg", img_bytes((10 * i, 0, 0))) for i in range(4)])
    with tarfile.open(p) as t:
        last = t.getmembers()[-1]
    data = p.read_bytes()
    p.write_bytes(data[: last.offset_data + last.size // 2])  # cut inside the last member's data (not the padding)
    return p


CASES.append(Case("truncated tar", "tars", "error_or_skip",
                  lambda c, b: ["extract", "--images", str(_trunc_tar(c)), "--out", str(c / "out"), *EX],
                  lambda c, r: report(c / "out")["skipped"] >= 1))
extract_case("empty tar", "error", lambda c: tar_of(c / "d.tar", []), names="d.tar", group="tars")
extract_case("a text file named .tar", "error",
             lambda c: (c / "d.tar").write_text("not a tar\n" * 100) and c / "d.tar", names="d.tar", group="tars")


def _traversal(c):
    (c / "inner").mkdir()
    return tar_of(c / "inner" / "d.tar", [("../../evil.jpg", img_bytes((1, 1, 1))), ("ok.jpg", img_bytes((2, 2, 2)))])


CASES.append(Case("tar member named ../../evil.jpg (nothing written outside)", "tars", "accept_or_skip",
                  lambda c, b: ["extract", "--images", str(_traversal(c)), "--out", str(c / "out"), *EX],
                  lambda c, r: rows(c / "out") >= 1 and not (c.parent / "evil.jpg").exists()
                  and not (c / "evil.jpg").exists()))


# extract: destructive steps and arguments ----------------------------------------
def _with_shards(c, base):
    shutil.copytree(base / "sh", c / "sh")


def ext(argv_fn, **kw):
    def setup(c, base):
        _with_shards(c, base)
        return argv_fn(c, base)
    return setup


CASES += [
    Case("extract --overwrite with a mistyped --images over a finished shard set", "extract", "error",
         ext(lambda c, b: ["extract", "--images", str(c / "imgz"), "--out", str(c / "sh"), "--overwrite", *EX]),
         protect=("sh",), names="imgz"),
    Case("extract --overwrite with a mistyped --model over a finished shard set", "extract", "error",
         ext(lambda c, b: ["extract", "--images", str(b / "imgs"), "--out", str(c / "sh"), "--overwrite",
                           *[a if a != "visae-tiny-test" else "ViT-B-99" for a in EX]]),
         protect=("sh",), names="ViT-B-99"),
    Case("extract --layer 99 (model has 2 blocks)", "extract", "error",
         ext(lambda c, b: ["extract", "--images", str(b / "imgs"), "--out", str(c / "new"), "--layer", "99", *EX]),
         names="layer"),
    Case("extract --batch_size 0", "config", "error",
         ext(lambda c, b: ["extract", "--images", str(b / "imgs"), "--out", str(c / "new"), *EX, "--batch_size", "0"]),
         names="batch_size"),
    Case("extract --shard_size -5", "config", "error",
         ext(lambda c, b: ["extract", "--images", str(b / "imgs"), "--out", str(c / "new"), *EX, "--shard_size", "-5"]),
         names="shard_size"),
    Case("extract --limit 0", "config", "error",
         ext(lambda c, b: ["extract", "--images", str(b / "imgs"), "--out", str(c / "new"), *EX, "--limit", "0"]),
         names="limit"),
    Case("extract with an unknown flag --imagez", "config", "error",
         ext(lambda c, b: ["extract", "--imagez", str(b / "imgs"), "--out", str(c / "new"), *EX]), names="imagez"),
    Case("extract into a --out that is a file", "extract", "error",
         ext(lambda c, b: (c / "f.txt").write_text("keep me") and
             ["extract", "--images", str(b / "imgs"), "--out", str(c / "f.txt"), *EX]), protect=("f.txt",),
         names="f.txt"),
    Case("extract: rerun of a finished extraction (same command) keeps it", "extract", "accept",
         ext(lambda c, b: ["extract", "--images", str(b / "imgs"), "--out", str(c / "sh"), *EX]),
         lambda c, r: rows(c / "sh") == 12, protect=("sh",)),
]


# configs ---------------------------------------------------------------------
def cfg_case(name, text, names):
    def setup(c, base):
        (c / "x.yaml").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return ["train", "--shards", str(base / "sh"), "--out", str(c / "o"), *TR, "--config", str(c / "x.yaml")]
    CASES.append(Case(name, "config", "error", setup, None, (), names))


cfg_case("--config YAML with an unknown key", "num_epoch: 3\n", "num_epoch")
cfg_case("--config YAML with a wrong type", "lr: fast\n", "lr")
cfg_case("--config YAML that does not parse", "lr: [1, 2\n  : :\n", "x.yaml")
cfg_case("--config YAML that is a list", "- 1\n- 2\n", "x.yaml")
cfg_case("--config YAML not UTF-8", b"lr: 0.001 # caf\xe9\n", "x.yaml")
cfg_case("--config YAML with a key given twice (lr: 1e-3 ... lr: 1e-4)", "lr: 0.001\nnum_epochs: 1\nlr: 0.0001\n",
         "given twice")


# session of 2026-12-02: inputs of the newcomer round -------------------------------------------------
def _changed_images(c, base):
    shutil.copytree(base / "imgs", c / "imgs")
    r = run(["extract", "--images", str(c / "imgs"), "--out", str(c / "sh"), *EX], c)
    if r.returncode:
        raise RuntimeError(r.stderr[-500:])
    png(c / "imgs" / "added.png", (1, 200, 3))  # the folder changed since the finished extraction
    return ["extract", "--images", str(c / "imgs"), "--out", str(c / "sh"), *EX]


def _empty_weights(c, base):
    (c / "w.pt").write_bytes(b"")
    return ["extract", "--images", str(base / "imgs"), "--out", str(c / "new"), "--model", "visae-tiny-test",
            "--pretrained", str(c / "w.pt"), *EX[3:]]


def _damaged_world(c, base):
    (c / "w").mkdir()
    (c / "w" / "world.json").write_text('{"seed": 1,')
    return ["toyworld", "--n", "4", "--out", str(c / "w"), "--threads", "1"]


CASES += [
    Case("extract: rerun of a finished extraction after an image was added", "extract", "error", _changed_images,
         protect=("sh",), names="images changed"),
    Case("extract --device cuda:99", "config", "error",
         ext(lambda c, b: ["extract", "--images", str(b / "imgs"), "--out", str(c / "new"), *EX, "--device", "cuda:99"]),
         names="cuda:99"),
    Case("extract --pretrained an empty file", "extract", "error", _empty_weights, names="w.pt"),
    Case("extract --out '' (the working directory)", "config", "error",
         ext(lambda c, b: ["extract", "--images", str(b / "imgs"), "--out", "", *EX]),
         lambda c, r: not (c / "manifest.json").exists(), names="--out"),
    Case("toyworld into an --out whose world.json is damaged", "config", "error", _damaged_world, names="world.json"),
    Case("name --templates without {}", "config", "error",
         lambda c, b: ["name", "--sae", str(b / "sae"), "--vocab", str(b / "v.txt"), "--out", str(c / "o"),
                       "--templates", "a photo", "--threads", "1"], names="templates"),
]
CASES.append(Case("--config file that does not exist", "config", "error",
                  lambda c, b: ["train", "--shards", str(b / "sh"), "--out", str(c / "o"), *TR, "--config",
                                str(c / "nope.yaml")], names="nope.yaml"))
CASES.append(Case("train --lr -1", "config", "error",
                  lambda c, b: ["train", "--shards", str(b / "sh"), "--out", str(c / "o"), *TR, "--lr", "-1"],
                  names="lr"))
CASES.append(Case("train --val_fraction 1.5", "config", "error",
                  lambda c, b: ["train", "--shards", str(b / "sh"), "--out", str(c / "o"), *TR, "--val_fraction", "1.5"],
                  names="val_fraction"))


# shards ----------------------------------------------------------------------
def shard_case(name, mutate, names=None, cmd="train", expect="error", check=None, extra=()):
    def setup(c, base):
        _with_shards(c, base)
        mutate(c / "sh")
        if cmd == "train":
            return ["train", "--shards", str(c / "sh"), "--out", str(c / "o"), *TR, *extra]
        shutil.copytree(base / "sae", c / "sae")
        return ["name", "--sae", str(c / "sae"), "--shards", str(c / "sh"), "--vocab", str(base / "v.txt"),
                "--out", str(c / "con"), "--text_cache", str(base / "tc"), "--threads", "1", "--no_stopwords", *extra]
    CASES.append(Case(name, "shards", expect, setup, check, ("sae",) if cmd == "name" else (), names))


def _manifest(edit):
    def mutate(d):
        m = json.loads((d / "manifest.json").read_text())
        edit(m)
        (d / "manifest.json").write_text(json.dumps(m))
    return mutate


def _acts_edit(fn, shard="shard_00000.acts.npy"):
    def mutate(d):
        a = np.load(d / shard)
        a = fn(a)
        np.save(d / shard, a)
    return mutate


shard_case("killed extraction (manifest complete: false)", _manifest(lambda m: m.update(complete=False)), "complete")
shard_case("shard set that does not exist", lambda d: shutil.rmtree(d), "sh")
shard_case("a listed shard file missing", lambda d: (d / "shard_00001.acts.npy").unlink(), "shard_00001")
shard_case("a shard file truncated", lambda d: (d / "shard_00001.acts.npy").write_bytes(
    (d / "shard_00001.acts.npy").read_bytes()[:100]), "shard_00001")
shard_case("manifest.json that does not parse", lambda d: (d / "manifest.json").write_text("{\"format\": "),
           "manifest.json")
shard_case("manifest.json missing", lambda d: (d / "manifest.json").unlink(), "manifest")
shard_case("rows not unit-norm though the manifest says unit_norm (--validate_shards full)",
           _acts_edit(lambda a: a * 3), "shard_00000", extra=("--validate_shards", "full"))
shard_case("a shard listed twice (--validate_shards full)",
           _manifest(lambda m: m["shards"].append(dict(m["shards"][0]))), "shard_00000",
           extra=("--validate_shards", "full"))
shard_case("one NaN row (train)", _acts_edit(lambda a: np.where(np.arange(len(a))[:, None] == 2, np.nan, a)
                                             .astype(a.dtype)), "shard_00000", extra=("--validate_shards", "full"))
shard_case("one NaN row (name)", _acts_edit(lambda a: np.where(np.arange(len(a))[:, None] == 2, np.nan, a)
                                            .astype(a.dtype)), "shard_00000", cmd="name")
shard_case("name --shards of another model, same width",
           _manifest(lambda m: m["source"].update(model="ViT-B-32", pretrained="laion2b_s34b_b79k")), "ViT-B-32",
           cmd="name")
shard_case("name --shards of another width", _manifest(lambda m: m.update(d=48)), "sh", cmd="name")
shard_case("shard dtype in manifest differs from the file", _manifest(lambda m: m.update(dtype="float32")),
           "shard_00000", extra=("--validate_shards", "full"))
shard_case("manifest of another format", _manifest(lambda m: m.update(format="saev")), "manifest")


def _train_run(c, base):
    shutil.copytree(base / "run", c / "run")


CASES += [
    Case("train --overwrite with a bad --init_from keeps the existing run", "shards", "error",
         lambda c, b: _train_run(c, b) or ["train", "--shards", str(b / "sh"), "--out", str(c / "run"), *TR,
                                             "--overwrite", "--init_from", str(c / "nosae")],
         protect=("run",), names="nosae"),
    Case("train --init_from an SAE of another width", "shards", "error",
         lambda c, b: _train_run(c, b) or ["train", "--shards", str(b / "sh"), "--out", str(c / "o"), *TR,
                                             "--init_from", str(b / "sae48")], protect=("run",), names="sae48"),
]


# SAE directories -------------------------------------------------------------
def sae_case(name, mutate, names, expect="error", cmd="name"):
    def setup(c, base):
        shutil.copytree(base / "sae", c / "sae")
        mutate(c / "sae")
        (c / "con").mkdir()
        shutil.copytree(base / "con", c / "con", dirs_exist_ok=True)  # good concepts already there
        if cmd == "browse":
            return ["browse", "--sae", str(c / "sae"), "--shards", str(base / "sh"), "--vocab", str(base / "v.txt"),
                    "--out", str(c / "site"), "--text_cache", str(base / "tc"), "--threads", "1", "--no_stopwords",
                    "--thumb_size", "16", "--workers", "1"]
        return ["name", "--sae", str(c / "sae"), "--vocab", str(base / "v.txt"), "--out", str(c / "con"),
                "--text_cache", str(base / "tc"), "--threads", "1", "--no_stopwords"]
    check = (lambda c, r: (c / "con" / "concepts.json").is_file()) if expect == "accept" else None
    CASES.append(Case(name, "sae", expect, setup, check, ("con",) if expect == "error" else (), names))


def _flip(d):
    p = d / "weights.safetensors"
    b = bytearray(p.read_bytes())
    b[-40] ^= 0xFF
    p.write_bytes(bytes(b))


def _cfg_edit(edit):
    def mutate(d):
        doc = json.loads((d / "cfg.json").read_text())
        edit(doc)
        (d / "cfg.json").write_text(json.dumps(doc))
    return mutate


def _nan_weights(d, keep_checksums=False):
    from safetensors.numpy import load_file, save_file

    t = load_file(d / "weights.safetensors")
    k = sorted(t)[0]
    t[k] = t[k].copy()
    t[k].flat[0] = np.nan
    save_file(t, d / "weights.safetensors", metadata={"format": "visae.sae", "format_version": "1",
                                                       "architecture": "relu"})
    _cfg_edit(lambda doc: doc.pop("checksums", None))(d)


sae_case("--sae directory missing", lambda d: shutil.rmtree(d), "sae")
sae_case("SAE directory without cfg.json", lambda d: (d / "cfg.json").unlink(), "cfg.json")
sae_case("SAE directory without weights.safetensors", lambda d: (d / "weights.safetensors").unlink(),
         "weights.safetensors")
sae_case("cfg.json that does not parse", lambda d: (d / "cfg.json").write_text("{\"d_in\": 3,"), "cfg.json")
sae_case("cfg.json empty", lambda d: (d / "cfg.json").write_text(""), "cfg.json")
sae_case("cfg.json a JSON list", lambda d: (d / "cfg.json").write_text("[1, 2]"), "cfg.json")
sae_case("bytes flipped inside weights.safetensors", _flip, "weights.safetensors")
sae_case("weights.safetensors truncated", lambda d: (d / "weights.safetensors").write_bytes(
    (d / "weights.safetensors").read_bytes()[:200]), "weights.safetensors")
sae_case("NaN weights (no checksum: a foreign SAE)", _nan_weights, "weights.safetensors")
sae_case("cfg.json edited: d_sae differs from the weights", _cfg_edit(lambda doc: doc.update(d_sae=65)), "cfg.json")
sae_case("cfg.json edited without checksums: d_sae differs from the weights",
         _cfg_edit(lambda doc: doc.update(d_sae=65) or doc.pop("checksums")), "d_sae")
sae_case("cfg.json unknown architecture (no checksums)",
         _cfg_edit(lambda doc: doc.update(architecture="mystery") or doc.pop("checksums")), "mystery")
sae_case("cfg.json format_version 99 (no checksums)",
         _cfg_edit(lambda doc: doc.update(format_version=99) or doc.pop("checksums")), "cfg.json")
sae_case("weights.safetensors is a directory",
         lambda d: (d / "weights.safetensors").unlink() or (d / "weights.safetensors").mkdir(), "weights.safetensors")
sae_case("cfg.json without checksums (from another tool): accepted with a warning",
         _cfg_edit(lambda doc: doc.pop("checksums")), None, expect="accept")
sae_case("browse: bytes flipped in the SAE's weights", _flip, "weights.safetensors", cmd="browse")


# vocabularies ----------------------------------------------------------------
def vocab_case(name, content, expect, names=None, check=None, cmd="name"):
    def setup(c, base):
        shutil.copytree(base / "sae", c / "sae")
        if content is not None:
            (c / "v.txt").write_bytes(content)
        if cmd == "browse":
            return ["browse", "--sae", str(c / "sae"), "--shards", str(base / "sh"), "--vocab", str(c / "v.txt"),
                    "--out", str(c / "site"), "--text_cache", str(c / "tc"), "--threads", "1", "--no_stopwords",
                    "--no_alpha_only", "--thumb_size", "16", "--workers", "1"]
        return ["name", "--sae", str(c / "sae"), "--vocab", str(c / "v.txt"), "--out", str(c / "con"),
                "--text_cache", str(c / "tc"), "--threads", "1", "--no_stopwords"]
    CASES.append(Case(name, "vocab", expect, setup, check, ("sae",), names))


def _site_json_parses(c, r):
    import re

    page = (c / "site" / "index.html").read_text()
    m = re.search(r'<script id="concept-data" type="application/json">(.*?)</script>', page, re.S)
    if not m or "<!--" in m.group(1) or "<script" in m.group(1).lower():
        return False
    return len(json.loads(m.group(1))["concepts"]) > 0


vocab_case("vocabulary file missing", None, "error", "v.txt")
vocab_case("vocabulary empty", b"", "error", "v.txt")
vocab_case("vocabulary of blank lines only", b"\n\n   \n", "error", "v.txt")
vocab_case("vocabulary not UTF-8 (Latin-1 bytes)", b"red\ncaf\xe9\nblue\n", "error", "v.txt")
vocab_case("vocabulary with a UTF-8 BOM and CRLF", b"\xef\xbb\xbfred\r\nblue\r\ngreen\r\ndog\r\n", "accept",
           check=lambda c, r: {n for x in json.loads((c / "con" / "concepts.json").read_text())["concepts"]
                               for n in [x.get("name")] if n} <= {"red", "blue", "green", "dog"})
vocab_case("vocabulary with duplicates", b"red\nred\nblue\nblue\ngreen\n", "accept",
           check=lambda c, r: (c / "con" / "concepts.json").is_file())
vocab_case("vocabulary entry <!--<script> (site JSON must still parse)",
           b"<!--<script>\nred\nblue\n</script>\n\"quoted\"\n", "accept", check=_site_json_parses, cmd="browse")


# browse / select / serve -----------------------------------------------------
def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def _serve_busy(c, base, holder):
    shutil.copytree(base / "site", c / "site")
    return ["browse", "serve", str(c / "site"), "--port", str(holder.getsockname()[1])]


CASES += [
    Case("browse serve on a busy port", "browse", "error", None, None, ("site",), None, hold=_busy_port),
    Case("browse serve of a folder that is not a site", "browse", "error",
         lambda c, b: (c / "empty").mkdir() or ["browse", "serve", str(c / "empty"), "--port", "0"], names="empty"),
    Case("browse with a missing --sae", "browse", "error",
         lambda c, b: ["browse", "--sae", str(c / "nosae"), "--shards", str(b / "sh"), "--out", str(c / "site")],
         names="nosae"),
    Case("browse --out that is a file", "browse", "error",
         lambda c, b: (c / "site").write_text("keep") and
         ["browse", "--sae", str(b / "sae"), "--shards", str(b / "sh"), "--out", str(c / "site"),
          "--vocab", str(b / "v.txt"), "--text_cache", str(b / "tc")], protect=("site",), names="site"),
    Case("select --sweep that does not exist", "browse", "error",
         lambda c, b: ["select", "--sweep", str(c / "nosweep")], names="nosweep"),
    Case("select --sweep of an empty folder (nothing written)", "browse", "error",
         lambda c, b: (c / "sw").mkdir() or ["select", "--sweep", str(c / "sw")], protect=("sw",), names="sw"),
    Case("select --sweep pointing at an SAE directory", "browse", "error",
         lambda c, b: shutil.copytree(b / "sae", c / "sae") and ["select", "--sweep", str(c / "sae")],
         protect=("sae",), names="sae"),
]


# The inputs the issue names (run first when the time budget is short).
ISSUE_NAMED = ("I;16", "symlink loop", "newline and tab", "Latin-1 byte", "repeated member", "orphan label",
               "hard link", "symlink to an image", "killed extraction", "another model", "another width",
               "not unit-norm", "listed twice", "NaN row", "bytes flipped", "NaN weights", "--sae directory missing",
               "without cfg.json", "without weights", "does not parse", "cfg.json empty", "a JSON list", "truncated",
               "d_sae differs", "unknown architecture", "format_version", "is a directory", "busy port",
               "missing --sae", "mistyped", "bad --init_from", "<!--<script>", "empty folder", "select --sweep of an")


# ----------------------------------------------------------------------------- base artifacts
def make_base(base: Path) -> None:
    folder(base / "imgs", 12)
    steps = [["extract", "--images", str(base / "imgs"), "--out", str(base / "sh"), *EX],
             ["train", "--shards", str(base / "sh"), "--out", str(base / "sae"), *TR],
             ["train", "--shards", str(base / "sh"), "--out", str(base / "run"), *TR, "--keep_checkpoint"],
             ["train", "--shards", str(base / "sh"), "--out", str(base / "sae48"), *TR[:5], "3",
              *TR[6:]]]
    (base / "v.txt").write_text("red\nblue\ngreen\ndog\ncat\nhouse\ntree\ncar\n")
    for argv in steps:
        r = run(argv, base)
        if r.returncode:
            raise SystemExit(f"base artifact failed: visae {' '.join(argv)}\n{r.stderr[-3000:]}")
    for argv in (["name", "--sae", str(base / "sae"), "--vocab", str(base / "v.txt"), "--out", str(base / "con"),
                  "--text_cache", str(base / "tc"), "--threads", "1", "--no_stopwords"],
                 ["browse", "--sae", str(base / "sae"), "--shards", str(base / "sh"), "--vocab", str(base / "v.txt"),
                  "--out", str(base / "site"), "--text_cache", str(base / "tc"), "--threads", "1", "--no_stopwords",
                  "--thumb_size", "16", "--workers", "1"]):
        r = run(argv, base)
        if r.returncode:
            raise SystemExit(f"base artifact failed: visae {' '.join(argv)}\n{r.stderr[-3000:]}")


# ----------------------------------------------------------------------------- running and classifying
def run_case(i: int, cs: Case, root: Path, base: Path) -> dict[str, Any]:
    c = root / f"case{i:03d}"
    c.mkdir()
    holder = cs.hold() if cs.hold else None
    t0 = time.perf_counter()
    res: dict[str, Any] = {"i": i, "name": cs.name, "group": cs.group, "expect": cs.expect}
    try:
        try:
            argv = _serve_busy(c, base, holder) if cs.hold else cs.setup(c, base)
        except Exception as e:  # noqa: BLE001 - the harness could not make the input: reported, not classified
            res.update(cls="setup_failed", rc=None, argv=[], seconds=0.0, stderr_tail=f"{type(e).__name__}: {e}",
                       damaged=[], check=None)
            return res
        before = {p: tree_hash(c / p) for p in cs.protect}
        try:
            r = run(argv, c, timeout=240 if argv[0] != "browse" or argv[1] != "serve" else 30)
            rc, err = r.returncode, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = 124, (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
        after = {p: tree_hash(c / p) for p in cs.protect}
    finally:
        if holder is not None:
            holder.close()
    tb = "Traceback (most recent call last)" in err
    damaged = [p for p in cs.protect if before[p] != after[p]]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    check_ok = None
    if rc == 0 and cs.check is not None:
        try:
            check_ok = bool(cs.check(c, r))
        except Exception as e:  # noqa: BLE001 - a result the check cannot read is a wrong result
            check_ok, last = False, f"check raised {type(e).__name__}: {e}"
    expect_err = cs.expect in ("error", "error_or_skip")
    if damaged:
        cls = "damage"
    elif tb:
        cls = "traceback"
    elif rc != 0:
        clear = rc != 124 and bool(last) and (cs.names is None or cs.names.lower() in err.lower())
        if expect_err and clear:
            cls = "ok_error_or_skip"
        elif expect_err:
            cls = "unclear_error"
        else:
            cls = "refused_valid"
    else:
        if cs.expect == "error":
            cls = "silent_wrong"
        elif check_ok is False:
            cls = "silent_wrong"
        elif cs.expect in ("skip", "error_or_skip"):
            cls = "ok_error_or_skip"
        elif cs.expect == "accept_or_skip":
            cls = "ok_accept"
        else:
            cls = "ok_accept"
    res.update(cls=cls, rc=rc, argv=["visae", *argv], seconds=round(time.perf_counter() - t0, 1), stderr_tail=last[:400],
               damaged=damaged, check=check_ok)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bad_inputs.json")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="", help="run only cases whose name contains one of these ('|'-separated)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--budget_s", type=float, default=3600, help="start no case after this many seconds")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="visae_bad_inputs_"))
    base = root / "base"
    base.mkdir()
    t0 = time.perf_counter()
    make_base(base)
    print(f"base artifacts in {time.perf_counter() - t0:.0f} s", flush=True)
    todo = [(i, cs) for i, cs in enumerate(CASES) if any(o in cs.name for o in args.only.split("|"))]
    todo.sort(key=lambda a: not any(k in a[1].name for k in ISSUE_NAMED))  # the issue's own inputs first
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    deadline = time.perf_counter() + args.budget_s
    with ThreadPoolExecutor(args.workers) as pool:
        futs = {pool.submit(lambda a: None if time.perf_counter() > deadline else run_case(a[0], a[1], root, base), a)
                for a in todo}
        for f in as_completed(futs):
            r = f.result()
            if r is None:
                continue
            results.append(r)
            print(f"{r['cls']:17s} rc={r['rc']!s:<4} {r['group']:8s} {r['name'][:70]:70s} | {r['stderr_tail'][:150]}",
                  flush=True)
            out.write_text(json.dumps({"tried": len(results), "cases": results}, indent=1))
    results.sort(key=lambda r: r["i"])
    cols = ["ok_error_or_skip", "ok_accept", "traceback", "silent_wrong", "damage", "unclear_error", "refused_valid",
            "setup_failed"]
    counts = {k: sum(r["cls"] == k for r in results) for k in cols}
    print("\n| tried | clear error or counted skip | correct acceptance | traceback | silent wrong | damage |"
          " unclear error | valid input refused | harness could not build |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {len(results)} | " + " | ".join(str(counts[k]) for k in cols) + " |")
    groups = sorted({r["group"] for r in results})
    print("\nper group: " + ", ".join(f"{g} {sum(r['group'] == g for r in results)}" for g in groups))
    out.write_text(json.dumps({"tried": len(results), "not_run": len(todo) - len(results), "counts": counts, "seconds": round(time.perf_counter() - t0, 1),
                               "cases": results}, indent=1))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"kept {root}")


if __name__ == "__main__":
    main()
