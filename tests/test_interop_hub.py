"""hf:// loading through huggingface_hub's cache (offline) and `visae push` (SAELens layout)."""

import shutil

import pytest
import torch

from visae import cli
from visae.interop.hub import HubError, parse_hf_uri
from visae.interop.saelens import export_saelens
from visae.sae import SAEConfig, build_sae, load_sae

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _sae(seed=0, arch="topk"):
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(architecture=arch, d_in=16, d_sae=40, k=4), generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05, generator=g)
    sae.extra = {"source": {"model": "visae-tiny-test", "layer": 2, "token": "all"}}
    return sae.eval()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF hub cache in tmp_path with offline mode on (as HF_HUB_OFFLINE=1 sets it)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _prefill(cache, repo_id, files_from: dict):
    """Lay out a cached snapshot the way huggingface_hub stores one: refs/main -> snapshots/<commit>/..."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    for sub, src in files_from.items():
        shutil.copytree(src, snap / sub)
    return snap


def test_load_from_prefilled_cache_offline(tmp_path, offline_cache):
    a, b = _sae(0), _sae(1, arch="relu")
    a.save(tmp_path / "a")
    export_saelens(b, tmp_path / "b_sl")  # what `visae push` uploads
    _prefill(offline_cache, "someone/vision-saes", {"layer2": tmp_path / "a", "sl/l2": tmp_path / "b_sl"})
    got = load_sae("hf://someone/vision-saes/layer2")
    assert all(torch.equal(got.state_dict()[k], v) for k, v in a.state_dict().items())
    assert got.extra["source"]["layer"] == 2
    got_b = load_sae("hf://someone/vision-saes/sl/l2")
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(2)) * 4
    with torch.no_grad():
        want, have = b(x)[0], got_b(x)[0]
    tol = 4 * torch.finfo(torch.float32).eps * (16 + 40) * float(want.abs().max())
    assert (want - have).abs().max() <= tol
    assert got_b.extra["imported_from"]["hub"] == "hf://someone/vision-saes/sl/l2"


def test_offline_and_not_cached_is_a_clear_error(offline_cache):
    with pytest.raises(HubError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE=1.*huggingface-cli download "
                                       r"someone/absent --include 'x/\*'"):
        load_sae("hf://someone/absent/x")


def test_parse_hf_uri():
    assert parse_hf_uri("hf://org/repo") == ("org/repo", "", None)
    assert parse_hf_uri("hf://org/repo/a/b@v1") == ("org/repo", "a/b", "v1")
    with pytest.raises(HubError, match="hf://org/repo"):
        parse_hf_uri("hf://justone")


def test_push_dry_run_writes_saelens_layout(tmp_path, offline_cache, capsys):
    sae = _sae(3)
    sae.save(tmp_path / "sae")
    rc = cli.main(["push", "--sae", str(tmp_path / "sae"), "--repo", "me/saes", "--subfolder", "layer2",
                   "--dry_run", "--out", str(tmp_path / "staged")])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "staged").iterdir()) == ["README.md", "cfg.json", "sae_weights.safetensors"]
    assert "load_sae(\"hf://me/saes/layer2\")" in (tmp_path / "staged" / "README.md").read_text()
    # staged again into the same folder (its README.md beside the export): allowed, as any re-export
    assert cli.main(["push", "--sae", str(tmp_path / "sae"), "--repo", "me/saes", "--subfolder", "layer2",
                     "--dry_run", "--out", str(tmp_path / "staged")]) == 0, capsys.readouterr().err
    sae_lens = pytest.importorskip("sae_lens")
    sl = sae_lens.SAE.load_from_disk(str(tmp_path / "staged"))
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        want, have = sae(x)[0], sl(x)
    assert (want - have).abs().max() <= 4 * torch.finfo(torch.float32).eps * 56 * float(want.abs().max())


def test_push_uploads_the_staged_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, **kw):
        calls["upload"] = (repo_id, path_in_repo, kw)
        calls["copy"] = tmp_path / "uploaded"
        shutil.copytree(folder_path, calls["copy"])  # the folder is a temporary one: keep what was sent
        return "https://huggingface.co/me/saes/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    sae = _sae(5)
    sae.save(tmp_path / "sae")
    assert cli.main(["push", "--sae", str(tmp_path / "sae"), "--repo", "me/saes", "--subfolder", "layer2",
                     "--private"]) == 0
    assert calls["create"] == ("me/saes", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["upload"][:2] == ("me/saes", "layer2")
    # what was uploaded loads back as the same SAE (through the SAELens layout)
    from visae.interop.saelens import import_saelens

    back = import_saelens(calls["copy"])
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (back(x)[0] - sae(x)[0]).abs().max() <= 4 * torch.finfo(torch.float32).eps * 56 * float(sae(x)[0].abs().max())


def test_push_refuses_offline_before_work(tmp_path, offline_cache, capsys):
    _sae().save(tmp_path / "sae")
    assert cli.main(["push", "--sae", str(tmp_path / "sae"), "--repo", "me/saes"]) == 1
    assert "offline mode is set" in capsys.readouterr().err


def test_push_without_a_network_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    """No network and HF_HUB_OFFLINE unset: the hub client's connection error (httpx's, not an OSError) was a
    traceback; now one line naming the repo and what to do, exit 1 (good input that could not finish here)."""
    import httpx
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("VISAE_TRACEBACK", raising=False)

    def create_repo(self, repo_id, **kw):
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    _sae().save(tmp_path / "sae")
    assert cli.main(["push", "--sae", str(tmp_path / "sae"), "--repo", "me/saes"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot push to me/saes: ConnectError" in err and "--dry_run" in err

    def other_bug(self, repo_id, **kw):
        raise ZeroDivisionError("a bug, not the network")

    monkeypatch.setattr(HfApi, "create_repo", other_bug)
    with pytest.raises(ZeroDivisionError):  # anything else keeps its traceback
        cli.main(["push", "--sae", str(tmp_path / "sae"), "--repo", "me/saes"])


@pytest.mark.parametrize("flags, what", [(["--repo", "bad repo"], "--repo 'bad repo'"),
                                         (["--subfolder", "../../etc"], "--subfolder '../../etc'"),
                                         (["--subfolder", "a//b"], "--subfolder 'a//b'")])
def test_a_dry_run_checks_the_repo_and_subfolder_a_push_would_use(flags, what, tmp_path, capsys):
    _sae().save(tmp_path / "sae")
    assert cli.main(["push", "--sae", str(tmp_path / "sae"), "--dry_run", "--out", str(tmp_path / "st"), *flags]) == 2
    assert what in capsys.readouterr().err
    assert not (tmp_path / "st").exists()
