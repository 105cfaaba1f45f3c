"""Streaming webdataset sources (pipe: and http(s) URLs): equal to local tars, resumable by sample count, bad sources refused.

Three tars of 8 generated JPEGs each (one undecodable), written with webdataset's TarWriter and served by a local
``http.server`` on 127.0.0.1 (port 0) that logs every request.
"""

import http.server
import io
import json
import shutil
import socket
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visae.backbones import TINY_CLIP_NAME, load_backbone
from visae.extract import ExtractConfig, _SimulatedKill, extract, main, read_skipped
from visae.shards import ShardSet

N_SHARDS, PER_SHARD, BAD = 3, 8, "s0009"  # s0009: item 9, the second sample of shard 1, is not an image

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset streams http(s) with the curl command")


def _jpeg(k: int) -> bytes:
    rng = np.random.default_rng(k)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), "RGB").save(b, format="JPEG", quality=90)
    return b.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    import webdataset as wds

    d = tmp_path_factory.mktemp("wds")
    k = 0
    for t in range(N_SHARDS):
        with wds.TarWriter(str(d / f"shard-{t:03d}.tar")) as w:
            for _ in range(PER_SHARD):
                key = f"s{k:04d}"
                w.write({"__key__": key, "jpg": b"not a jpeg" if key == BAD else _jpeg(k), "cls": str(k % 5).encode()})
                k += 1
    return d


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.requests.append((self.path, self.headers.get("Range")))
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(shards):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(shards)))
    httpd.requests = []
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    t.join(timeout=10)


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY_CLIP_NAME, random_init=True)


def _url(server, last=N_SHARDS - 1) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/shard-{{000..{last:03d}}}.tar"


def _cfg(images, out, **kw) -> ExtractConfig:
    base = dict(images=str(images), out=str(out), model=TINY_CLIP_NAME, random_init=True, batch_size=4,
                num_workers=0, progress=False, dtype="float32", shard_size=6)
    base.update(kw)
    return ExtractConfig(**base)


def _assert_same_rows(got: ShardSet, want: ShardSet) -> None:
    """Same items in the same batches through the same model in this process: the same float32 bits, so exact."""
    gm, wm = got.metadata(), want.metadata()
    assert list(gm["id"]) == list(wm["id"])
    assert np.array_equal(gm["label"], wm["label"]) and np.array_equal(gm["norm"], wm["norm"])
    a, b = got.read(np.arange(len(got))), want.read(np.arange(len(want)))
    assert np.array_equal(a, b), f"max |diff| {np.abs(a - b).max()}"


def test_http_and_pipe_streams_equal_local_tars_row_for_row(shards, server, tiny, tmp_path):
    local = extract(_cfg(shards / "shard-{000..002}.tar", tmp_path / "local"), backbone=tiny)
    assert len(local) == N_SHARDS * PER_SHARD - 1 and BAD in read_skipped(tmp_path / "local")
    # (pipe: with 2 decoding processes, which must hand the batches back in stream order)
    for name, spec, workers in (("http", _url(server), 0), ("pipe", f"pipe:cat {shards}/shard-{{000..002}}.tar", 2)):
        got = extract(_cfg(spec, tmp_path / name, num_workers=workers), backbone=tiny)
        _assert_same_rows(got, local)
        skipped = read_skipped(tmp_path / name)  # (the reason names a BytesIO object's address: compare the kind)
        assert skipped.keys() == {BAD} and skipped[BAD].startswith("UnidentifiedImageError")
        src = got.manifest["source"]
        assert src["dataset"] == spec and src["dataset_kind"] == "webdataset"
        assert src["dataset_info"]["streaming"] is True and src["dataset_info"]["transport"] == name
        assert src["dataset_info"]["shards"] == N_SHARDS and src["dataset_info"]["num_items"] is None
        rep = json.loads((tmp_path / name / "extract_report.json").read_text())
        assert rep["items"] == N_SHARDS * PER_SHARD and rep["skipped"] == 1
    # --limit: the first N samples of the stream, as for local tars
    lim = extract(_cfg(_url(server), tmp_path / "lim", limit=10), backbone=tiny)
    assert list(lim.metadata()["id"]) == [i for i in local.metadata()["id"][:9]]  # 10 items, s0009 skipped
    assert json.loads((tmp_path / "lim" / "extract_report.json").read_text())["items"] == 10


def test_resume_after_kill_reads_only_the_remaining_samples(shards, server, tiny, tmp_path, monkeypatch):
    import visae.wds_stream as ws

    full = extract(_cfg(_url(server), tmp_path / "full"), backbone=tiny)
    decoded: list[str] = []
    orig = ws.decode_raw

    def counting(raw, preprocess):
        decoded.append(raw.id)
        return orig(raw, preprocess)

    monkeypatch.setattr(ws, "decode_raw", counting)
    out = tmp_path / "resumed"
    with pytest.raises(_SimulatedKill):  # 4 batches of 4 = items 0..15, 15 rows; shards of 6 commit rows 0..11
        extract(_cfg(_url(server), out), backbone=tiny, _fail_after_batches=4)
    part = ShardSet(out, require_complete=False)
    assert not part.manifest["complete"] and len(part) == 12
    assert str(part.metadata()["id"][-1]) == "s0012"  # row 11: items 0..8, 10, 11, 12 (s0009 skipped)
    decoded.clear()
    n_req = len(server.requests)
    res = extract(_cfg(_url(server), out), backbone=tiny)
    # the commit cut the batch of items 12..15: it is recomputed whole (its committed row dropped), then the rest;
    # items 8..11 of shard 1 are read from the stream but not decoded, shard 0 is not downloaded at all
    assert decoded == [f"s{k:04d}" for k in range(12, N_SHARDS * PER_SHARD)]
    full_gets = [p for p, rng in server.requests[n_req:] if rng is None]
    assert full_gets == ["/shard-001.tar", "/shard-002.tar"]
    _assert_same_rows(res, full)
    for f in sorted((tmp_path / "full").glob("shard_*.acts.npy")):  # byte-identical shard files
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert read_skipped(out).keys() == read_skipped(tmp_path / "full").keys() == {BAD}
    assert json.loads((out / "extract_report.json").read_text())["items"] == N_SHARDS * PER_SHARD


