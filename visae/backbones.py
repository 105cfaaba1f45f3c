"""Backbone registry: one place that turns a model name into an image (and text) encoder.

Names (see docs/extraction.md)::

    load_backbone("ViT-B-32", "laion2b_s34b_b79k")      # open_clip model + pretrained tag
    load_backbone("ViT-B-32:laion2b_s34b_b79k")         # the same, tag in the name
    load_backbone("ViT-B-32", "/path/to/open_clip_pytorch_model.bin")   # local checkpoint
    load_backbone("timm:vit_base_patch16_224.augreg_in21k")              # timm ViT
    load_backbone("visae-toyclip")                      # the project's small CLIP (shipped weights)
    load_backbone("ViT-B-32", random_init=True)         # random weights (tests, benchmarks)

Every family is one entry in ``BACKBONE_FAMILIES`` (a name prefix and a loader), so adding
one is one :func:`register_backbone` call. Everything returns a :class:`Backbone`: the model
in eval mode, its preprocessing, tokenizer, embedding width, and hook points into the
residual stream (``blocks``, ``num_prefix_tokens``) used by :meth:`Backbone.encode_layer`.

Weights are never fetched silently from a network that is not there: a pretrained tag is
first looked up in the local caches (Hugging Face hub cache, ``~/.cache/clip``); when the
file is missing and downloads are impossible (``HF_HUB_OFFLINE=1`` or the hub host does not
answer within a few seconds) :class:`WeightsNotAvailableError` says which file is missing and
how to provide it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from visae.errors import VisaeError
from visae.logs import quiet_random_init

log = logging.getLogger(__name__)

__all__ = [
    "Backbone",
    "BackboneError",
    "WeightsNotAvailableError", "MissingCheckpointError",
    "load_backbone",
    "register_backbone",
    "BACKBONE_FAMILIES",
    "parse_backbone_name",
]

Token = Literal["cls", "patch", "mean"]
TOKENS = ("cls", "patch", "mean")
HUB_HOST = "huggingface.co"
HUB_PROBE_TIMEOUT_S = 3.0


class BackboneError(VisaeError, ValueError):
    """A backbone name, checkpoint or read-out request is invalid."""


class WeightsNotAvailableError(VisaeError, FileNotFoundError):
    """Pretrained weights are not on this machine and cannot be downloaded (offline, not in the cache; the package's
    shipped file missing): exit status 1, the command is right and its surroundings stop it (``visae.errors``)."""

    exit_code = 1


class MissingCheckpointError(WeightsNotAvailableError):
    """A checkpoint file named by ``--pretrained`` (or a tag that looks like a path) does not exist: a bad input,
    exit status 2."""

    exit_code = 2


class _StopForward(Exception):
    """Raised from a forward hook to skip the blocks after the hooked one."""


# ----------------------------------------------------------------------------- Backbone


@dataclass
class Backbone:
    """A loaded vision (and maybe text) model with what extraction and zero-shot need.

    Attributes:
        name: canonical model name (``"ViT-B-32"``, ``"timm:vit_base_patch16_224"``, ``"visae-toyclip"``).
        pretrained: the tag or checkpoint path loaded, or None for random weights.
        model: the nn.Module, eval mode (the full CLIP for open_clip, the timm model for timm).
        preprocess: PIL image -> [3, H, W] float tensor (the model's own eval transform).
        tokenizer: list[str] -> LongTensor [n, ctx], or None without a text tower.
        embed_dim: width D of ``encode_image`` (the CLIP embedding for CLIP models).
        has_text: whether ``encode_text`` works.
        logit_scale: CLIP's temperature, already exp'd (1.0 without a text tower).
        family: "open_clip" | "timm" (the registry entry's loader kind).
        visual: the image tower module (hooks go into its ``blocks``).
        blocks: residual blocks of the image tower in order (None if it has none, e.g. a ResNet).
        batch_first: whether block outputs are [B, N, W] (else [N, B, W]).
        num_prefix_tokens: CLS / register tokens before the patch tokens in the sequence.
        has_cls_token: whether token 0 is a class token.
        width: residual-stream width W.
        random_init: weights are random (seeded, reproducible across processes).
        meta: extra facts recorded in artifacts (seed, weight file, preprocessing).
    """

    name: str
    pretrained: str | None
    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor] | None
    embed_dim: int
    has_text: bool
    logit_scale: float
    family: str
    visual: nn.Module
    blocks: nn.ModuleList | None
    batch_first: bool = True
    num_prefix_tokens: int = 1
    has_cls_token: bool = True
    width: int = 0
    random_init: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    _encode_image: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    _encode_text: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    # -- facts
    @property
    def num_layers(self) -> int:
        return 0 if self.blocks is None else len(self.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.meta.get("image_size")
        if isinstance(size, int):
            return (size, size)
        return tuple(size)  # type: ignore[arg-type]

    @property
    def cache_key(self) -> str:
        """Identity of the weights: name + pretrained (or the random-init seed)."""
        if self.random_init:
            return f"{self.name}|random_init(seed={self.meta.get('seed', 0)})"
        return f"{self.name}|{self.pretrained}"

    def to(self, device: str | torch.device) -> "Backbone":
        self.model.to(device)
        return self

    # -- encoders
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (preprocessed) -> [B, embed_dim], not normalised."""
        return self._encode_image(images)  # type: ignore[misc]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, ctx] (from ``tokenizer``) -> [B, embed_dim], not normalised."""
        if not self.has_text or self._encode_text is None:
            raise BackboneError(f"{self.name} has no text tower; encode_text is unavailable")
        return self._encode_text(tokens)

    def resolve_layer(self, layer: int) -> int:
        """Block index (negative counts from the end) -> 0-based index, checked."""
        if self.blocks is None:
            raise BackboneError(f"{self.name}: its image tower has no residual blocks to hook (only the final embedding can be read)")
        n = len(self.blocks)
        if not -n <= layer < n:
            raise BackboneError(f"{self.name}: layer {layer} out of range; the image tower has {n} blocks (0..{n - 1}, or -1 for the last)")
        return layer % n

    def encode_layer(self, images: torch.Tensor, layer: int, token: Token = "cls") -> torch.Tensor:
        """Residual stream after block ``layer`` (0-based; -1 = last) for ``images`` [B, 3, H, W].

        token "cls" -> [B, W] (class token); "mean" -> [B, W] (mean of the patch tokens);
        "patch" -> [B, P, W] (every patch token; register/class tokens excluded).
        Blocks after ``layer`` are not run: a forward hook grabs the output and stops the pass.
        """
        if token not in TOKENS:
            raise BackboneError(f"token must be one of {TOKENS}, got {token!r}")
        if token == "cls" and not self.has_cls_token:
            raise BackboneError(f"{self.name} has no class token; use token='mean' or 'patch'")
        idx = self.resolve_layer(layer)
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handle = self.blocks[idx].register_forward_hook(hook)  # type: ignore[index]
        try:
            self._encode_image(images)  # type: ignore[misc]
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise BackboneError(f"{self.name}: block {idx} was not run by the image forward pass")
        x = captured[0]
        if not self.batch_first:
            x = x.transpose(0, 1)
        # x: [B, N, W]
        if token == "cls":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens:]
        return patches.mean(dim=1) if token == "mean" else patches

    def encode_layers(self, images: torch.Tensor, layers: Sequence[int], token: Token = "cls") -> dict[int, torch.Tensor]:
        """The residual stream after several blocks from **one** forward pass: ``{block index: features}``.

        ``layers``: block indices (negative from the end; repeats collapse). Each value is what
        :meth:`encode_layer` returns for that block and ``token`` ([B, W] for cls / mean,
        [B, P, W] for patch). A forward hook on each requested block records its output; the one
        on the deepest stops the pass, so the blocks after it are not run. The blocks before it run
        once, with exactly the operations of a single-layer pass (the same hooks on the same
        modules), so every value equals the single-layer one bit for bit on a deterministic device
        (``tests/test_extract.py`` checks it). open_clip's and timm's ``forward_intermediates`` would
        give the same tensors but not for every registry backbone (the toy CLIP, timm models without
        it); the hooks work wherever :meth:`encode_layer` does.
        """
        if token not in TOKENS:
            raise BackboneError(f"token must be one of {TOKENS}, got {token!r}")
        if token == "cls" and not self.has_cls_token:
            raise BackboneError(f"{self.name} has no class token; use token='mean' or 'patch'")
        idx = sorted({self.resolve_layer(int(layer)) for layer in layers})
        if not idx:
            raise BackboneError("encode_layers: no layers given")
        captured: dict[int, torch.Tensor] = {}
        deepest = idx[-1]

        def make_hook(i: int) -> Callable[..., None]:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                captured[i] = output[0] if isinstance(output, tuple) else output
                if i == deepest:
                    raise _StopForward
            return hook

        handles = [self.blocks[i].register_forward_hook(make_hook(i)) for i in idx]  # type: ignore[index]
        try:
            self._encode_image(images)  # type: ignore[misc]
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        out = {}
        for i in idx:
            if i not in captured:
                raise BackboneError(f"{self.name}: block {i} was not run by the image forward pass")
            x = captured[i] if self.batch_first else captured[i].transpose(0, 1)
            if token == "cls":
                out[i] = x[:, 0]
            else:
                patches = x[:, self.num_prefix_tokens:]
                out[i] = patches.mean(dim=1) if token == "mean" else patches
        return out

    def features(self, images: torch.Tensor, layer: int | None = None, token: Token = "cls") -> torch.Tensor:
        """The read-out extraction stores: final embedding (``layer=None``) or :meth:`encode_layer`."""
        if layer is None:
            return self.encode_image(images)
        return self.encode_layer(images, layer, token)

    def feature_dim(self, layer: int | None) -> int:
        return self.embed_dim if layer is None else self.width


# ----------------------------------------------------------------------------- registry

Loader = Callable[..., Backbone]


@dataclass(frozen=True)
class _Family:
    prefix: str
    loader: Loader
    exact: bool  # match the whole name rather than a prefix
    description: str


BACKBONE_FAMILIES: list[_Family] = []


def register_backbone(prefix: str, loader: Loader, *, exact: bool = False, description: str = "") -> None:
    """Add a family: names equal to (``exact``) or starting with ``prefix`` go to ``loader``.

    ``loader(name, pretrained, *, random_init, device, seed) -> Backbone`` receives the name
    with a non-exact prefix stripped. Later registrations take precedence.
    """
    BACKBONE_FAMILIES.insert(0, _Family(prefix, loader, exact, description))


def parse_backbone_name(name: str, pretrained: str | None) -> tuple[str, str | None]:
    """Split ``"ViT-B-32:laion2b_s34b_b79k"`` into (model, tag); schema prefixes are kept.

    A tag in the name and a different ``pretrained`` argument is an error.
    """
    if not name or not isinstance(name, str):
        raise BackboneError(f"backbone name must be a non-empty string, got {name!r}")
    schema = ""
    for s in ("hf-hub:", "local-dir:", "timm:"):
        if name.startswith(s):
            schema, name = s, name[len(s):]
            break
    tag = None
    if schema in ("", "timm:") and ":" in name:
        name, tag = name.split(":", 1)
    if tag and pretrained and tag != pretrained:
        raise BackboneError(f"backbone {schema + name!r}: pretrained given twice ({tag!r} in the name, {pretrained!r} as argument)")
    return schema + name, pretrained or tag or None


def _family(full: str) -> tuple[_Family, str]:
    """The family that builds the parsed name ``full`` (later registrations first) and the name it receives."""
    for fam in BACKBONE_FAMILIES:
        if (fam.exact and full == fam.prefix) or (not fam.exact and full.startswith(fam.prefix)):
            return fam, full if fam.exact else full[len(fam.prefix):]
    raise BackboneError(f"no backbone family matches {full!r}")  # pragma: no cover - "" prefix catches all


def _unknown_open_clip_model(name: str) -> BackboneError:
    """The error for an open_clip model name open_clip does not know: the closest names (visae's own models
    first) and where the full lists are."""
    import difflib

    import open_clip

    ours = [f.prefix for f in BACKBONE_FAMILIES if f.exact]
    close = difflib.get_close_matches(name, ours + open_clip.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return BackboneError(f"unknown backbone {name!r}{hint} (visae's own: {', '.join(ours)}; the {len(open_clip.list_models())} "
                         "open_clip models: open_clip.list_models(); timm models as 'timm:<name>')")


def check_backbone_name(name: str) -> None:
    """Refuse, without building anything, a backbone name no family can build: for now an open_clip name that
    open_clip's registry does not hold (``hf-hub:`` / ``local-dir:`` names and ``timm:`` names are checked when
    loaded). For commands that check their inputs before any work (``visae demo`` before its world stage).

    Raises:
        BackboneError: an unknown name, with the closest known names.
    """
    import open_clip

    full, _ = parse_backbone_name(name, None)
    fam, rest = _family(full)
    if fam.prefix == "" and not rest.startswith(("hf-hub:", "local-dir:")) and open_clip.get_model_config(rest) is None:
        raise _unknown_open_clip_model(rest)


def load_backbone(
    name: str,
    pretrained: str | None = None,
    *,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """Load a backbone by name (see module docstring); eval mode, on ``device``.

    ``model_kwargs`` go to the family's model constructor (``timm.create_model`` kwargs such
    as ``img_size``/``depth``, open_clip config overrides), e.g. to build small test models.

    ``random_init=True`` ignores weights and initialises with ``seed`` (identical in every
    process, which multi-rank extraction relies on); ``pretrained`` then only selects the
    preprocessing of that tag. Raises :class:`WeightsNotAvailableError` when weights are
    neither cached nor downloadable, :class:`BackboneError` for unknown names.
    """
    full, pretrained = parse_backbone_name(name, pretrained)
    fam, rest = _family(full)
    bb = fam.loader(rest, pretrained, random_init=random_init, device=device, seed=seed, **(model_kwargs or {}))
    bb.model.eval()
    for p in bb.model.parameters():
        p.requires_grad_(False)
    return bb


# ----------------------------------------------------------------------------- weights resolution


def _offline_env() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VISAE_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def _hub_reachable(host: str = HUB_HOST, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_cached(repo_id: str, filenames: Sequence[str]) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for fn in filenames:
        try:
            hit = try_to_load_from_cache(repo_id, fn)
        except Exception:  # noqa: BLE001 - malformed repo ids etc.: treat as not cached
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _hf_cache_dir(repo_id: str) -> str:
    try:
        from huggingface_hub import constants

        root = constants.HF_HUB_CACHE
    except ImportError:  # pragma: no cover
        root = os.path.expanduser("~/.cache/huggingface/hub")
    return os.path.join(root, "models--" + repo_id.replace("/", "--"))


def _why_no_download() -> str | None:
    """None when a download may be tried; otherwise the reason it cannot."""
    if _offline_env():
        return "offline mode is set (HF_HUB_OFFLINE=1)"
    if not _hub_reachable():
        return f"{HUB_HOST} cannot be reached (no network?)"
    return None


def _missing_weights(what: str, repo_id: str | None, filenames: Sequence[str], url: str | None, reason: str, flag: str) -> WeightsNotAvailableError:
    lines = [f"{what}: pretrained weights are not on this machine and cannot be downloaded: {reason}."]
    if repo_id:
        lines.append(
            f"Missing file: {' or '.join(filenames)} of Hugging Face repo '{repo_id}', looked for in the HF cache at {_hf_cache_dir(repo_id)}."
        )
    if url:
        lines.append(f"(also looked for {os.path.basename(url)} from {url} in ~/.cache/clip)")
    lines.append("To provide it, either:")
    lines.append(f"  - pass the checkpoint file directly: {flag} /path/to/{filenames[-1] if filenames else 'weights.bin'}")
    if repo_id:
        lines.append(
            f"  - or pre-download into the HF cache on a machine with network (`huggingface-cli download {repo_id} {filenames[-1]}`) "
            "and copy the cache here (set HF_HOME / HF_HUB_CACHE if it lives elsewhere)"
        )
    lines.append("  - or use random weights for testing: random_init=True (--random_init).")
    return WeightsNotAvailableError("\n".join(lines))


def _safe_alternative(fn: str) -> list[str]:
    out = []
    if fn == "open_clip_pytorch_model.bin":
        out.append("open_clip_model.safetensors")
    elif fn.endswith((".bin", ".pth")):
        out.append(fn[:-4] + ".safetensors")
    return out + [fn]


def _resolve_open_clip_weights(model_name: str, tag: str) -> tuple[str, dict[str, Any]]:
    """Pretrained tag -> (local checkpoint path, tag config); cache first, download only if possible."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        if os.path.isfile(tag):
            return tag, {}
        if os.sep in tag or tag.endswith((".bin", ".pt", ".pth", ".safetensors", ".ckpt")):
            raise MissingCheckpointError(f"{model_name}: checkpoint file {tag!r} does not exist")
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise BackboneError(f"{model_name}: {tag!r} is neither a known pretrained tag ({tags}) nor an existing checkpoint file")
    if cfg.get("file"):
        return cfg["file"], cfg
    repo_id, filenames = None, []
    if cfg.get("hf_hub"):
        # 'org/repo/' (default file name) or 'org/repo/file.bin'
        repo_id, fn = os.path.split(cfg["hf_hub"])
        fn = fn or "open_clip_pytorch_model.bin"
        filenames = _safe_alternative(fn)
        hit = _hf_cached(repo_id, filenames)
        if hit:
            return hit, cfg
    url = cfg.get("url") or None
    if url:
        local = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(local):
            return local, cfg
    what = f"open_clip model {model_name!r} with pretrained tag {tag!r}"
    reason = _why_no_download()
    if reason:
        raise _missing_weights(what, repo_id, filenames, url, reason, "--pretrained")
    try:
        path = open_clip.download_pretrained(cfg)
    except Exception as e:  # noqa: BLE001 - network / hub errors, re-raised with the remedy
        raise _missing_weights(what, repo_id, filenames, url, f"download failed ({type(e).__name__}: {e})", "--pretrained") from e
    if not path or not os.path.isfile(path):
        raise _missing_weights(what, repo_id, filenames, url, "download returned no file", "--pretrained")
    return path, cfg


# ----------------------------------------------------------------------------- open_clip family


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _checkpoint_errors(model: str, ckpt: str | None) -> Iterator[None]:
    """Turn the libraries' failures to load a local checkpoint file (``--pretrained FILE``: an empty or damaged file,
    another model's weights, an SAE's) into one BackboneError naming the model and the file, instead of torch's
    unpickler / ``load_state_dict`` traceback (its key list cut short). Other errors, and every error when ``ckpt`` is
    not a local file, pass through."""
    try:
        yield
    except (RuntimeError, EOFError, KeyError, ValueError, NotImplementedError, pickle.UnpicklingError,
            AttributeError, IndexError) as e:
        about_the_file = not (isinstance(e, torch.OutOfMemoryError) or "CUDA" in str(e) or "Unknown model" in str(e))
        if not (ckpt and os.path.isfile(ckpt)) or not about_the_file:  # out of memory, a GPU fault, a typo'd name
            raise
        first = " ".join(str(e).split())
        first = first if len(first) <= 300 else first[:300] + " ..."
        raise BackboneError(f"{model}: --pretrained {ckpt} cannot be loaded as its weights ({type(e).__name__}: "
                            f"{first or 'no message'}): an empty or damaged file, or the weights of another model "
                            "(an SAE's weights.safetensors, another architecture's checkpoint)") from None


def _open_clip_backbone(
    model_name: str,
    pretrained: str | None,
    *,
    random_init: bool,
    device: str | torch.device,
    seed: int,
    display_name: str | None = None,
    weights_path: str | None = None,
    **model_kwargs: Any,
) -> Backbone:
    import open_clip

    if model_name.startswith(("hf-hub:", "local-dir:")):
        if random_init:
            raise BackboneError(f"{model_name}: random_init is only supported for built-in / registered model configs")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device)
        tokenizer = open_clip.get_tokenizer(model_name)
        return _wrap_open_clip(model_name, None, model, preprocess, tokenizer, random_init=False, meta={})
    if open_clip.get_model_config(model_name) is None:
        raise _unknown_open_clip_model(model_name)
    if pretrained is None and weights_path is None and not random_init:
        # random weights by accident are a silent disaster: ask for them explicitly
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        tag_hint = (f"a pretrained tag ({', '.join(tags)}) as '{model_name}:<tag>' or pretrained=<tag> (--pretrained), "
                    if tags else "")
        raise BackboneError(f"{model_name}: no weights asked for; give {tag_hint}a checkpoint file as pretrained=<file> "
                            "(--pretrained FILE), or random_init=True (--random_init)")
    meta: dict[str, Any] = {}
    force_pp: dict[str, Any] = {}
    quick_gelu = False
    ckpt: str | None = None
    tag_cfg: dict[str, Any] = {}
    if pretrained is not None and not random_init:
        ckpt, tag_cfg = _resolve_open_clip_weights(model_name, pretrained)
    elif pretrained is not None:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    elif weights_path is not None and not random_init:
        ckpt = weights_path
        if os.path.isdir(ckpt):
            from open_clip.factory import _find_checkpoint_in_dir

            ckpt = _find_checkpoint_in_dir(Path(ckpt)) or ckpt
        if not os.path.isfile(ckpt):
            raise WeightsNotAvailableError(f"{display_name or model_name}: shipped weights {ckpt} are missing (reinstall the package or pass pretrained=PATH)")
    for k in ("mean", "std", "interpolation", "resize_mode"):
        if k in tag_cfg:
            force_pp[k] = tag_cfg[k]
    # open_clip only warns when a tag was trained with QuickGELU and the config is not: follow the tag.
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    with _seeded(seed), quiet_random_init(random_init or ckpt is None), \
            _checkpoint_errors(display_name or model_name, ckpt):
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=ckpt,
            device=device,
            force_quick_gelu=quick_gelu,
            image_mean=force_pp.get("mean"),
            image_std=force_pp.get("std"),
            image_interpolation=force_pp.get("interpolation"),
            image_resize_mode=force_pp.get("resize_mode"),
            pretrained_image=False,
            pretrained_text=False,
            **model_kwargs,
        )
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as e:  # noqa: BLE001 - HF tokenizers need the hub
        raise WeightsNotAvailableError(f"{model_name}: cannot load its tokenizer offline ({type(e).__name__}: {e}); pre-download it into the HF cache") from e
    meta.update({"seed": seed} if random_init else {"weights": ckpt})
    if quick_gelu:
        meta["quick_gelu"] = True
    return _wrap_open_clip(display_name or model_name, None if random_init else pretrained or ckpt, model, preprocess, tokenizer, random_init=random_init, meta=meta)


def _wrap_open_clip(name: str, pretrained: str | None, model: nn.Module, preprocess: Any, tokenizer: Any, *, random_init: bool, meta: dict[str, Any]) -> Backbone:
    visual = model.visual
    blocks, batch_first, n_prefix, has_cls, width = None, True, 1, True, 0
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):  # open_clip VisionTransformer
        blocks = visual.transformer.resblocks
        batch_first = bool(getattr(visual.transformer, "batch_first", True))
        width = int(visual.transformer.width)
        n_prefix, has_cls = 1, True
    elif hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks"):  # timm tower inside open_clip
        blocks, n_prefix, has_cls, width = _timm_hook_info(visual.trunk)
    embed_dim = int(getattr(model, "embed_dim", 0) or getattr(visual, "output_dim", 0))
    if not embed_dim:  # e.g. a timm tower: one probe forward, in eval mode (a train-mode pass would move BatchNorm statistics)
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            size = _image_size_of(visual)
            embed_dim = int(model.encode_image(torch.zeros(1, 3, *size, device=next(model.parameters()).device)).shape[-1])
        model.train(was_training)
    ls = getattr(model, "logit_scale", None)
    logit_scale = float(ls.exp().item()) if isinstance(ls, torch.Tensor) else 1.0
    has_text = hasattr(model, "encode_text")
    meta = dict(meta)
    meta["image_size"] = list(_image_size_of(visual))
    meta["preprocess"] = dict(getattr(visual, "preprocess_cfg", {}) or {})
    return Backbone(
        name=name,
        pretrained=pretrained,
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer if has_text else None,
        embed_dim=embed_dim,
        has_text=has_text,
        logit_scale=logit_scale,
        family="open_clip",
        visual=visual,
        blocks=blocks,
        batch_first=batch_first,
        num_prefix_tokens=n_prefix,
        has_cls_token=has_cls,
        width=width,
        random_init=random_init,
        meta=meta,
        _encode_image=lambda x: model.encode_image(x),
        _encode_text=(lambda t: model.encode_text(t)) if has_text else None,
    )


def _image_size_of(visual: nn.Module) -> tuple[int, int]:
    size = getattr(visual, "image_size", None)
    if size is None and hasattr(visual, "trunk"):
        size = visual.trunk.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
    if size is None:
        size = 224
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def _load_open_clip(name: str, pretrained: str | None, *, random_init: bool, device: Any, seed: int, **kw: Any) -> Backbone:
    return _open_clip_backbone(name, pretrained, random_init=random_init, device=device, seed=seed, **kw)


# ----------------------------------------------------------------------------- timm family


def _timm_hook_info(m: nn.Module) -> tuple[nn.ModuleList | None, int, bool, int]:
    blocks = getattr(m, "blocks", None)
    if blocks is not None and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        blocks = None
    n_prefix = int(getattr(m, "num_prefix_tokens", 0))
    has_cls = getattr(m, "cls_token", None) is not None
    width = int(getattr(m, "embed_dim", 0) or getattr(m, "num_features", 0))
    return blocks, n_prefix, has_cls, width


def _resolve_timm_weights(model_name: str) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        raise BackboneError(f"timm model {model_name!r} has no pretrained weights registered; use random_init or a checkpoint file")
    if cfg.file and os.path.isfile(cfg.file):
        return cfg.file
    repo_id = cfg.hf_hub_id
    filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    if repo_id:
        hit = _hf_cached(repo_id, filenames)
        if hit:
            return hit
    what = f"timm model {model_name!r}"
    reason = _why_no_download()
    if reason:
        raise _missing_weights(what, repo_id, filenames, None if repo_id else cfg.url, reason, "--pretrained")
    return ""  # downloadable: let timm fetch it


def _load_timm(name: str, pretrained: str | None, *, random_init: bool, device: Any, seed: int, **model_kwargs: Any) -> Backbone:
    import timm
    from timm.data import create_transform, resolve_data_config

    if not name:
        raise BackboneError("timm backbone needs a model name: 'timm:<model_name>'")
    if name.startswith("visae_"):  # visae's own timm models (visae.convstem): registered in whichever process asks
        from visae import convstem

        convstem.register()
    if pretrained and not random_init and not os.path.isfile(pretrained):
        raise MissingCheckpointError(f"timm:{name}: checkpoint file {pretrained!r} does not exist (for timm pass tags in the name, e.g. timm:vit_base_patch16_224.augreg_in21k)")
    kwargs: dict[str, Any] = dict(model_kwargs)
    weights = None
    if random_init:
        use_pretrained = False
    elif pretrained:
        use_pretrained, weights = True, pretrained
    else:
        use_pretrained = True
        weights = _resolve_timm_weights(name) or None
    if weights:
        kwargs["pretrained_cfg_overlay"] = {"file": weights}
    try:
        with _seeded(seed), _checkpoint_errors(f"timm:{name}", weights if pretrained else None):
            model = timm.create_model(name, pretrained=use_pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise BackboneError(f"unknown timm model {name!r}: {e}") from None
        raise
    model.to(device).eval()
    data_cfg = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and tuple(data_cfg["input_size"][1:]) != tuple(img_size):
        data_cfg["input_size"] = (3, *img_size)  # built at another size (img_size=...): preprocess to it
    preprocess = create_transform(**data_cfg, is_training=False)
    blocks, n_prefix, has_cls, width = _timm_hook_info(model)

    def encode(x: torch.Tensor) -> torch.Tensor:
        # pre-logits pooled features: the model's image embedding without its classifier
        return model.forward_head(model.forward_features(x), pre_logits=True)

    meta: dict[str, Any] = {"seed": seed} if random_init else {"weights": weights or "timm-download"}
    meta["image_size"] = list(data_cfg["input_size"][1:])
    meta["preprocess"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_cfg.items()}
    return Backbone(
        name=f"timm:{name}",
        pretrained=None if random_init else (pretrained or getattr(model.pretrained_cfg, "get", lambda *_: None)("tag") or "timm"),
        model=model,
        preprocess=preprocess,
        tokenizer=None,
        embed_dim=int(model.num_features),
        has_text=False,
        logit_scale=1.0,
        family="timm",
        visual=model,
        blocks=blocks,
        batch_first=True,
        num_prefix_tokens=n_prefix,
        has_cls_token=has_cls,
        width=width,
        random_init=random_init,
        meta=meta,
        _encode_image=encode,
        _encode_text=None,
    )


# ----------------------------------------------------------------------------- toy CLIP


def _check_toy_weights_file(path: str | None, expected: str) -> None:
    """Refuse a toy CLIP weights file made for another architecture, before anything is built.

    ``visae.toyclip.export_fp16`` records the architecture in the safetensors metadata (``model``); a
    v1 file given to ``visae-toyclip2`` (or the reverse) would otherwise fail deep inside
    ``load_state_dict`` with a list of every missing key. Files without that record pass unchecked. The toy CLIPs'
    weights are safetensors files (what ``export_fp16`` writes): another file (a card ``.json``, a trainer's
    ``checkpoint.pt``) is refused here rather than failing inside ``torch.load``.

    Raises:
        BackboneError: the file's metadata names a model other than ``expected``, the file is not a
            ``.safetensors`` file, or it is not readable as safetensors (the message names the file).
    """
    if not path or not os.path.isfile(path):
        return
    if not str(path).endswith(".safetensors"):
        raise BackboneError(f"{path}: not a .safetensors file; {expected}'s weights are the .safetensors file that "
                            "visae.toyclip.export_fp16 writes (e.g. assets/toyclip/<model>.safetensors), not its card "
                            "or a training checkpoint")
    from visae.toyclip import recorded_model

    try:
        model = recorded_model(path)
    except ValueError as e:
        raise BackboneError(f"{path}: not a readable safetensors file ({e})") from None
    if model and model != expected:
        raise BackboneError(f"{path}: weights of {model!r} (the file's safetensors metadata 'model'), not {expected!r}; "
                            f"load them with --model {model}")


def _toy_backbone(model: str, register: Any, shipped: Any, pretrained: str | None, *, random_init: bool, device: Any,
                  seed: int, **kw: Any) -> Backbone:
    """A toy CLIP (``visae.toyclip``; ``register`` makes open_clip know it): ``pretrained`` None loads the shipped
    weights file ``shipped`` (the backbone then records the tag ``"shipped"``; an architecture without shipped
    weights, ``shipped`` None, then needs a file or ``random_init``), ``"shipped"`` the same through the tag,
    anything else is a weights file of this architecture (checked before anything is built)."""
    register()
    if not random_init:
        _check_toy_weights_file(pretrained, model)
    bb = _open_clip_backbone(model, pretrained, random_init=random_init, device=device, seed=seed, display_name=model,
                             weights_path=None if pretrained or shipped is None else str(shipped), **kw)
    if not random_init and pretrained is None and shipped is not None:
        bb.pretrained = "shipped"
    return bb


def _load_toyclip(name: str, pretrained: str | None, *, random_init: bool, device: Any, seed: int, **kw: Any) -> Backbone:
    """visae-toyclip (v1, for :mod:`visae.toyworld`): the shipped weights, a weights file or random_init."""
    from visae import toyclip

    return _toy_backbone(toyclip.MODEL_NAME, toyclip.register, toyclip.TOYCLIP_WEIGHTS, pretrained,
                         random_init=random_init, device=device, seed=seed, **kw)


def _load_toyclip2(name: str, pretrained: str | None, *, random_init: bool, device: Any, seed: int, **kw: Any) -> Backbone:
    """visae-toyclip2 (conv-stem ViT image tower, a timm tower inside open_clip; world2's model before its register
    variant): the shipped weights, a weights file or random_init."""
    from visae import toyclip

    return _toy_backbone(toyclip.MODEL_NAME_V2, toyclip.register_v2, toyclip.TOYCLIP2_WEIGHTS, pretrained,
                         random_init=random_init, device=device, seed=seed, **kw)


def _load_toyclip2_reg4(name: str, pretrained: str | None, *, random_init: bool, device: Any, seed: int,
                        **kw: Any) -> Backbone:
    """visae-toyclip2-reg4 (visae-toyclip2 with 4 register tokens; world2's model): the shipped weights, a weights
    file or random_init."""
    from visae import toyclip

    return _toy_backbone(toyclip.MODEL_NAME_V2_REG4, toyclip.register_v2_reg4, toyclip.TOYCLIP2_REG4_WEIGHTS, pretrained,
                         random_init=random_init, device=device, seed=seed, **kw)


# ----------------------------------------------------------------------------- extra open_clip configs

TINY_CLIP_NAME = "visae-tiny-test"
TINY_CLIP_CONFIG: dict[str, Any] = {
    # a ~0.2 M parameter ViT CLIP for fast tests (random weights only)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_open_clip_config(name: str, cfg: dict[str, Any]) -> None:
    """Make ``open_clip.create_model(name)`` (and so ``load_backbone(name)``) know a model config."""
    import json
    import tempfile

    import open_clip

    if open_clip.get_model_config(name) == cfg:
        return
    d = Path(tempfile.mkdtemp(prefix="visae_oc_cfg_"))
    (d / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{name}.json")


def register_tiny_clip() -> str:
    """Register the tiny test CLIP config (``visae-tiny-test``); returns its name."""
    register_open_clip_config(TINY_CLIP_NAME, TINY_CLIP_CONFIG)
    return TINY_CLIP_NAME


def _load_tiny_clip(name: str, pretrained: str | None, *, random_init: bool, device: Any, seed: int, **kw: Any) -> Backbone:
    register_tiny_clip()
    return _open_clip_backbone(TINY_CLIP_NAME, pretrained, random_init=random_init, device=device, seed=seed, **kw)


register_backbone("", _load_open_clip, description="any open_clip model: 'ViT-B-32', 'ViT-B-32:laion2b_s34b_b79k', 'hf-hub:org/repo'")
register_backbone("timm:", _load_timm, description="timm image models: 'timm:vit_base_patch16_224.augreg_in21k'")
register_backbone("visae-toyclip", _load_toyclip, exact=True, description="the project's small CLIP trained on the toy world")
register_backbone("visae-toyclip2", _load_toyclip2, exact=True,
                  description="the toy CLIP with a conv-stem image tower (visae.convstem), for visae.world2 (shipped weights; "
                              "world2's model before visae-toyclip2-reg4)")
register_backbone("visae-toyclip2-reg4", _load_toyclip2_reg4, exact=True,
                  description="visae-toyclip2 with 4 register tokens: visae.world2's model (shipped weights)")
register_backbone(TINY_CLIP_NAME, _load_tiny_clip, exact=True, description="a tiny random CLIP for tests (random_init or a checkpoint file)")
