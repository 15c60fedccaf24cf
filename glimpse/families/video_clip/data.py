"""Clips and captions for the video dual encoder: which files a split reads, and the training set.

A training clip is decoded once (`num_frames` uniform frames, resized to the tower's size) and kept in
memory as uint8 while the set fits, as PairDataset keeps images.  A clip of the moving-shapes world may
be played backwards (`reverse_prob`), with the caption of what it then shows; the sampler's choice
decides both the caption and the direction, so a resumed run reads exactly what an uninterrupted one does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from glimpse.data.images import ImageTransform
from glimpse.data.shapes_video import Clip, clip_captions, read_clips, reverse_tracks
from glimpse.data.video import VideoError, VideoLimits, read_video
from glimpse.errors import GlimpseError

FRAME_CACHE_BYTES = 2 << 30


def load_clips(data_cfg, root: Path, split: str) -> list[Clip]:
    """The clips of a split: the moving-shapes world's (source: shapes-video), or an MSR-VTT-style file
    (source: msrvtt, with data.files.SPLIT the captions json and data.images.SPLIT the video folder)."""
    if data_cfg.source == "shapes-video":
        return read_clips(root / "annotations" / f"captions_{split}.json", root / "videos" / split)
    if split not in data_cfg.files:
        raise GlimpseError(f"no data.files.{split} in the recipe (set it with --set data.files.{split}=PATH)")
    base = Path(data_cfg.root or ".")
    ann = base / data_cfg.files[split]
    videos = base / data_cfg.images.get(split, str(Path(data_cfg.files[split]).parent))
    return read_clips(ann, videos, split=split)


def decode_clip(path: str, num_frames: int, transform: ImageTransform, limits: VideoLimits) -> np.ndarray:
    """uint8 [T, S, S, 3]: the clip's uniform frames at the tower's size.  Raises VideoError."""
    frames = read_video(path, num_frames, limits=limits)
    S = transform.image_size
    if frames.shape[1:3] != (S, S):
        frames = np.stack([transform.resized_array(Image.fromarray(f)) for f in frames])
    return frames


def to_pixels(frames: np.ndarray, transform: ImageTransform) -> torch.Tensor:
    """uint8 [T, S, S, 3] -> normalised float [T, 3, S, S]."""
    return torch.stack([transform.normalize(f) for f in frames])


def reversed_by(choice: int, reverse_prob: float) -> bool:
    """Whether the sampler's `choice` plays the clip backwards (its low bits pick the caption)."""
    return (choice >> 8) % 10_000 < reverse_prob * 10_000


class VideoDataset(Dataset):
    def __init__(self, clips: list[Clip], num_frames: int, transform: ImageTransform, reverse_prob: float = 0.0,
                 limits: VideoLimits = VideoLimits()):
        self.clips, self.num_frames, self.transform, self.limits = clips, num_frames, transform, limits
        self.reverse_prob = reverse_prob
        fits = len(clips) * num_frames * 3 * transform.image_size ** 2 <= FRAME_CACHE_BYTES
        self.frames: dict[int, np.ndarray] | None = {} if fits else None

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        idx, choice = key
        clip = self.clips[idx]
        frames = None if self.frames is None else self.frames.get(idx)
        if frames is None:
            try:
                frames = decode_clip(clip.path, self.num_frames, self.transform, self.limits)
            except VideoError as e:
                return {"error": e.reason, "message": str(e)}
            if self.frames is not None:
                self.frames[idx] = frames
        captions = clip.captions
        if clip.tracks is not None and reversed_by(choice, self.reverse_prob):
            frames = frames[::-1]
            captions = clip_captions(reverse_tracks(clip.tracks), np.random.default_rng(choice))
        return {"pixel_values": to_pixels(frames, self.transform), "caption": captions[choice % len(captions)]}
