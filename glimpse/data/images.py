"""Safe image decoding (format allowlist, pixel limit, truncation checks) and CLIP/SigLIP-style preprocessing."""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from glimpse.errors import GlimpseError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")  # file names taken for images when scanning
DEFAULT_MAX_PIXELS = 40_000_000  # a decompression-bomb guard; configurable per call
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow reports camera JPEGs that carry extra pictures as "MPO"; they are JPEGs and frame 0 is the photo.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"))
_ALLOWED = ", ".join(ALLOWED_FORMATS)
_REASONS = {"missing": "missing or unreadable file", "format": "unsupported format", "truncated": "truncated file",
            "corrupt": "corrupt image data", "oversized": "image too large"}


class ImageError(GlimpseError):
    """An image file that cannot be used; ``reason`` is one of missing/format/truncated/corrupt/oversized."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = path, reason, detail
        msg = f"bad image {path}: {_REASONS[reason]}" + (f" ({detail})" if detail else "")
        super().__init__(" ".join(msg.splitlines()))  # GlimpseError messages are shown as one line

    def __reduce__(self):  # keep it picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason, self.detail))


class TransformConfigError(GlimpseError):
    """An ImageTransform setting, or a preprocessor config, that cannot be honoured."""


def _sniff(head: bytes) -> str | None:
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for sig, fmt in _SIGNATURES if head.startswith(sig)), None)


def _looks_truncated(fp) -> bool:
    """After a failure: does the file stop before its format's end marker? Tells "truncated" from "corrupt"."""
    try:
        fp.seek(0)
        head, size = fp.read(12), fp.seek(0, io.SEEK_END)
        fp.seek(max(0, size - 16))
        tail = fp.read()
    except (OSError, ValueError):
        return False
    fmt = _sniff(head)
    if fmt == "PNG":
        return not tail.endswith(b"IEND\xaeB`\x82")
    if fmt == "JPEG":
        return b"\xff\xd9" not in tail  # "in": encoders may pad after the end-of-image marker
    if fmt == "GIF":
        return not tail.endswith(b";")
    if fmt == "WEBP":
        return size < int.from_bytes(head[4:8], "little") + 8  # the RIFF header declares the full length
    return False


@contextlib.contextmanager
def _decoding(label: str, fp=None):
    """Turn whatever Pillow raises on bad data into an ImageError, and keep its bomb warning from escaping."""
    try:
        # catch_warnings restores the filters on exit, so the change stays local to this call.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(label, "oversized", f"{e}; raise PIL.Image.MAX_IMAGE_PIXELS to allow it") from e
    except MemoryError:
        raise
    except Exception as e:  # Pillow plugins raise many types on bad data (struct.error, ValueError, ...)
        text = str(e) or type(e).__name__
        truncated = isinstance(e, EOFError) or "truncat" in text.lower() or (fp is not None and _looks_truncated(fp))
        raise ImageError(label, "truncated" if truncated else "corrupt", text) from e


