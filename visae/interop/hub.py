"""The Hugging Face hub: ``load_sae("hf://org/repo[/subfolder][@revision]")`` and ``visae push``.

    from visae.sae import load_sae
    sae = load_sae("hf://org/my-saes/layer8")          # cached by huggingface_hub, offline-capable

    visae push --sae runs/sweep/best --repo org/my-saes --subfolder layer8

Loading goes through ``huggingface_hub.snapshot_download`` restricted to the subfolder, so
the files land in (and are read from) the ordinary hub cache (``HF_HOME`` / ``HF_HUB_CACHE``).
With ``HF_HUB_OFFLINE=1`` nothing is fetched: a cached copy is used, and a repo that is not
cached raises :class:`HubError` saying so and how to pre-fill the cache. The folder may be a
visae SAE directory or a SAELens one (what ``visae push`` uploads); either loads.

``visae push`` writes the SAE in SAELens's layout (:func:`visae.interop.saelens.export_saelens`:
``cfg.json`` + ``sae_weights.safetensors``, visae's own config and source in
``metadata.visae``) so that ``sae_lens.SAE.load_from_disk`` on a download of the folder works
as well as ``load_sae("hf://...")``, plus a short ``README.md`` model card, and uploads the
folder with ``HfApi.upload_folder`` (token from ``huggingface-cli login`` / ``HF_TOKEN``).
"""

from __future__ import annotations

import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visae.interop import InteropError

__all__ = ["HubError", "HubUnreachableError", "parse_hf_uri", "load_sae_from_hub", "push_sae", "PushConfig", "main"]


class HubError(InteropError):
    """An hf:// SAE cannot be found, fetched, or pushed (a malformed address, an unknown repo, no token; exit
    status 2, as every bad input)."""


class HubUnreachableError(HubError):
    """The hub cannot be reached from here (offline mode, no network, an HTTP failure) and the cache does not hold
    what was asked: exit status 1, the input was fine (``visae.errors``)."""

    exit_code = 1


_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _transport_error(e: BaseException) -> bool:
    """Whether ``e`` is the hub client's failure to talk to the hub (an HTTP error status, a connection that cannot
    be made): huggingface_hub's HTTP errors, OSError (requests' errors derive from it) and the HTTP libraries'
    own (httpx's, which do not)."""
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(e, (HfHubHTTPError, OSError)) or type(e).__module__.split(".")[0] in (
        "httpx", "httpx2", "httpcore", "requests", "urllib3")


