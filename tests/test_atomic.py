"""visae.atomic: writes appear whole or not at all, and a failed write leaves no temporary file behind."""

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO
from visae.atomic import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    f = tmp_path / "a.json"
    atomic_write_text(f, "old")
    atomic_write_json(f, {"x": [1, 2]})
    assert json.loads(f.read_text()) == {"x": [1, 2]} and _names(tmp_path) == ["a.json"]
    atomic_write_bytes(f, b"\x00\x01", fsync=False)
    assert f.read_bytes() == b"\x00\x01" and _names(tmp_path) == ["a.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(f) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("boom")
    assert f.read_text() == "old" and _names(tmp_path) == ["cfg.json"]
    # not JSON-able: serialised before anything is written
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "new.json", {"x": object()})
    assert _names(tmp_path) == ["cfg.json"]
    # a block that writes nothing is an error, not an empty file
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "empty.png"):
            pass
    assert _names(tmp_path) == ["cfg.json"]


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path):
    # a child writes 1 MB in pieces and is SIGKILLed mid-write: the destination keeps the old content
    f = tmp_path / "big.bin"
    f.write_bytes(b"o" * 10)
    code = ("import os, signal, sys\nfrom visae.atomic import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp, open(tmp, 'wb') as fh:\n"
            "    fh.write(b'n' * 500000); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(f)], cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert f.read_bytes() == b"o" * 10
    strays = [n for n in _names(tmp_path) if n != "big.bin"]
    assert len(strays) == 1 and strays[0].startswith(".big.bin.") and strays[0].endswith(".tmp")


def test_temporary_names_differ_between_threads(tmp_path):
    # eight threads write the same destination at once: each rename is whole, the last one wins
    f = tmp_path / "t.txt"
    errors = []

    def write(i):
        try:
            for _ in range(20):
                atomic_write_text(f, str(i) * 1000, fsync=False)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    text = f.read_text()
    assert len(text) == 1000 and len(set(text)) == 1 and _names(tmp_path) == ["t.txt"]


def test_atomic_dir_error_keep_replace(tmp_path):
    d = tmp_path / "out"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    assert (d / "a").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_dir(d) as tmp:
            (tmp / "a").write_text("2")
    with atomic_dir(d, if_exists="keep") as tmp:  # another process made it first
        (tmp / "a").write_text("2")
    assert (d / "a").read_text() == "1"
    with atomic_dir(d, if_exists="replace") as tmp:
        (tmp / "b").write_text("3")
    assert _names(d) == ["b"]
    with pytest.raises(RuntimeError):
        with atomic_dir(d, if_exists="replace") as tmp:
            (tmp / "c").write_text("4")
            raise RuntimeError("failed half-way")
    assert _names(d) == ["b"] and _names(tmp_path) == ["out"]
    with pytest.raises(ValueError, match="if_exists"):
        with atomic_dir(d, if_exists="overwrite"):
            pass


def test_no_module_hand_rolls_a_temp_file_and_rename():
    # every atomic write goes through visae.atomic: os.replace / os.rename appear nowhere else in the package,
    # except merging shard sets, which moves finished shard files (not a write)
    allowed = {("visae/shards.py", "os.replace(src, dst)")}
    found = []
    for path in sorted((REPO / "visae").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "visae/atomic.py":
            continue
        for line in path.read_text().splitlines():
            for call in ("os.replace(", "os.rename(", ".rename("):
                if call in line and not any(rel == a and s in line for a, s in allowed):
                    found.append(f"{rel}: {line.strip()}")
    assert not found, "hand-rolled temp file + rename (use visae.atomic):\n" + "\n".join(found)


def _tree_digest(root):
    """{relative path: sha256} of every regular file under ``root`` (the lock file excluded)."""
    import hashlib
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name != ".visae.lock":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_sae_save_failing_part_way_leaves_the_previous_sae_byte_identical(tmp_path, monkeypatch):
    import torch

    import visae.atomic as va
    from visae.sae import SAEConfig, build_sae, load_sae

    torch.manual_seed(0)
    d = tmp_path / "sae"
    old = build_sae(SAEConfig(d_in=8, d_sae=16, architecture="relu"))
    old.save(d, extra={"v": 1})
    (d / "metrics.jsonl").write_text('{"step": 1}\n')  # a training log beside the weights
    before = _tree_digest(d)
    new = build_sae(SAEConfig(d_in=8, d_sae=16, architecture="relu"))
    real = va.atomic_write_text

    def fail_on_cfg(path, text, **kw):  # the weights are written, the commit point is not
        if Path(path).name == "cfg.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, text, **kw)

    monkeypatch.setattr(va, "atomic_write_text", fail_on_cfg)
    with pytest.raises(OSError):
        new.save(d, extra={"v": 2})
    monkeypatch.undo()
    assert _tree_digest(d) == before
    assert [p.name for p in tmp_path.iterdir()] == ["sae"], "the staging directory was not removed"
    assert load_sae(d).extra == {"v": 1}
    stale = tmp_path / ".sae.999999999.0badf00d.tmp"  # the staging directory of a killed save (pid gone)
    (stale / "sub").mkdir(parents=True)
    new.save(d, extra={"v": 2})  # a save that completes swaps in, keeps the log, removes the stale staging dir
    assert not stale.exists()
    assert load_sae(d).extra == {"v": 2}
    assert (d / "metrics.jsonl").read_text() == '{"step": 1}\n'
    torch.testing.assert_close(load_sae(d).W_dec, new.W_dec, rtol=0, atol=0)


def test_append_lines_ends_a_torn_last_line_first(tmp_path):
    from visae.atomic import append_lines

    log = tmp_path / "log.jsonl"
    append_lines(log, ['{"a": 1}\n'])
    with open(log, "a") as f:
        f.write('{"b": ')  # a record cut off by a kill
    append_lines(log, ['{"c": 3}\n', '{"d": 4}\n'])
    append_lines(log, [])
    assert log.read_text().splitlines() == ['{"a": 1}', '{"b": ', '{"c": 3}', '{"d": 4}']


def test_a_failed_output_lock_block_removes_the_directories_it_created(tmp_path):
    """A command refused inside its output lock left the directory it had made with only its lock file in it
    (`visae name --sae missing` left concepts/.visae.lock, `visae extract` with a bad --images left runs/)."""
    from visae.atomic import output_lock

    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError, match="bad input"):
        with output_lock(tmp_path / "kept" / "a" / "b"):
            raise ValueError("bad input")
    assert _names(tmp_path) == ["kept"] and _names(tmp_path / "kept") == []  # a, a/b gone; kept was there before
    with pytest.raises(ValueError):
        with output_lock(tmp_path / "c" / "d") as out:
            (out / "part.json").write_text("{}")  # something was written: kept
            raise ValueError("later")
    assert _names(tmp_path / "c" / "d") == [".visae.lock", "part.json"]
    with output_lock(tmp_path / "e"):  # a block that succeeds keeps its directory
        pass
    assert (tmp_path / "e").is_dir()


@pytest.mark.parametrize("argv", [["name", "--sae", "missing"], ["extract", "--images", "missing", "--model", "visae-toyclip"],
                                  ["train", "--shards", "missing"]])
def test_a_command_refused_on_bad_input_leaves_no_directory(tmp_path, monkeypatch, capsys, argv):
    from visae.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--out", "runs/x"]) != 0
    assert "missing" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_an_output_path_taken_by_a_file_is_a_usage_error_before_any_work(tmp_path, capsys):
    """--out naming a file (or under one): exit 2 with one line naming it, for the commands that lock their output
    (output_lock), the demo (which creates its --out itself) and cbm (which wrote its --out only after every fit);
    the file is left as it was."""
    from visae.atomic import OutputPathError, output_lock
    from visae.cli import main as visae

    f = tmp_path / "results.txt"
    f.write_text("keep")
    for out in (f, f / "sub"):
        with pytest.raises(OutputPathError, match=f"--out {out}: {f} is a file, not a directory; give visae x another"):
            with output_lock(out, "visae x"):
                pass
    for argv in (["demo", "--out", str(f), "--no_progress"],
                 ["name", "--sae", str(tmp_path / "no_sae"), "--out", str(f / "sub")],
                 ["toyworld", "--out", str(f), "--n", "4"]):
        assert visae(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{f} is a file, not a directory" in err, err
    from visae.cbm import CBMConfig, train_cbm

    with pytest.raises(OutputPathError, match="give visae cbm another --out"):  # before reading any input
        train_cbm(CBMConfig(sae=str(tmp_path / "x"), concepts=str(tmp_path / "x"), train_shards=str(tmp_path / "x"),
                            val_shards=str(tmp_path / "y"), out=str(f)))
    assert f.read_text() == "keep"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # mkdir fails on it: refused the same way
    with pytest.raises(OutputPathError, match="dangling is a dangling link"):
        with output_lock(tmp_path / "dangling" / "out", "visae x"):
            pass
