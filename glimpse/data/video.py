"""Safe video decoding and writing with PyAV (`av`, an optional dependency: `pip install glimpse[video]`).

Reading is guarded as image reading is (glimpse.data.images): an allowlist of containers and codecs,
limits on the file's bytes, the frame's pixels, the duration and the number of frames decoded, and
every failure is a `VideoError` with a reason the trainer counts (missing, format, truncated,
corrupt, oversized) and a one-line message naming the file.

Frames are sampled uniformly over the clip (CLIP4Clip's and transformers' default: `num_frames`
indices spread from the first frame to the last) or at a fixed rate (`fps`: one frame every 1/fps
seconds, from the start).  Decoding is sequential and stops after the last frame it needs.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glimpse.data.images import ImageError, ImageTransform
from glimpse.errors import GlimpseError

# PyAV's demuxer names (container.format.name) and decoder names we accept.
ALLOWED_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi")
ALLOWED_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "mpeg4", "mjpeg", "ffv1")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
SAMPLINGS = ("uniform", "fps")
_REASONS = {"missing": "missing or unreadable file", "format": "unsupported format", "truncated": "truncated file",
            "corrupt": "corrupt video data", "oversized": "video too large"}
# The first bytes of the containers above: a file that starts like one and fails to open was cut short
# (an MP4 whose index comes last) or damaged; anything else is not a video we read.
_SIGNATURES = ((4, b"ftyp"), (0, b"\x1aE\xdf\xa3"), (0, b"RIFF"))


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 512 * 2**20
    max_pixels: int = 3840 * 2160  # one frame's width x height
    max_duration: float = 3600.0  # seconds, as the container declares it
    max_decoded: int = 20_000  # frames decoded before giving up (a bound on time, whatever the header says)
    max_frames: int = 256  # frames returned


DEFAULT_LIMITS = VideoLimits()


class VideoError(ImageError):
    """A video that cannot be used; ``reason`` is one of missing/format/truncated/corrupt/oversized.
    An ImageError, so every place that skips and counts bad images (training sets, feature caches,
    evaluation) does the same with bad videos."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = path, reason, detail
        msg = f"bad video {path}: {_REASONS[reason]}" + (f" ({detail})" if detail else "")
        GlimpseError.__init__(self, " ".join(msg.splitlines()))

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason, self.detail))


def _av():
    try:
        import av
    except ImportError:
        raise GlimpseError("reading or writing video needs PyAV: pip install av (or glimpse[video])") from None
    return av


def _looks_like_video(head: bytes) -> bool:
    return any(head[at:at + len(sig)] == sig for at, sig in _SIGNATURES)