def parse_hf_uri(uri: str) -> tuple[str, str, str | None]:
    """``"hf://org/repo[/sub/folder][@revision]"`` -> (repo_id, subfolder ("" for the root), revision or None)."""
    if not uri.startswith("hf://"):
        raise HubError(f"{uri!r}: a hub SAE is written hf://org/repo[/subfolder][@revision]")
    rest, revision = uri[len("hf://"):], None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    parts = [p for p in rest.strip("/").split("/") if p]
    if len(parts) < 2 or not _REPO_RE.match("/".join(parts[:2])):
        raise HubError(f"{uri!r}: expected hf://org/repo[/subfolder][@revision] (org and repo names of letters, "
                       "digits, '-', '_', '.')")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_sae_from_hub(uri: str, device: Any = "cpu", cache_dir: str | Path | None = None) -> Any:
    """Fetch (or find in the cache) the SAE folder of ``uri`` and load it (visae or SAELens layout).

    Raises :class:`HubError` when offline mode is on and the folder is not cached, when the
    repo / revision / folder does not exist, or when the hub cannot be reached.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo_id, sub, revision = parse_hf_uri(uri)
    patterns = [f"{sub}/*"] if sub else None
    cache = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
    fetch_cmd = f"huggingface-cli download {repo_id}" + (f" --include '{sub}/*'" if sub else "") + (
        f" --revision {revision}" if revision else "")
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                  cache_dir=str(cache_dir) if cache_dir else None)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise HubError(f"{uri}: {type(e).__name__}: the repo {repo_id!r}"
                       f"{' at revision ' + repr(revision) if revision else ''} does not exist on the hub or is "
                       "private (log in with `huggingface-cli login` or set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        why = "offline mode is set (HF_HUB_OFFLINE=1)" if _offline() else "the hub cannot be reached"
        raise HubUnreachableError(f"{uri}: not in the Hugging Face cache ({cache}) and {why}. Pre-fill the cache on a "
                       f"machine with network (`{fetch_cmd}`, then copy {cache} here or point HF_HUB_CACHE at it)"
                       + (", or unset HF_HUB_OFFLINE" if _offline() else "")) from None
    except Exception as e:  # noqa: BLE001 - narrowed by _transport_error; anything else is re-raised
        if not _transport_error(e):
            raise
        raise HubUnreachableError(f"{uri}: could not fetch from the hub ({type(e).__name__}: {e})") from None
    folder = Path(local) / sub if sub else Path(local)
    return _load_folder(folder, uri, device)


def _load_folder(folder: Path, uri: str, device: Any) -> Any:
    from visae.interop.saelens import import_saelens, is_saelens_dir
    from visae.sae import base as _base

    if not folder.is_dir() or not any(folder.iterdir()):
        raise HubError(f"{uri}: the repo has no folder {folder.name!r} with files (cached at {folder})")
    if is_saelens_dir(folder):
        sae = import_saelens(folder).to(device)
        sae.extra.setdefault("imported_from", {})["hub"] = uri
        return sae
    try:
        return _base.load_sae(folder, device=device)
    except _base.SAEFormatError as e:
        raise HubError(f"{uri}: neither a visae nor a SAELens SAE folder: {e}") from None


# ----------------------------------------------------------------------------- push


@dataclass(frozen=True)
class PushConfig:
    """Upload an SAE directory to the Hugging Face hub in SAELens's layout (loadable by sae_lens and load_sae("hf://"))."""

    sae: str = field(default="", metadata={"help": "visae SAE directory to upload (cfg.json + weights.safetensors)"})
    repo: str = field(default="", metadata={"help": "hub repo id, org/name (created if missing)"})
    subfolder: str = field(default="", metadata={"help": "folder inside the repo (e.g. the layer: layer8); empty = root"})
    member: int = field(default=0, metadata={"help": "member of a stacked SAE directory to upload"})
    private: bool = field(default=False, metadata={"help": "create the repo private"})
    revision: str = field(default="", metadata={"help": "branch to push to (empty = the default branch)"})
    commit_message: str = field(default="", metadata={"help": "commit message (empty = a generated one)"})
    dry_run: bool = field(default=False, metadata={"help": "only write the folder that would be uploaded (to --out) "
                                                           "and print its files; nothing is sent"})
    out: str = field(default="", metadata={"help": "also keep the staged upload folder here (required with --dry_run)"})

    def __post_init__(self) -> None:
        from visae.config import check_bounds

        check_bounds(self, {"member": (0, None)})  # a negative member failed deep in the export (an empty slice)


def _model_card(sae: Any, repo: str, sub: str) -> str:
    src = dict((sae.extra.get("shards") or {}).get("source") or sae.extra.get("source") or {})
    uri = f"hf://{repo}" + (f"/{sub}" if sub else "")
    return (f"---\nlibrary_name: saelens\ntags: [sparse-autoencoder, visae]\n---\n\n"
            f"# {sae.architecture} SAE, d_in {sae.d_in}, {sae.d_sae} latents\n\n"
            f"Trained with visae on activations of `{src.get('model', 'unknown')}` "
            f"(layer {src.get('layer')!r}, token {src.get('token')!r}).\n\n"
            "```python\nfrom visae.sae import load_sae\n"
            f"sae = load_sae(\"{uri}\")\n```\n\n"
            "```python\nfrom huggingface_hub import snapshot_download\nfrom sae_lens import SAE\n"
            f"path = snapshot_download(\"{repo}\"" + (f", allow_patterns=[\"{sub}/*\"]" if sub else "") + ")\n"
            "sae = SAE.load_from_disk(path" + (f" + \"/{sub}\"" if sub else "") + ")\n```\n")


