"""The video LLaVA: LLaVA's model (glimpse.families.vlm) with clips where images were.

A clip's frames go through the image tower one by one; each frame's patch grid is pooled before the
projector (LLaVA-NeXT-Video's `LlavaNextVideoPooler`: average or max, stride 2, so a 4x4 grid gives 4
tokens), the projector maps every pooled token, and a learned temporal position is added to all the
tokens of frame t.  The clip's T x tokens-per-frame features fill the `<image>` slots of the text, so
the prompt expansion, the feature cache and generation are LLaVA's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.models.vlm import VisionLanguageModel, VLMConfig

POOLS = ("average", "max", "none")


@dataclass
class VideoLLaVAConfig(VLMConfig):
    num_frames: int = 8  # sampled uniformly from each clip
    spatial_pool: str = "average"  # average | max | none: LLaVA-NeXT-Video's spatial_pool_mode
    spatial_pool_stride: int = 2
    frame_positions: bool = True  # a learned embedding per frame, added to its tokens


class VideoLanguageModel(VisionLanguageModel):
    def __init__(self, cfg: VideoLLaVAConfig):
        super().__init__(cfg)
        self.frame_pos = nn.Parameter(torch.randn(cfg.num_frames, self.lm.cfg.width) * 0.02) \
            if cfg.frame_positions else None

    @staticmethod
    def tokens_per_frame(cfg: VideoLLaVAConfig) -> int:
        grid = cfg.vision.image_size // cfg.vision.patch_size
        if cfg.spatial_pool != "none":
            grid //= cfg.spatial_pool_stride  # as nn.AvgPool2d / MaxPool2d (LLaVA-NeXT-Video's pooler)
        return grid * grid

    @staticmethod
    def count_image_tokens(cfg: VideoLLaVAConfig) -> int:
        """How many `<image>` tokens stand for one clip in the text."""
        return cfg.num_frames * VideoLanguageModel.tokens_per_frame(cfg)

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Clips [N, T, 3, H, W] -> pooled patch features [N, T x tokens_per_frame, Dv] (cacheable)."""
        N, T = pixel_values.shape[:2]
        if T != self.cfg.num_frames:
            raise ValueError(f"clips of {T} frames: this model reads {self.cfg.num_frames}")
        x = super().tower_features(pixel_values.flatten(0, 1))  # [N*T, P, Dv], class token dropped
        if self.cfg.spatial_pool != "none":
            g = math.isqrt(x.shape[1])
            grid = x.transpose(1, 2).reshape(N * T, -1, g, g)
            s = self.cfg.spatial_pool_stride
            pool = F.avg_pool2d if self.cfg.spatial_pool == "average" else F.max_pool2d
            x = pool(grid, s, s).flatten(2).transpose(1, 2)
        return x.reshape(N, -1, x.shape[-1])

    def project(self, tower_features: torch.Tensor) -> torch.Tensor:
        """[N, T x tokens, Dv] -> [N, T x tokens, lm width], each frame's tokens with its position."""
        x = self.connector(tower_features)
        if self.frame_pos is not None:
            x = x + self.frame_pos.repeat_interleave(self.tokens_per_frame(self.cfg), dim=0).to(x.dtype)
        return x
