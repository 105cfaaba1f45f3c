"""A small ViT image tower with a convolutional stem, registered with timm (the image tower of visae-toyclip2).

A plain ViT cuts the image into patches with one linear map per patch; with the toy CLIP's budget (a 4-block,
width-96 ViT trained for about an hour on 2 CPU cores) that tower learns colour, size and position but not
shape (docs/toyclip_v2_recipe.md: 0.11 zero-shot over 23 shapes after 4,000 steps of 128). Replacing the
patchify stem with a few stride-2 convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers
See Better": the stem of "ViT_C"; here 4x4 kernels instead of 3x3, see :class:`ConvStemPatchEmbed`) is the
standard fix: in the supervised shape probe the same ViT reaches 2-3x the accuracy of the patchify stem at
equal steps (the recipe notebook, section 7).

The model is a timm ``VisionTransformer`` (class token, pre-norm blocks, final LayerNorm) whose patch
embedding is :class:`ConvStemPatchEmbed`; everything after the embedding is timm's, so visae's backbone
hooks (``trunk.blocks``: the residual stream after each block, ``[B, num_prefix_tokens + N, width]``) and open_clip's
timm tower (``vision_cfg.timm_model_name``) work unchanged. :func:`register` makes the timm names known:
``visae_toyvit_convstem`` (``num_prefix_tokens`` 1) and ``visae_toyvit_convstem_reg4``, the same tower with 4
register tokens after the class token and position embeddings on the patch tokens only (Darcet et al. 2024; the
image tower of ``visae-toyclip2-reg4``; ``num_prefix_tokens`` 5).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["ConvStemPatchEmbed", "REGISTER_INIT_STD", "TIMM_NAME", "TIMM_NAME_REG4", "register"]

TIMM_NAME = "visae_toyvit_convstem"
TIMM_NAME_REG4 = "visae_toyvit_convstem_reg4"
REGISTER_INIT_STD = 0.02


class ConvStemPatchEmbed(nn.Module):
    """Patch embedding by ``log2(patch_size)`` 4x4 stride-2 convolutions (each followed by BatchNorm and a
    ReLU) and a 1x1 convolution to ``embed_dim``: the convolutional stem of Xiao et al. 2021 ("Early
    Convolutions Help Transformers See Better"), with 4x4 instead of 3x3 kernels so that every token is
    centred on its own grid cell (below).

    Input ``[B, in_chans, H, W]`` with ``H = W = img_size``; output ``[B, (H / patch_size) * (W / patch_size),
    embed_dim]`` (row-major over the patch grid, like timm's ``PatchEmbed``).
    Receptive field: a 4x4 stride-2 conv padded by 1 pixel maps output ``k`` to inputs ``2k - 1 .. 2k + 2``
    (centred on ``2k + 0.5``), so after ``n`` of them token ``(r, c)`` reads pixel rows
    ``p*r - (p - 1) .. p*r + 2*(p - 1)`` and the same columns (``p`` = patch_size, clipped to the image): its
    own ``p`` x ``p`` cell and ``p - 1`` pixels on every side, centred exactly on the cell's centre, where
    a patch heatmap paints it (``tests/test_convstem.py`` pins this pixel by pixel). With 3x3 kernels padded
    by 1 the field would be centred on the cell's top-left pixel, half a cell off.
    The widths double at every stride: ``embed_dim / 2**(n - 1), ..., embed_dim / 2, embed_dim``.
    BatchNorm as in the paper's stem and in CLIP's ResNet towers: in eval mode (extraction, zero-shot,
    naming) it is a fixed per-channel affine map from the running statistics, so an image's embedding does
    not depend on its batch; in training mode it normalises by the batch. A one-group GroupNorm instead
    (no batch dependence at all) learnt shape far slower in the supervised probe: chance (0.04) after 300
    steps where BatchNorm reached 0.26 (docs/toyclip_v2_recipe.md, section 7).

    Raises:
        ValueError: ``patch_size`` not a power of two >= 2, ``img_size`` not a multiple of it, or
            ``embed_dim`` not divisible by ``2**(n - 1)``; in ``forward``, an input whose ``H, W`` is not
            ``img_size``.
    """

    dynamic_img_pad = False

    def __init__(self, img_size: int | tuple[int, int] = 64, patch_size: int | tuple[int, int] = 8, in_chans: int = 3,
                 embed_dim: int = 96, bias: bool = True, **_: Any) -> None:
        super().__init__()
        img = (img_size, img_size) if isinstance(img_size, int) else tuple(int(v) for v in img_size)
        p = patch_size if isinstance(patch_size, int) else int(patch_size[0])
        n = int(round(math.log2(p))) if p >= 2 else 0
        if p < 2 or 2 ** n != p:
            raise ValueError(f"ConvStemPatchEmbed: patch_size must be a power of two >= 2, got {patch_size}")
        if img[0] % p or img[1] % p:
            raise ValueError(f"ConvStemPatchEmbed: img_size {img} is not a multiple of patch_size {p}")
        if embed_dim % 2 ** (n - 1):
            raise ValueError(f"ConvStemPatchEmbed: embed_dim {embed_dim} is not divisible by {2 ** (n - 1)}")
        self.img_size = img
        self.patch_size = (p, p)
        self.grid_size = (img[0] // p, img[1] // p)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        c = in_chans
        for i in range(n):
            w = embed_dim // 2 ** (n - 1 - i)
            layers += [nn.Conv2d(c, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        layers.append(nn.Conv2d(c, embed_dim, 1, bias=bias))
        self.proj = nn.Sequential(*layers)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """Pixels per token along a side (timm's ``PatchEmbed`` interface): ``patch_size`` or ``(p, p)``."""
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(H / p, W / p)`` of an image of ``img_size`` (timm's ``PatchEmbed`` interface)."""
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> ``[B, (H / p) * (W / p), embed_dim]``; ValueError unless ``(H, W) == img_size``."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"ConvStemPatchEmbed: input {tuple(x.shape[-2:])} but the model takes {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


def _toyvit_convstem(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """64 px, patch 8 (an 8 x 8 grid), width 96, 4 blocks of 3 heads, MLP ratio 4, class token: the size of
    visae-toyclip v1's ViT with :class:`ConvStemPatchEmbed` as its stem: 556,848 parameters without a classifier
    (``num_classes=0``; timm's default 1,000-class head adds 97,000). open_clip builds it with that head and then
    removes it (``reset_classifier(0)``), so the head's init draws are part of visae-toyclip2's seeded random init:
    do not change this default."""
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        raise ValueError(f"{TIMM_NAME}: no pretrained weights in timm; visae-toyclip2's weights load through open_clip")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    args: dict[str, Any] = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0,
                                embed_layer=ConvStemPatchEmbed)
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pretrained_cfg = model.default_cfg = {
        "architecture": TIMM_NAME, "input_size": (3, args["img_size"], args["img_size"]), "num_classes": 0,
        "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
        # open_clip's eval transform of the toy CLIP: bicubic resize of the short side to img_size, centre crop
        # to img_size; timm's default crop_pct 0.875 would cut an eighth of a 64 px toy image away
        "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"}
    return model


def _toyvit_convstem_reg4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """:func:`_toyvit_convstem` with 4 register tokens (Darcet et al. 2024, "Vision Transformers Need Registers"):
    learnt tokens after the class token, ``[B, 1 + 4 + 64, 96]`` in the residual stream (``num_prefix_tokens`` 5),
    that give attention a place for image-wide information other than the background patches, so that patch
    tokens keep describing what lies under them (issue 14's heatmaps; docs/toyclip_v2_recipe.md, section 17).
    No token before the patches gets a position embedding (``no_embed_class``, as timm's register ViTs; the class
    token neither, unlike ``visae_toyvit_convstem``). At timm's init (std 1e-6) the 4 registers then receive nearly
    the same gradient and end as one token copied 4 times (measured: pairwise cosine 1.0000 after 6,500 steps,
    docs/toyclip_v2_recipe.md section 17); they are redrawn at std ``REGISTER_INIT_STD`` after timm's init, from
    the global torch generator (so a seeded build is reproducible).

    Raises:
        ValueError: ``pretrained`` (no weights in timm), or the stem's errors (:class:`ConvStemPatchEmbed`)."""
    if pretrained:
        raise ValueError(f"{TIMM_NAME_REG4}: no pretrained weights in timm; visae-toyclip2-reg4's weights load "
                         "through open_clip (load_backbone('visae-toyclip2-reg4'))")
    kwargs.setdefault("reg_tokens", 4)
    kwargs.setdefault("no_embed_class", True)
    model = _toyvit_convstem(False, **kwargs)
    nn.init.normal_(model.reg_token, std=REGISTER_INIT_STD)
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "architecture": TIMM_NAME_REG4}
    return model


def register() -> str:
    """Make ``timm.create_model("visae_toyvit_convstem")`` and ``"visae_toyvit_convstem_reg4"`` (and so open_clip's
    timm towers) know the models (idempotent); returns the first name."""
    import timm
    from timm.models import register_model

    for name, fn in ((TIMM_NAME, _toyvit_convstem), (TIMM_NAME_REG4, _toyvit_convstem_reg4)):
        if name not in timm.list_models(name):
            fn.__name__ = name
            register_model(fn)
    return TIMM_NAME
