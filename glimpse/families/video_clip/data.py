"""Clips and captions for the video dual encoder: which files a split reads, and the training set (read
whole, or streamed from video-text WebDataset shards).

A training clip is decoded once (`num_frames` uniform frames, resized to the tower's size) and kept in
memory as uint8 while the set fits, as PairDataset keeps images.  A clip of the moving-shapes world comes
with its reversed twin (`reverse_twins`), captioned with what it then shows; the sampler's choice picks
both captions, so a resumed run reads exactly what an uninterrupted one does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from glimpse.data.formats import wds_captions
from glimpse.data.images import ImageTransform, split_failures
from glimpse.data.pairs import PairCollate, split_files
from glimpse.data.shapes_video import Clip, read_clips
from glimpse.data.shapes_video_text import clip_captions, reverse_tracks, video_caption
from glimpse.data.stream import ShardSample, ShardStream
from glimpse.data.video import (
    DEFAULT_LIMITS,
    VIDEO_EXTS,
    VideoError,
    VideoLimits,
    decode_clip,
    to_pixels,
    video_usable,
)
from glimpse.errors import GlimpseError

FRAME_CACHE_BYTES = 2 << 30


def load_clips(data_cfg, root: Path, split: str) -> list[Clip]:
    """The clips of a split: the moving-shapes world's (source: shapes-video), or an MSR-VTT-style file
    (source: msrvtt, or wds for the splits evaluated beside streamed training shards; data.files.SPLIT the
    captions json and data.images.SPLIT the video folder)."""
    if data_cfg.source == "shapes-video":
        return read_clips(root / "annotations" / f"captions_{split}.json", root / "videos" / split)
    if split not in data_cfg.files:
        raise GlimpseError(f"no data.files.{split} in the recipe (set it with --set data.files.{split}=PATH)")
    base = Path(data_cfg.root or ".")
    ann = base / data_cfg.files[split]
    videos = base / data_cfg.images.get(split, str(Path(data_cfg.files[split]).parent))
    return read_clips(ann, videos, split=split)


class VideoDataset(Dataset):
    def __init__(self, clips: list[Clip], num_frames: int, transform: ImageTransform, reverse_twins: bool = False,
                 limits: VideoLimits = DEFAULT_LIMITS):
        self.clips, self.num_frames, self.transform, self.limits = clips, num_frames, transform, limits
        # which clips get a twin: those whose caption changes when played backwards (else the twin would be
        # a false negative); decided once here, not at every epoch in the loader
        self.twins = [reverse_twins and c.tracks is not None and
                      video_caption(reverse_tracks(c.tracks)) != video_caption(c.tracks) for c in clips]
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
        views = [to_pixels(frames, self.transform)]
        captions = [clip.captions[choice % len(clip.captions)]]
        if self.twins[idx]:
            twin = clip_captions(reverse_tracks(clip.tracks), np.random.default_rng(choice))
            views.append(to_pixels(frames[::-1], self.transform))
            captions.append(twin[choice % len(twin)])
        return {"pixel_values": torch.stack(views), "captions": captions}


class TwinCollate(PairCollate):
    """PairCollate over every view of every good sample: a clip and, where it has one, its reversed twin."""

    def __call__(self, samples: list[dict]) -> dict:
        good, batch = split_failures(samples)
        if good:
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in good])
            batch["input_ids"], batch["attention_mask"] = self.tokenizer.pad(
                [self._row(c) for s in good for c in s["captions"]])
        return batch


def stream_clips(data_cfg, root: Path, num_frames: int, transform: ImageTransform, seed: int) -> ShardStream:
    """The training split's video-text shards as a stream (`data.stream`), never held in memory."""
    files, _ = split_files(data_cfg, root, "train")
    return ShardStream(files, StreamClips(num_frames, transform, seed), seed=seed,
                       shuffle_buffer=data_cfg.shuffle_buffer, usable=video_usable)


class StreamClips:
    """A stream's decoder: a shard sample -> the item VideoDataset gives for a clip without a twin (its frames
    and one caption, drawn by (seed, epoch, key) so a replayed stream draws the same), or the bad-sample record."""

    def __init__(self, num_frames: int, transform: ImageTransform, seed: int, limits: VideoLimits = DEFAULT_LIMITS):
        self.num_frames, self.transform, self.seed, self.limits = num_frames, transform, seed, limits

    def __call__(self, s: ShardSample) -> dict:
        name = s.name
        try:
            captions = wds_captions(s.shard, s.key, s.files)
        except GlimpseError as e:
            return {"error": "corrupt", "message": str(e)}
        if not captions:
            return {"error": "format", "message": f"{name}: no caption"}
        try:
            frames = decode_clip(s.member(VIDEO_EXTS), self.num_frames, self.transform, self.limits, name=name)
        except VideoError as e:
            return {"error": e.reason, "message": str(e)}
        return {"pixel_values": to_pixels(frames, self.transform)[None], "captions": [s.pick(captions, self.seed)]}