def _check_pixels(size: tuple[int, int], max_pixels: int, label: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageError(label, "oversized", f"{w}x{h} = {w * h:,} pixels > max_pixels {max_pixels:,}")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # Pillow's own conversion clips at 255 (a 16-bit image turns white); scale 0..65535 down instead.
        arr = np.asarray(img, dtype=np.float32) / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if img.has_transparency_data:
        # Plain conversion would drop alpha and show hidden (often black) pixels; composite over white instead.
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on malformed EXIF; we tolerate it (below)
            return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not throw away good pixels: keep the stored orientation
        return img.copy()


def _load_file(fp, label: str, max_pixels: int) -> Image.Image:
    img = None
    try:
        with _decoding(label, fp):
            try:
                img = Image.open(fp)
            except UnidentifiedImageError as e:
                fp.seek(0)
                head = fp.read(12)
                fmt = _sniff(head)
                if len(head) < 12 and any(sig[: len(head)] == head for sig, _ in _SIGNATURES + ((b"RIFF", ""),)):
                    raise ImageError(label, "truncated", f"ends after {len(head)} bytes") from e
                if fmt is None:
                    raise ImageError(label, "format", f"not a recognised image; allowed: {_ALLOWED}") from e
                reason = "truncated" if _looks_truncated(fp) else "corrupt"
                raise ImageError(label, reason, f"unreadable {fmt} header") from e
            # Both checks use only the header: nothing has been decoded yet.
            if _FORMAT_ALIASES.get(img.format, img.format) not in ALLOWED_FORMATS:
                raise ImageError(label, "format", f"{img.format}; allowed: {_ALLOWED}")
            _check_pixels(img.size, max_pixels, label)
            # An animated GIF/WebP opens on frame 0, so this decodes the first frame only; decoding it all
            # here makes a truncated file fail now rather than inside a training step.
            img.load()
            # exif_transpose always returns a new single-frame image, detached from the file we close below.
            return _to_rgb(_exif_transpose(img))
    finally:
        if img is not None:
            img.close()


def load_image(src, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode ``src`` (a path, encoded bytes, or a PIL image) into an RGB image, or raise ImageError.

    Non-images and other formats are reason "format". Pillow's own bomb limit (PIL.Image.MAX_IMAGE_PIXELS)
    also applies and is reported as "oversized": raise it too to go beyond ~89M pixels. A PIL image is only
    checked against ``max_pixels`` and converted (returned as is when already RGB); it is not closed.
    """
    if isinstance(src, Image.Image):
        label = name or "<memory>"
        _check_pixels(src.size, max_pixels, label)
        with _decoding(label):
            return _to_rgb(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _load_file(io.BytesIO(src), name or "<bytes>", max_pixels)
    if isinstance(src, (str, os.PathLike)):
        label = name or os.fspath(src)
        try:
            fp = open(src, "rb")  # our own handle, closed here whatever happens (Pillow then never owns it)
        except OSError as e:
            raise ImageError(label, "missing", e.strerror or str(e)) from e
        with fp:
            return _load_file(fp, label, max_pixels)
    raise TypeError(f"load_image takes a path, bytes or a PIL image, not {type(src).__name__}")


def split_failures(samples: list[dict]) -> tuple[list[dict], dict]:
    """A collate's first step: (the good samples, a batch holding "status", None or the failure reason
    of every sample in order, and "messages", the bad samples' messages)."""
    good = [s for s in samples if "error" not in s]
    return good, {"status": [s.get("error") for s in samples],
                  "messages": [s["message"] for s in samples if "error" in s]}


def decode_each(sources: list, max_pixels: int = DEFAULT_MAX_PIXELS, transform=None) -> tuple[list, list, dict]:
    """Decode many images, skipping the bad ones as training does: (the indices of the good ones, their
    images (RGB, or `transform`ed), {index of a bad one: its failure reason})."""
    good, images, failures = [], [], {}
    for i, src in enumerate(sources):
        try:
            image = load_image(src, max_pixels=max_pixels)
        except ImageError as e:
            failures[i] = e.reason
            continue
        good.append(i)
        images.append(image if transform is None else transform(image))
    return good, images, failures


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# HF stores PIL's ints: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming.
_HF_RESAMPLE = {int(v): k for k, v in _RESAMPLE.items()}


def _triple(value, what: str) -> tuple[float, float, float]:
    vals = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(vals) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
        raise TransformConfigError(f"image {what} must be 3 finite numbers, got {value!r}")
    return tuple(float(v) for v in vals)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Generated or reconstructed images in [-1, 1], [B, 3, H, W] -> uint8 [B, H, W, 3] (clamped, rounded)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class ImageTransform:
    """PIL image -> normalised float32 tensor [3, S, S].

    resize="shortest": the short side goes to S, then a centre crop (CLIP). resize="squash": both sides go
    to S, aspect ratio ignored (SigLIP). Sizes and crop offsets follow torchvision's Resize/CenterCrop.
    """

    def __init__(self, image_size: int, mean=CLIP_MEAN, std=CLIP_STD, resize: str = "shortest",
                 interpolation: str = "bicubic"):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise TransformConfigError(f"image_size must be a positive int, got {image_size!r}")
        if resize not in ("shortest", "squash"):
            raise TransformConfigError(f"resize must be 'shortest' or 'squash', got {resize!r}")
        if interpolation not in _RESAMPLE:
            raise TransformConfigError(f"interpolation must be one of {', '.join(_RESAMPLE)}, got {interpolation!r}")
        self.image_size, self.resize, self.interpolation = image_size, resize, interpolation
        self.mean, self.std = _triple(mean, "mean"), _triple(std, "std")
        if min(self.std) <= 0:
            raise TransformConfigError(f"image std must be positive, got {self.std}")
        self._mean = np.asarray(self.mean, dtype=np.float32)
        self._std = np.asarray(self.std, dtype=np.float32)

    def _resized(self, img: Image.Image) -> Image.Image:
        s, (w, h) = self.image_size, img.size
        resample = _RESAMPLE[self.interpolation]
        if self.resize == "squash":
            return img if (w, h) == (s, s) else img.resize((s, s), resample)
        if min(w, h) != s:
            # int() truncation for the long side, as torchvision and HF's CLIP processor do.
            size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
            img = img.resize(size, resample)
        w, h = img.size
        if (w, h) == (s, s):
            return img
        left, top = int(round((w - s) / 2)), int(round((h - s) / 2))
        return img.crop((left, top, left + s, top + s))

    def __call__(self, img) -> torch.Tensor:
        return self.normalize(self.resized_array(img))

    def resized_array(self, img) -> np.ndarray:
        """The first half of the transform: the resized and cropped image as uint8 [S, S, 3] (12 KB at
        64 px, a quarter of the float tensor: what a dataset keeps to skip decoding next epoch)."""
        if not (isinstance(img, Image.Image) and img.mode == "RGB"):
            img = load_image(img)
        return np.asarray(self._resized(img), dtype=np.uint8)

    def normalize(self, arr: np.ndarray) -> torch.Tensor:
        """The second half: uint8 [S, S, 3] -> normalised float32 [3, S, S]."""
        arr = arr.astype(np.float32) / 255.0
        arr = (arr - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def batch(self, images: list) -> torch.Tensor:
        """Stack transformed images into [N, 3, S, S]; items may be anything load_image takes."""
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack([self(x) for x in images])

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageTransform:
        unknown = set(d) - {"image_size", "mean", "std", "resize", "interpolation"}
        if unknown or "image_size" not in d:
            raise TransformConfigError(f"bad image transform config {d!r}: needs image_size; unknown keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf_preprocessor(cls, config: dict[str, Any]) -> ImageTransform:
        """Build from a Hugging Face ``preprocessor_config.json`` dict.

        - ``size`` {"height": N, "width": N} -> squash to N (SigLIP, BLIP, ViT);
        - ``size`` {"shortest_edge": N} -> shortest-side resize to N + centre crop (CLIP); the crop
          (``crop_size``, int or {"height","width"}, default N) must be N x N;
        - ``size`` int N -> shortest edge when ``do_center_crop`` is on, else square (HF's two readings);
        - ``resample`` PIL int (default 3, bicubic); ``image_mean``/``image_std`` (default CLIP's; a single
          number means all channels); ``do_normalize`` false -> mean 0, std 1.
        Configs this transform cannot reproduce (no resize, non-square output, crop smaller than the
        resize, rescale other than 1/255) raise TransformConfigError rather than silently differ.
        """
        def side(value, key: str) -> int:
            if isinstance(value, dict) and "shortest_edge" in value:
                value = value["shortest_edge"]
            elif isinstance(value, dict) and {"height", "width"} <= set(value):
                if value["height"] != value["width"]:
                    raise TransformConfigError(f"preprocessor {key} {value} is not square")
                value = value["height"]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TransformConfigError(f"unsupported preprocessor {key} {value!r}")
            return value

        if not config.get("do_resize", True):
            raise TransformConfigError("preprocessor has do_resize=false; ImageTransform always resizes")
        if not config.get("do_rescale", True) or abs(config.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-8:
            raise TransformConfigError("preprocessor rescale is not 1/255; ImageTransform always divides by 255")
        size = config.get("size")
        n = side(size, "size")  # a missing size fails here too
        crop = config.get("do_center_crop", "crop_size" in config)
        square = (isinstance(size, dict) and "height" in size) or (isinstance(size, int) and not crop)
        if not square and not crop:
            raise TransformConfigError("shortest_edge resize without a centre crop gives non-square images")
        if crop and side(config.get("crop_size", n), "crop_size") != n:
            raise TransformConfigError(f"crop_size {config['crop_size']!r} differs from size {size!r}; not supported")
        resample = config.get("resample", 3)
        if resample not in _HF_RESAMPLE:
            raise TransformConfigError(f"unsupported preprocessor resample {resample!r}")
        if config.get("do_normalize", True):
            mean, std = config.get("image_mean", CLIP_MEAN), config.get("image_std", CLIP_STD)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(n, mean=mean, std=std, resize="squash" if square else "shortest",
                   interpolation=_HF_RESAMPLE[resample])

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageTransform) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ImageTransform({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"
