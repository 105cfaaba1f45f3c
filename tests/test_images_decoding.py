"""visae.images decoding policy (docs/extraction.md, "Decoding policy"): what the model sees is the
picture a web browser shows. One test per rule, each on a small image made here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from visae.images import Item, as_browser_rgb, load_image


def _save(tmp_path, img: Image.Image, name: str, **kw) -> Item:
    p = tmp_path / name
    img.save(p, **kw)
    return Item(id=name, path=str(p))


def _rgb(item: Item) -> np.ndarray:
    img, _, err = load_image(item)
    assert err == "" and img is not None, err
    assert img.mode == "RGB"
    return np.asarray(img)


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))  # [8, 256] full 16-bit range
    got = _rgb(_save(tmp_path, Image.fromarray(ramp), "ramp16.png"))
    want = np.rint(ramp * (255 / 65535)).astype(np.uint8)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 1], want) and np.array_equal(got[..., 2], want)
    # the same picture saved as 8 bits decodes to the same pixels (the clipped decode was 98% white)
    eight = _rgb(_save(tmp_path, Image.fromarray(want), "ramp8.png"))
    assert np.array_equal(got, eight)
    assert (got == 255).mean() < 0.01


@pytest.mark.parametrize("mode,arr", [("F", np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)),
                                      ("I", (np.arange(64, dtype=np.int32) * 1000).reshape(8, 8))])
def test_float_and_32bit_tiff_are_refused_with_a_reason(tmp_path, mode, arr):
    item = _save(tmp_path, Image.fromarray(arr, mode), f"x_{mode}.tif")
    img, _, err = load_image(item)
    assert img is None and "range is not defined" in err and f"mode {mode}" in err


def test_alpha_is_composited_over_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255  # red
    a[:, :2, 3] = 255  # left half opaque
    a[:, 2:, 3] = 0  # right half transparent
    a[0, 0, 3] = 128
    got = _rgb(_save(tmp_path, Image.fromarray(a, "RGBA"), "rgba.png"))
    assert (got[1:, :2] == [255, 0, 0]).all() and (got[:, 2:] == 255).all()
    r, g, b = got[0, 0].astype(int)
    assert r == 255 and abs(g - 127) <= 1 and g == b  # half over white
    la = np.stack([np.full((4, 4), 0, np.uint8), np.full((4, 4), 0, np.uint8)], -1)  # black, fully transparent
    assert (_rgb(_save(tmp_path, Image.fromarray(la, "LA"), "la.png")) == 255).all()


def test_palette_transparency_is_white(tmp_path):
    p = Image.new("P", (6, 6), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(0, (0, 0, 3, 6))  # left: index 0 (black), declared transparent
    got = _rgb(_save(tmp_path, p, "pal.gif", transparency=0))
    assert (got[:, :3] == 255).all() and (got[:, 3:] == [0, 0, 255]).all()


def test_exif_orientation_is_applied(tmp_path):
    base = Image.new("RGB", (40, 20), (0, 0, 255))
    base.paste((255, 0, 0), (0, 0, 10, 10))  # red marker top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    got = _rgb(_save(tmp_path, base, "rot.jpg", exif=exif.tobytes(), quality=95))
    assert got.shape[:2] == (40, 20)  # portrait, as a browser shows it
    assert got[5, 15, 0] > 200 and got[5, 15, 2] < 60  # the marker is now top-right


def test_first_frame_of_animations_and_multipage(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = _rgb(_save(tmp_path, frames[0], "anim.gif", save_all=True, append_images=frames[1:], duration=50))
    assert (gif == [255, 0, 0]).all()
    tif = _rgb(_save(tmp_path, frames[1], "pages.tif", save_all=True, append_images=[frames[2], frames[0]]))
    assert (tif == [0, 255, 0]).all()


def test_one_bit_greyscale_and_cmyk(tmp_path):
    one = Image.new("1", (4, 4), 0)
    one.putpixel((0, 0), 1)
    got = _rgb(_save(tmp_path, one, "one.png"))
    assert (got[0, 0] == 255).all() and (got[1:] == 0).all()
    grey = _rgb(_save(tmp_path, Image.new("L", (4, 4), 77), "grey.png"))
    assert (grey == 77).all()
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in naive CMYK
    got = _rgb(_save(tmp_path, cmyk, "cmyk.tif"))
    assert (got == [255, 0, 0]).all()


def test_icc_profile_srgb_is_identity_and_a_broken_profile_is_ignored(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    plain = _rgb(_save(tmp_path, Image.fromarray(arr), "plain.png"))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = _rgb(_save(tmp_path, Image.fromarray(arr), "srgb.png", icc_profile=srgb))
    assert np.abs(tagged.astype(int) - plain.astype(int)).max() <= 1  # sRGB -> sRGB: rounding only
    img = Image.fromarray(arr)
    img.info["icc_profile"] = b"not an icc profile"
    assert np.array_equal(np.asarray(as_browser_rgb(img)), plain)


def test_truncated_file_is_an_error_not_a_partial_picture(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    p = tmp_path / "cut.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    img, _, err = load_image(Item(id="cut.png", path=str(p)))
    assert img is None and err


def test_thumbnails_follow_the_policy(tmp_path):
    from visae.browse.images import ImageResolver

    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "r.png")
    img = ImageResolver({"dataset": str(tmp_path), "dataset_kind": "folder"}).open("r.png")
    assert img is not None and (np.asarray(img) == 255).mean() < 0.05


def test_icc_profile_on_an_image_with_alpha_is_applied_before_compositing(tmp_path):
    """The alpha rule's sibling of the ICC rule: a tagged RGBA PNG goes through the profile, then over white."""
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    plain = _rgb(_save(tmp_path, Image.fromarray(arr, "RGBA"), "plain_rgba.png")).astype(int)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = _rgb(_save(tmp_path, Image.fromarray(arr, "RGBA"), "srgb_rgba.png", icc_profile=srgb)).astype(int)
    assert np.abs(tagged - plain).max() <= 1  # sRGB -> sRGB: rounding only, alpha kept through the transform
    img = Image.fromarray(arr, "RGBA")
    img.info["icc_profile"] = b"broken"
    assert np.array_equal(np.asarray(as_browser_rgb(img)).astype(int), plain)