def test_resume_of_patch_rows_with_another_batch_size(shards, tiny, tmp_path):
    spec = f"pipe:cat {shards}/shard-{{000..002}}.tar"
    kw = dict(layer=0, token="patch", shard_size=20)
    full = extract(_cfg(spec, tmp_path / "full", **kw), backbone=tiny)
    out = tmp_path / "r"
    with pytest.raises(_SimulatedKill):
        extract(_cfg(spec, out, **kw), backbone=tiny, _fail_after_batches=3)
    last = str(ShardSet(out, require_complete=False).metadata()["id"][-1])
    assert "#p" in last  # the commit fell inside an image's patch rows
    res = extract(_cfg(spec, out, **dict(kw, batch_size=3)), backbone=tiny)
    assert list(res.metadata()["id"]) == list(full.metadata()["id"])
    # LEFT as test_extract's resume test: another batch composition, float32 transformer rows agree only to
    # batching noise, which has no useful derived bound
    assert np.allclose(res.read(np.arange(len(res))), full.read(np.arange(len(full))), rtol=1e-5, atol=1e-6)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("case", ["refused", "404", "brace", "unbalanced", "pipe_fails", "not_tar"])
def test_bad_stream_sources_fail_clearly_before_anything_is_written(case, shards, server, tmp_path, capsys):
    port = server.server_address[1]
    spec, expect = {
        "refused": (f"http://127.0.0.1:{_closed_port()}/shard-{{000..002}}.tar", "cannot be reached"),
        "404": (f"http://127.0.0.1:{port}/shard-{{000..003}}.tar", "HTTP 404"),
        "brace": (f"http://127.0.0.1:{port}/shard-{{000..}}.tar", "brace range left unexpanded"),
        "unbalanced": (f"http://127.0.0.1:{port}/shard-{{000..002.tar", "malformed brace"),
        "pipe_fails": (f"pipe:cat {shards}/missing-{{000..001}}.tar", "exit status 1"),
        "not_tar": ("pipe:echo hello", "expected a webdataset .tar shard"),
    }[case]
    out = tmp_path / "out"
    rc = main(["--images", spec, "--out", str(out), "--model", TINY_CLIP_NAME, "--random_init", "--no_progress",
               "--num_workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err, err
    named = {"404": "shard-003.tar", "pipe_fails": "missing-000.tar"}.get(case, spec.split("{")[0])
    assert named in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_several_layers_from_a_stream_resume_and_overwrite(shards, tiny, tmp_path):
    from visae.wds_stream import PROGRESS, read_progress

    spec = f"pipe:cat {shards}/shard-{{000..002}}.tar"
    kw = dict(layer="0,1", shard_size=5)
    full = extract(_cfg(spec, tmp_path / "full", **kw), backbone=tiny)
    out = tmp_path / "r"
    with pytest.raises(_SimulatedKill):
        extract(_cfg(spec, out, **kw), backbone=tiny, _fail_after_batches=3)
    res = extract(_cfg(spec, out, **kw), backbone=tiny)
    assert sorted(res) == sorted(full) == [0, 1]
    for L in full:
        _assert_same_rows(res[L], full[L])
    # --overwrite starts the progress file afresh: one stream read, one end record
    extract(_cfg(spec, out, overwrite=True, **kw), backbone=tiny)
    ends = [r for r in read_progress(out) if "end" in r]
    assert ends == [{"end": N_SHARDS * PER_SHARD}] and (out / PROGRESS).is_file()


def test_a_command_failing_mid_run_stops_clearly_and_the_rerun_continues(shards, tiny, tmp_path):
    from visae.images import SourceError

    d = tmp_path / "partial"
    d.mkdir()
    for t in (0, 2):  # the probe tries the first and the last command only: shard 1 is missing until the rerun
        shutil.copy(shards / f"shard-{t:03d}.tar", d)
    spec = f"pipe:cat {d}/shard-{{000..002}}.tar"
    out = tmp_path / "out"
    with pytest.raises(SourceError, match=r"shard-001\.tar: reading failed .*rerun the same command"):
        extract(_cfg(spec, out), backbone=tiny)
    part = ShardSet(out, require_complete=False)
    assert not part.manifest["complete"] and len(part) == 6  # shard 0's 8 rows, shards of 6: one committed
    shutil.copy(shards / "shard-001.tar", d)
    res = extract(_cfg(spec, out), backbone=tiny)
    _assert_same_rows(res, extract(_cfg(f"pipe:cat {shards}/shard-{{000..002}}.tar", tmp_path / "full"), backbone=tiny))


def test_a_command_that_hangs_is_stopped_by_the_probe(monkeypatch):
    import visae.wds_stream as ws
    from visae.images import SourceError

    monkeypatch.setattr(ws, "PIPE_PROBE_TIMEOUT_S", 1.0)
    with pytest.raises(SourceError, match="no tar header within 1 s"):
        ws.open_stream("pipe:sleep 30")
