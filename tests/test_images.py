"""Tests for glimpse.data.images: every image is made here, small, in tmp_path."""

import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from glimpse.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageError,
    ImageTransform,
    TransformConfigError,
    load_image,
)
from glimpse.errors import GlimpseError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def noise(w=64, h=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def save(img, path, fmt=None, **kw):
    img.save(path, fmt, **kw)
    return path


def close(a, b, tol=8):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def expect_error(src, reason, **kw):
    with pytest.raises(ImageError) as info:
        load_image(src, **kw)
    err = info.value
    assert err.reason == reason, str(err)
    assert isinstance(err, GlimpseError) and "\n" not in str(err)
    return err


# --- load_image ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif")])
def test_allowed_formats_load_as_rgb(tmp_path, fmt, ext):
    path = save(Image.new("RGB", (16, 12), (200, 30, 30)), tmp_path / f"a.{ext}", fmt)
    for src in (path, str(path), path.read_bytes()):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (16, 12)
        assert close(img.getpixel((8, 6)), (200, 30, 30), tol=12)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    path = save(frames[0], tmp_path / f"anim.{fmt.lower()}", fmt, save_all=True, append_images=frames[1:])
    img = load_image(path)
    assert img.mode == "RGB" and close(img.getpixel((4, 4)), RED)
    assert getattr(img, "n_frames", 1) == 1


def test_exif_orientation_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img = load_image(save(stored, tmp_path / "rot.jpg", "JPEG", exif=exif, quality=95))
    assert img.size == (20, 40)
    assert close(img.getpixel((10, 5)), RED, tol=30) and close(img.getpixel((10, 35)), BLUE, tol=30)


def test_transparency_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (4, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (255, 0, 0, 128))
    img = load_image(save(rgba, tmp_path / "rgba.png"))
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((1, 0)) == RED
    assert close(img.getpixel((2, 0)), (255, 127, 127), tol=2)

    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    img = load_image(save(la, tmp_path / "la.png"))
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((1, 0)) == (0, 0, 0)

    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.putpixel((1, 0), 1)
    for ext in ("png", "gif"):
        img = load_image(save(pal, tmp_path / f"p.{ext}", transparency=0))
        assert img.getpixel((0, 0)) == WHITE and img.getpixel((1, 0)) == RED


def test_grey_cmyk_and_16bit_convert(tmp_path):
    assert load_image(save(Image.new("L", (4, 4), 77), tmp_path / "l.png")).getpixel((0, 0)) == (77, 77, 77)
    cmyk = load_image(save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", "JPEG"))
    assert cmyk.mode == "RGB" and close(cmyk.getpixel((4, 4)), RED, tol=12)

    arr = np.array([[0, 128 * 257, 65535]], dtype=np.uint16)
    i16 = Image.fromarray(arr)
    assert i16.mode == "I;16"
    img = load_image(save(i16, tmp_path / "i16.png"))
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]
    img = load_image(Image.fromarray(arr.astype(np.int32)))
    assert img.getpixel((1, 0)) == (128, 128, 128)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_files(tmp_path, fmt, ext):
    path = save(noise(), tmp_path / f"photo.{ext}", fmt)
    data = path.read_bytes()
    for cut in (0.5, 0.95):
        path.write_bytes(data[: int(len(data) * cut)])
        err = expect_error(path, "truncated")
        assert f"photo.{ext}" in str(err) and "truncated" in str(err)
    for cut in (30, 5):  # inside the header; inside the signature
        path.write_bytes(data[:cut])
        expect_error(path, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_non_images_and_names(tmp_path):
    err = expect_error(np.random.default_rng(1).bytes(2000), "format")
    assert "<bytes>" in str(err) and "PNG" in str(err)
    assert "upload.jpg" in str(expect_error(b"not an image at all", "format", name="upload.jpg"))
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    expect_error(tmp_path / "notes.txt", "format")
    expect_error(b"", "truncated")


def test_corrupt_data(tmp_path):
    path = save(noise(), tmp_path / "a.png")
    data = bytearray(path.read_bytes())
    data[60:400] = bytes(340)  # wipe compressed pixels; the file still ends properly
    path.write_bytes(bytes(data))
    expect_error(path, "corrupt")


@pytest.mark.parametrize("fmt,ext", [("BMP", "bmp"), ("TIFF", "tif")])
def test_other_formats_rejected(tmp_path, fmt, ext):
    err = expect_error(save(Image.new("RGB", (4, 4)), tmp_path / f"x.{ext}", fmt), "format")
    assert fmt in str(err)


def test_missing(tmp_path):
    err = expect_error(tmp_path / "nope.png", "missing")
    assert "nope.png" in str(err)
    expect_error(tmp_path, "missing")  # a directory


def test_oversized_checked_before_decoding(tmp_path, monkeypatch):
    path = save(Image.new("1", (3000, 3000)), tmp_path / "big.png")

    def no_decode(self):
        raise AssertionError("decoded an oversized image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    err = expect_error(path, "oversized", max_pixels=1_000_000)
    assert "3000x3000" in str(err)
    expect_error(Image.new("L", (20, 20)), "oversized", max_pixels=100)


def test_pillow_bomb_guard_maps_to_oversized(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warn = save(Image.new("RGB", (40, 40)), tmp_path / "warn.png")  # 1600 px: Pillow warns
    error = save(Image.new("RGB", (50, 50)), tmp_path / "error.png")  # 2500 px > 2x: Pillow raises
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping would fail the test
        expect_error(warn, "oversized")
        expect_error(error, "oversized")


def test_no_leaked_file_handles(tmp_path):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    good = save(noise(), tmp_path / "g.png")
    bad = tmp_path / "b.png"
    bad.write_bytes(good.read_bytes()[:200])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        load_image(good)
        with pytest.raises(ImageError):
            load_image(bad)
    assert len(os.listdir("/proc/self/fd")) == before


def test_error_pickles():
    err = pickle.loads(pickle.dumps(ImageError("a.png", "corrupt", "bad")))
    assert (err.path, err.reason, str(err)) == ("a.png", "corrupt", "bad image a.png: corrupt image data (bad)")


# --- ImageTransform -------------------------------------------------------------------------------------


def bands(w=60, h=20):
    """Red | green | blue vertical thirds."""
    img = Image.new("RGB", (w, h), GREEN)
    img.paste(RED, (0, 0, w // 3, h))
    img.paste(BLUE, (2 * w // 3, 0, w, h))
    return img


def test_output_shape_dtype_and_batch(tmp_path):
    t = ImageTransform(16)
    out = t(noise(50, 30))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    path = save(noise(20, 40), tmp_path / "n.png")
    batch = t.batch([noise(), path, path.read_bytes(), Image.new("L", (30, 30))])
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    assert t.batch([]).shape == (0, 3, 16, 16)


def test_mean_std_applied():
    out = ImageTransform(8)(Image.new("RGB", (8, 8), (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[:, 3, 3], expected, atol=1e-5)
    assert torch.allclose(out, expected[:, None, None].expand(3, 8, 8), atol=1e-5)


def test_shortest_resize_keeps_centre():
    raw = ImageTransform(10, mean=0.0, std=1.0, interpolation="nearest")(bands())
    assert torch.equal(raw, torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 10, 10))
    cubic = ImageTransform(10, mean=0.0, std=1.0)(bands().transpose(Image.Transpose.ROTATE_90))
    assert cubic[1, 5, 5] > 0.9 and cubic[0, 5, 5] < 0.1


def test_squash_keeps_everything():
    raw = ImageTransform(12, mean=0.0, std=1.0, resize="squash", interpolation="nearest")(bands())
    assert raw[:, 6, 0].tolist() == [1.0, 0.0, 0.0] and raw[:, 6, 11].tolist() == [0.0, 0.0, 1.0]


def test_no_resize_when_already_sized(monkeypatch):
    def no_resize(*a, **k):
        raise AssertionError("resized an image that was already the right size")

    monkeypatch.setattr(Image.Image, "resize", no_resize)
    ImageTransform(8, resize="squash")(noise(8, 8))
    assert ImageTransform(8)(noise(8, 20)).shape == (3, 8, 8)  # short side already 8: crop only


def test_dict_round_trip_and_validation():
    t = ImageTransform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash", interpolation="bilinear")
    assert ImageTransform.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    for bad in ({"image_size": 0}, {"image_size": 8, "resize": "crop"}, {"image_size": 8, "std": (1, 0, 1)},
                {"image_size": 8, "interpolation": "cubic"}, {"image_size": 8, "mean": (1, 2)}, {"size": 8}):
        with pytest.raises(GlimpseError):
            ImageTransform.from_dict(bad)


def test_from_hf_clip_like():
    config = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True,
              "do_resize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3,
              "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}
    t = ImageTransform.from_hf_preprocessor(config)
    assert t == ImageTransform(224) and t.resize == "shortest" and t.interpolation == "bicubic"
    old_style = ImageTransform.from_hf_preprocessor({**config, "size": 224, "crop_size": 224})
    assert old_style == t
    assert t(noise(30, 20)).shape == (3, 224, 224)


def test_from_hf_siglip_like():
    config = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
              "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 2,
              "rescale_factor": 0.00392156862745098, "size": {"height": 32, "width": 32}}
    t = ImageTransform.from_hf_preprocessor(config)
    assert t.to_dict() == {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "squash",
                           "interpolation": "bilinear"}
    assert ImageTransform.from_hf_preprocessor({**config, "size": 32}) == t  # int size, no crop: square
    out = t(Image.new("RGB", (10, 40), WHITE))
    assert out.shape == (3, 32, 32) and torch.allclose(out, torch.ones_like(out))


@pytest.mark.parametrize("change", [
    {"do_resize": False},
    {"crop_size": {"height": 200, "width": 200}},
    {"do_center_crop": False},
    {"size": {"height": 224, "width": 200}},
    {"resample": 9},
    {"do_rescale": False},
])
def test_from_hf_unsupported(change):
    base = {"size": {"shortest_edge": 224}, "crop_size": 224, "do_center_crop": True}
    with pytest.raises(TransformConfigError):
        ImageTransform.from_hf_preprocessor({**base, **change})