def read_video(src, num_frames: int = 8, *, sampling: str = "uniform", fps: float = 1.0,
               limits: VideoLimits = DEFAULT_LIMITS, name: str | None = None) -> np.ndarray:
    """The sampled frames of a video file (a path, bytes or a binary file), uint8 [T, H, W, 3] RGB.

    `num_frames` frames uniformly from first to last (`sampling="uniform"`; a clip shorter than that
    repeats frames), or (`sampling="fps"`) the frames at 0, 1/fps, 2/fps ... seconds, at most
    `num_frames` of them (0: no cap but `limits.max_frames`)."""
    av = _av()
    label = name or (str(src) if isinstance(src, (str, Path)) else "<bytes>")
    if sampling not in SAMPLINGS:
        raise GlimpseError(f"video sampling {sampling!r} must be one of {', '.join(SAMPLINGS)}")
    if sampling == "uniform" and not 1 <= num_frames <= limits.max_frames:
        raise GlimpseError(f"num_frames {num_frames} must be between 1 and {limits.max_frames}")
    if sampling == "fps" and not fps > 0:
        raise GlimpseError(f"video fps {fps} must be positive")
    try:
        if isinstance(src, (str, Path)):
            size = os.path.getsize(src)
            if size > limits.max_bytes:
                raise VideoError(label, "oversized", f"{size} bytes > {limits.max_bytes}")
            with open(src, "rb") as f:
                head = f.read(16)
            fp = str(src)
        else:
            data = src if isinstance(src, (bytes, bytearray)) else src.read(limits.max_bytes + 1)
            if len(data) > limits.max_bytes:
                raise VideoError(label, "oversized", f"more than {limits.max_bytes} bytes")
            head, fp = bytes(data[:16]), io.BytesIO(data)
    except OSError as e:
        raise VideoError(label, "missing", e.strerror or type(e).__name__) from None
    if not _looks_like_video(head):
        raise VideoError(label, "format", "not an MP4, Matroska/WebM or AVI file")
    try:
        container = av.open(fp, mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise VideoError(label, "truncated" if _cut_short(fp) else "corrupt",
                         f"the container does not open: {e.strerror or e}") from None
    with container:
        try:
            try:
                return _decode(av, container, label, num_frames, sampling, fps, limits, lambda: _cut_short(fp))
            except VideoError:
                raise
            except (AttributeError, TypeError, ValueError, IndexError, OverflowError) as e:
                # what PyAV raises on streams too broken to describe themselves (no decoder settings...)
                raise VideoError(label, "corrupt", f"{type(e).__name__}: {e}") from None
        except VideoError as e:
            if e.reason in ("corrupt", "format") and _cut_short(fp):
                raise VideoError(label, "truncated", e.detail) from None
            raise


def _cut_short(fp) -> bool:
    """Does an MP4's top-level box run past the end of the file (the tell-tale of a cut download)?"""
    try:
        f = open(fp, "rb") if isinstance(fp, str) else fp
        try:
            end = f.seek(0, io.SEEK_END)
            at = 0
            while at + 8 <= end:
                f.seek(at)
                head = f.read(16)
                size = int.from_bytes(head[:4], "big")
                if at == 0 and head[4:8] != b"ftyp":
                    return False  # not an MP4: no box structure to check
                if size == 1:
                    size = int.from_bytes(head[8:16], "big")
                elif size == 0:
                    return False  # the last box runs to the end of the file by definition
                if size < 8:
                    return False
                at += size
            return at > end
        finally:
            if isinstance(fp, str):
                f.close()
    except OSError:
        return False


def _decode(av, container, label, num_frames, sampling, fps, limits, cut_short) -> np.ndarray:
    if container.format.name not in ALLOWED_CONTAINERS:
        raise VideoError(label, "format", f"container {container.format.name!r} is not allowed")
    if not container.streams.video:
        raise VideoError(label, "format", "no video stream")
    stream = container.streams.video[0]
    codec = stream.codec_context.name
    if codec not in ALLOWED_CODECS:
        raise VideoError(label, "format", f"codec {codec!r} is not allowed ({', '.join(ALLOWED_CODECS)})")
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > limits.max_pixels:
        raise VideoError(label, "oversized", f"{w}x{h} frames > {limits.max_pixels} pixels")
    duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    if duration is not None and duration > limits.max_duration:
        raise VideoError(label, "oversized", f"{duration:.0f} s > {limits.max_duration:.0f} s")
    declared = stream.frames  # 0 where the container does not say
    if declared > limits.max_decoded:
        raise VideoError(label, "oversized", f"{declared} frames > {limits.max_decoded}")

    # uniform sampling needs the frame count: the header's, or (where it has none) one decoding pass
    # keeping every frame, bounded by max_decoded
    wanted = (np.linspace(0, declared - 1, num_frames).round().astype(int)
              if sampling == "uniform" and declared else None)
    cap = limits.max_frames if sampling == "uniform" or num_frames == 0 else min(num_frames, limits.max_frames)
    wanted_set = set(wanted.tolist()) if wanted is not None else set()
    kept: dict[int, np.ndarray] = {}
    times: list[np.ndarray] = []
    n, last = 0, None
    try:
        for frame in container.decode(stream):
            last = frame
            if frame.width * frame.height > limits.max_pixels:
                raise VideoError(label, "oversized", f"a {frame.width}x{frame.height} frame")
            if sampling == "fps":
                t = frame.time if frame.time is not None else n / float(stream.average_rate or 1)
                if t + 1e-6 >= len(times) / fps:
                    times.append(frame.to_ndarray(format="rgb24"))
                    if len(times) >= cap:
                        break
            elif wanted is None or n in wanted_set:
                kept[n] = frame.to_ndarray(format="rgb24")
                if wanted is None and len(kept) > limits.max_frames * 4 and len(kept) > num_frames:
                    kept = _thin(kept)  # bound memory when the header gives no count
            n += 1
            if wanted is not None and n > wanted[-1]:
                break
            if n >= limits.max_decoded:
                raise VideoError(label, "oversized", f"more than {limits.max_decoded} frames")
    except av.error.FFmpegError as e:
        raise VideoError(label, "corrupt", e.strerror or str(e)) from None
    if sampling == "fps":
        if not times:
            raise VideoError(label, "corrupt", "no frame decodes")
        return np.stack(times)
    if n == 0:
        raise VideoError(label, "corrupt" if declared == 0 else "truncated", "no frame decodes")
    if wanted is not None and n <= wanted[-1]:
        # headers often overstate the count by a frame or two: an intact file that decodes nearly all of
        # them ends on its last frame; one whose data stops short is truncated
        if cut_short() or n < 0.9 * declared:
            raise VideoError(label, "truncated", f"{n} of {declared} frames decode")
        tail = last.to_ndarray(format="rgb24")
        kept.update({i: tail for i in wanted_set if i >= n})
    if wanted is None:
        order = sorted(kept)
        pick = np.linspace(0, len(order) - 1, num_frames).round().astype(int)
        return np.stack([kept[order[i]] for i in pick])
    return np.stack([kept[i] for i in wanted])


def _thin(kept: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Every other kept frame: a uniform sample of a uniform sample stays (nearly) uniform."""
    return {i: kept[i] for k, i in enumerate(sorted(kept)) if k % 2 == 0}


def decode_clip(src, num_frames: int, transform: ImageTransform, limits: VideoLimits = DEFAULT_LIMITS,
                name: str | None = None) -> np.ndarray:
    """uint8 [T, S, S, 3]: a clip's (a path's or bytes') uniform frames at the tower's size.  Raises VideoError
    (naming `name`, for bytes)."""
    frames = read_video(src, num_frames, limits=limits, name=name)
    S = transform.image_size
    if frames.shape[1:3] != (S, S):
        frames = np.stack([transform.resized_array(Image.fromarray(f)) for f in frames])
    return frames


def to_pixels(frames: np.ndarray, transform: ImageTransform) -> torch.Tensor:
    """uint8 [T, S, S, 3] -> normalised float [T, 3, S, S]."""
    return torch.stack([transform.normalize(f) for f in frames])


def clip_pixels(src, num_frames: int, transform: ImageTransform, limits: VideoLimits = DEFAULT_LIMITS,
                name: str | None = None) -> torch.Tensor:
    """A clip (a path, bytes, or frames already decoded as a [T, 3, S, S] tensor) as a tower's input
    [T, 3, S, S]."""
    if isinstance(src, torch.Tensor):
        if src.ndim != 4 or src.shape[0] != num_frames:
            raise GlimpseError(f"a clip tensor must be [{num_frames}, 3, H, W], not {list(src.shape)}")
        return src
    return to_pixels(decode_clip(src, num_frames, transform, limits, name), transform)


VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")  # a WebDataset sample's video member


def video_usable(suffixes) -> bool:
    """Whether a WebDataset sample holds a clip and its text: a video member and a .txt or .json (as WebVid-style
    sets and LLaVA-Video shards hold them).  A stream (glimpse.data.stream) counts, skips and resumes by this."""
    return any(ext in suffixes for ext in VIDEO_EXTS) and ("txt" in suffixes or "json" in suffixes)


@functools.lru_cache(maxsize=1)
def _x264_asm() -> dict:
    """x264's options for this CPU: on one with AVX-512, its AVX2 kernels.  With its AVX-512 ones the same
    frames gave other bytes from one process to the next (an Intel Xeon with AVX-512, 2026-11-29: the
    world's determinism test failed), so the world would not be deterministic in its seed there."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    return {"x264-params": "asm=avx2"} if " avx512f" in flags else {}


def write_video(frames: np.ndarray, path: str | Path, fps: float = 4.0, crf: int = 17) -> None:
    """Write uint8 [T, H, W, 3] RGB frames as an H.264 MP4 (yuv420p, index first), byte-identical for the
    same frames (one encoder thread; x264's AVX2 kernels where it would pick AVX-512, `_x264_asm`)."""
    av = _av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise GlimpseError(f"video frames must be uint8 [T, H, W, 3], not {frames.dtype} {list(frames.shape)}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise GlimpseError(f"H.264 in yuv420p needs even frame sizes, not {W}x{H}")
    from fractions import Fraction

    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": str(crf), **_x264_asm()}
        stream.codec_context.thread_count = 1
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