def push_sae(cfg: PushConfig) -> dict[str, Any]:
    """Stage ``cfg.sae`` in SAELens's layout and upload it (or only stage it with ``dry_run``).

    Everything is checked before anything is written or sent: the SAE loads, the repo id is
    valid, offline mode is off (unless ``dry_run``). Returns {"staged": folder, "files": [...],
    "url": commit url or None}.
    """
    from visae.interop.saelens import export_saelens
    from visae.sae import base as _base

    if not cfg.sae:
        raise HubError("--sae is required: the visae SAE directory to upload")
    if (cfg.repo or not cfg.dry_run) and not _REPO_RE.match(cfg.repo or ""):  # a dry run stages what a push sends
        raise HubError(f"--repo {cfg.repo!r}: expected a hub repo id org/name")
    parts = cfg.subfolder.strip("/").split("/") if cfg.subfolder.strip("/") else []
    if any(q in ("", ".", "..") for q in parts):
        raise HubError(f"--subfolder {cfg.subfolder!r}: expected a folder inside the repo (names joined by '/', no "
                       "'..', '.' or empty parts)")
    if cfg.dry_run and not cfg.out:
        raise HubError("--dry_run needs --out DIR (where the folder that would be uploaded is written)")
    if not cfg.dry_run and _offline():
        raise HubUnreachableError("cannot push: offline mode is set (HF_HUB_OFFLINE=1); use --dry_run --out DIR to stage "
                       "the folder, or unset HF_HUB_OFFLINE")
    sub = cfg.subfolder.strip("/")
    try:
        sae = _base.load_sae(cfg.sae)
    except _base.SAEFormatError as e:
        raise HubError(f"--sae {cfg.sae}: {e}") from None
    if cfg.out:
        staged = Path(cfg.out)
        ctx = None
    else:
        ctx = tempfile.TemporaryDirectory(prefix="visae_push_")
        staged = Path(ctx.name)
    try:
        export_saelens(sae, staged, member=cfg.member, beside=("README.md",))
        (staged / "README.md").write_text(_model_card(sae if sae.n_models == 1 else sae.member(cfg.member),
                                                      cfg.repo or "org/repo", sub))
        files = sorted(p.name for p in staged.iterdir())
        url = None
        if not cfg.dry_run:
            from huggingface_hub import HfApi

            api = HfApi()
            try:
                api.create_repo(cfg.repo, private=cfg.private, exist_ok=True, repo_type="model")
                info = api.upload_folder(repo_id=cfg.repo, folder_path=str(staged), path_in_repo=sub or None,
                                         revision=cfg.revision or None,
                                         commit_message=cfg.commit_message or f"visae push: {Path(cfg.sae).name}"
                                         + (f" -> {sub}" if sub else ""))
            except Exception as e:  # noqa: BLE001 - narrowed by _transport_error; anything else is re-raised
                if not _transport_error(e):
                    raise
                raise HubUnreachableError(f"cannot push to {cfg.repo}: {type(e).__name__}: {e} (no network, the hub "
                                          "down, or no write access: log in with `huggingface-cli login` or set "
                                          "HF_TOKEN; --dry_run --out DIR stages the folder without the hub)") from None
            url = str(getattr(info, "commit_url", info))
        return {"staged": str(staged) if cfg.out else None, "files": files, "url": url}
    finally:
        if ctx is not None:
            ctx.cleanup()


def main(argv: list[str] | None = None) -> int:
    from visae.config import parse_config

    cfg = parse_config(PushConfig, argv, prog="visae push", description=(PushConfig.__doc__ or "").strip())
    info = push_sae(cfg)
    where = f"hf://{cfg.repo}" + (f"/{cfg.subfolder.strip('/')}" if cfg.subfolder.strip("/") else "")
    if cfg.dry_run:
        print(f"dry run: {', '.join(info['files'])} written to {info['staged']} (would go to {where})")
    else:
        print(f"pushed {', '.join(info['files'])} to {where} ({info['url']}); load it with load_sae({where!r})")
    return 0


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.interop.hub", main))
