"""nextdetail.imageio: every pixel mode reaches float32 (H, W, 3) in [0, 1]; bad files fail
with one-line ImageErrors; list_images is deterministic; resize_center_crop crops the middle."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from nextdetail.imageio import (IMAGE_EXTENSIONS, ImageError, list_images, load_image,
                                resize_center_crop, save_png)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def noise_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def truncated_copy(src: Path, dst: Path, keep: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


# --------------------------------------------------------------------------- pixel modes

def test_rgb_png_roundtrip_exact(tmp_path):
    rgb = noise_rgb(5, 7)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.dtype == np.float32 and img.shape == (5, 7, 3)
    np.testing.assert_array_equal(img, rgb.astype(np.float32) / 255)


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.shape == (4, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[:, :, c], grey / np.float32(255))


def test_16bit_png_keeps_precision_instead_of_clipping(tmp_path):
    # PIL's convert("L") would clip 1000 and 32768 to 255 (-> 1.0); /65535 keeps them.
    a = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = load_image(tmp_path / "g16.png")
    assert img.shape == (1, 4, 3)
    np.testing.assert_allclose(img[0, :, 0], a[0] / 65535.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(img[..., 0], img[..., 2])


def test_16bit_png_with_size_stays_in_unit_range(tmp_path):
    a = np.zeros((32, 48), np.uint16)
    a[:, 24:] = 65535                          # a hard edge makes Lanczos overshoot
    Image.fromarray(a).save(tmp_path / "edge16.png")
    img = load_image(tmp_path / "edge16.png", size=16)
    assert img.shape == (16, 16, 3)
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert img[:, 0].max() < 0.05 and img[:, -1].min() > 0.95


def test_rgba_and_la_are_composited_over_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.shape == (1, 3, 3)
    np.testing.assert_allclose(img[0, 0], [1, 1, 1])            # fully transparent -> white
    np.testing.assert_allclose(img[0, 1], [1, 0, 0])            # opaque red stays red
    np.testing.assert_allclose(img[0, 2], [127 / 255] * 3, atol=1.5 / 255)   # black at ~50 %
    la = np.array([[[0, 0], [0, 255]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(load_image(tmp_path / "la.png")[0], [[1, 1, 1], [0, 0, 0]])


def test_palette_with_transparent_index(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2])
    pal.save(tmp_path / "p.png", transparency=1)     # index 1 (green) is transparent
    img = load_image(tmp_path / "p.png")
    np.testing.assert_allclose(img[0], [[0, 0, 1], [1, 1, 1], [1, 0, 0]])
    pal.save(tmp_path / "p_opaque.png")
    np.testing.assert_allclose(load_image(tmp_path / "p_opaque.png")[0], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])


def test_cmyk_is_converted_to_rgb(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    np.testing.assert_allclose(load_image(tmp_path / "c.tif")[0], [[1, 1, 1], [0, 1, 1], [0, 0, 0]])


def test_exif_orientation_is_applied(tmp_path):
    # Stored 16 wide x 8 high, left half red; orientation 6 = show rotated 90 deg clockwise,
    # so the viewer sees 8 wide x 16 high with the red half on top.
    rgb = np.zeros((8, 16, 3), np.uint8)
    rgb[:, :8, 0] = 255
    rgb[:, 8:, 2] = 255
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "rot.jpg")
    assert img.shape == (16, 8, 3)
    assert img[:6, :, 0].min() > 0.8 and img[:6, :, 2].max() < 0.2       # top: red
    assert img[-6:, :, 2].min() > 0.8 and img[-6:, :, 0].max() < 0.2     # bottom: blue


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1)])
def test_tiny_images_load_and_crop(tmp_path, shape):
    rgb = noise_rgb(*shape)
    Image.fromarray(rgb).save(tmp_path / "t.png")
    np.testing.assert_array_equal(load_image(tmp_path / "t.png"), rgb / np.float32(255))
    assert load_image(tmp_path / "t.png", size=4).shape == (4, 4, 3)


# --------------------------------------------------------------------------- resize / crop

def test_resize_center_crop_keeps_the_middle():
    # 90 x 30, thirds red | green | blue: shorter side already 30, so the crop is the green third.
    rgb = np.zeros((30, 90, 3), np.uint8)
    rgb[:, :30, 0] = rgb[:, 30:60, 1] = rgb[:, 60:, 2] = 255
    out = resize_center_crop(Image.fromarray(rgb), 30)
    assert out.size == (30, 30) and out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to([0, 255, 0], (30, 30, 3)))


@pytest.mark.parametrize("wh,size", [((200, 100), 50), ((100, 200), 50), ((37, 53), 64), ((5, 5), 5)])
def test_resize_center_crop_shapes(wh, size):
    out = resize_center_crop(Image.new("RGB", wh, (10, 20, 30)), size)
    assert out.size == (size, size)
    # A flat image stays flat through Lanczos: the transform resamples, it does not shift colour.
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to([10, 20, 30], (size, size, 3)))


def test_resize_center_crop_scales_before_cropping():
    # 200 x 100 -> 100 x 50, then columns 25..75 are kept: a white band at original
    # columns 80..120 lands at 40..60 after scaling, i.e. at 15..35 of the crop.
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[:, 80:120] = 255
    out = np.asarray(resize_center_crop(Image.fromarray(rgb), 50)).astype(int)
    assert out[:, 18:32].min() >= 250
    assert np.abs(out[:, :12]).max() <= 5 and np.abs(out[:, 38:]).max() <= 5


def test_resize_center_crop_rejects_bad_size():
    with pytest.raises(ValueError):
        resize_center_crop(Image.new("RGB", (4, 4)), 0)


# --------------------------------------------------------------------------- errors

def assert_one_line_error(exc: ImageError, path: Path, *words: str):
    msg = str(exc)
    assert isinstance(exc, ValueError)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    for w in words:
        assert w in msg.lower()


def test_missing_file(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "nope.png")
    assert_one_line_error(e.value, tmp_path / "nope.png", "no such file")


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture\n")
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "notes.png")
    assert_one_line_error(e.value, tmp_path / "notes.png", "not an image")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(tmp_path)
    assert_one_line_error(e.value, tmp_path, "directory")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("keep", [0.3, 0.95])
def test_truncated_files_raise(tmp_path, fmt, keep):
    good = tmp_path / f"good.{fmt}"
    Image.fromarray(noise_rgb(64, 64)).save(good)
    bad = truncated_copy(good, tmp_path / f"bad.{fmt}", keep)
    with pytest.raises(ImageError) as e:
        load_image(bad)
    assert_one_line_error(e.value, bad, "truncated")
    # The loader must not switch PIL to silently padding truncated files.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert load_image(good).shape == (64, 64, 3)


# --------------------------------------------------------------------------- listing

def test_list_images_walks_folders_sorted_and_passes_files_through(tmp_path):
    d = tmp_path / "set"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for rel in ["b.png", "a.JPG", "sub/c.webp", "sub/0.tif", ".hidden/x.png", ".y.png"]:
        (d / rel).write_bytes(b"")
    (d / "readme.txt").write_text("skip me")
    explicit = tmp_path / "notes.txt"
    missing = tmp_path / "missing.png"
    found = list_images([d, explicit, missing, d / "b.png"])
    assert found == [d / "a.JPG", d / "b.png", d / "sub/0.tif", d / "sub/c.webp", explicit, missing]
    assert list_images([str(d)]) == found[:4]                      # str works, same order
    assert {".png", ".jpg", ".jpeg", ".tif", ".webp"} <= IMAGE_EXTENSIONS


def test_save_png_roundtrip(tmp_path):
    x = np.random.default_rng(1).random((6, 5, 3)).astype(np.float32)
    path = save_png(x, tmp_path / "deep" / "x.png")
    np.testing.assert_allclose(load_image(path), x, atol=0.5 / 255 + 1e-7)
    g = np.linspace(-0.5, 1.5, 12, dtype=np.float32).reshape(3, 4)     # out of range: clipped
    got = load_image(save_png(g, tmp_path / "g.png"))[..., 0]
    np.testing.assert_allclose(got, np.clip(g, 0, 1), atol=0.5 / 255 + 1e-7)
    with pytest.raises(ValueError):
        save_png(np.zeros((2, 2, 2)), tmp_path / "bad.png")


# --------------------------------------------------------------------------- real photos

@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")
def test_real_grayscale_photo_and_kodak_sizes():
    bridge = load_image(DATA / "set14" / "bridge.png")
    assert bridge.ndim == 3 and bridge.shape[2] == 3
    np.testing.assert_array_equal(bridge[..., 0], bridge[..., 1])
    kodim = load_image(DATA / "kodak24" / "kodim01.png")
    assert kodim.shape == (512, 768, 3) and 0 <= kodim.min() and kodim.max() <= 1
    assert load_image(DATA / "kodak24" / "kodim01.png", size=64).shape == (64, 64, 3)
