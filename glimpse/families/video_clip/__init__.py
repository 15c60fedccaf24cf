"""The video dual encoder (CLIP4Clip): glimpse's CLIP per frame, pooled over time by the mean (meanP)
or a small temporal transformer (seqTransf), trained with InfoNCE on clips and captions; evaluated by
text-to-video and video-to-text R@K with controls for frame order (shuffled, reversed, one frame,
minimal pairs).

    model.py      VideoDualEncoder: DualEncoder + TemporalPool (glimpse/models/temporal.py)
    data.py       which clips a split reads (the moving-shapes world, or MSR-VTT-style files); the training set
    pipeline.py   what glimpse.load returns: embed_videos, embed_texts, rank
    evaluate.py   retrieval and order controls of a split
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.families import checks
from glimpse.families.base import Family, recipe_transform
from glimpse.families.registry import register
from glimpse.families.video_clip.data import TwinCollate, VideoDataset, load_clips, stream_clips
from glimpse.families.video_clip.evaluate import evaluate
from glimpse.families.video_clip.model import VideoClipConfig, VideoDualEncoder
from glimpse.families.video_clip.pipeline import VideoClipPipeline
from glimpse.losses import contrastive_loss
from glimpse.models.temporal import MODES
from glimpse.schema import check, choice


@register
class VideoClipFamily(Family):
    name = "video_clip"
    config = VideoClipConfig
    data_formats = ("msrvtt",)
    streams = True  # video-text shards (data.source wds) for training; evaluation reads MSR-VTT-style files

    @classmethod
    def validate(cls, recipe) -> None:
        m = recipe.model
        choice("model.loss", m.loss, ("clip",))
        choice("model.temporal", m.temporal, MODES)
        choice("data.source", recipe.data.source, ("shapes-video", "msrvtt", "wds"))
        d, e = recipe.data, recipe.eval
        check(d.source != "wds" or d.stream, "data.source", "wds", "video-text shards are read as a stream: set data.stream true")
        check(not d.stream or not m.reverse_twins, "model.reverse_twins", True,
              "needs the moving-shapes world's tracks (a streamed clip has none): set it false with data.stream")
        if d.source != "shapes-video":  # the splits evaluated come from MSR-VTT-style files
            splits = [*e.splits, *(e.during_train if recipe.train.eval_every else [])]
            missing = [s for s in dict.fromkeys(splits) if s not in d.files]
            check(not missing, "eval.splits", splits, f"are read from data.files.SPLIT (MSR-VTT-style) and data.images.SPLIT: "
                  f"set data.files.{missing[0] if missing else ''}, or leave the split out of eval.splits / eval.during_train")
        checks.check_towers(m)
        check(m.embed_dim >= 1, "model.embed_dim", m.embed_dim, "must be at least 1")
        check(1 <= m.num_frames <= m.max_frames, "model.num_frames", m.num_frames,
              f"must be from 1 to model.max_frames ({m.max_frames})")
        check(m.temporal_layers >= 1, "model.temporal_layers", m.temporal_layers, "must be at least 1")
        check(m.embed_dim % m.temporal_heads == 0, "model.temporal_heads", m.temporal_heads,
              f"must divide model.embed_dim ({m.embed_dim})")

    def __init__(self, recipe, root: Path, tokenizer):
        super().__init__(recipe, root, tokenizer)
        self.recipe.model.text.vocab_size = self.recipe.model.text.vocab_size or tokenizer.vocab_size
        self.transform = recipe_transform(recipe)

    def build_model(self) -> nn.Module:
        return VideoDualEncoder(self.recipe.model)

    def train_data(self):
        m = self.recipe.model
        collate = TwinCollate(self.tokenizer, m.text.context_length)
        if self.recipe.data.stream:  # no reversed twins: a shard's clip has no tracks to caption them by
            return stream_clips(self.recipe.data, self.root, m.num_frames, self.transform, self.recipe.train.seed), collate
        dataset = VideoDataset(load_clips(self.recipe.data, self.root, "train"), m.num_frames, self.transform,
                               m.reverse_twins)
        return dataset, collate

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return contrastive_loss(model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]), "clip")

    def pipeline(self, model: VideoDualEncoder) -> VideoClipPipeline:
        return VideoClipPipeline(model, self.tokenizer, self.transform)

    def evaluate(self, model: VideoDualEncoder, splits: list[str]) -> dict[str, float]:
        return evaluate(self.pipeline(model), self.recipe.data, self.root, splits, self.recipe.eval.batch_size)


__all__ = ["VideoClipFamily", "VideoDualEncoder", "VideoClipConfig", "VideoClipPipeline"]
