"""The video dual encoder: glimpse's CLIP with a temporal head (CLIP4Clip).

Each frame goes through the image tower and its projection; `TemporalPool` makes the clip's embedding
from the frame embeddings (meanP or seqTransf).  Everything else, the text tower, the projections,
the temperature and their tensor names, is the image dual encoder's, so a `shapes-clip` run's towers
start it (`init_parts: {vision: RUN, text: RUN}`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glimpse.models.dual_encoder import DualEncoder, DualEncoderConfig
from glimpse.models.temporal import TemporalPool


@dataclass
class VideoClipConfig(DualEncoderConfig):
    temporal: str = "seqTransf"  # meanP | seqTransf
    temporal_layers: int = 2
    temporal_heads: int = 2
    num_frames: int = 8  # sampled uniformly from each clip
    max_frames: int = 16  # the temporal transformer's positions
    # training: each clip of the moving-shapes world comes with its reversal (played backwards, with the
    # caption of what it then shows) in the same batch: its minimal pair, the hard negative that makes
    # the contrastive loss pay for frame order.  Clips whose caption does not change are left single.
    reverse_twins: bool = True


class VideoDualEncoder(DualEncoder):
    def __init__(self, cfg: VideoClipConfig):
        super().__init__(cfg)
        self.temporal = TemporalPool(cfg.embed_dim, cfg.temporal, cfg.temporal_layers, cfg.temporal_heads,
                                     cfg.max_frames)

    def get_video_features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, T, 3, H, W] -> [B, E]: each frame embedded by the image tower, then pooled over time."""
        B, T = frames.shape[:2]
        per_frame = self.get_image_features(frames.flatten(0, 1)).view(B, T, -1)
        return self.temporal(per_frame)

    def forward(self, frames, input_ids, attention_mask=None) -> dict[str, torch.Tensor]:
        video = F.normalize(self.get_video_features(frames), dim=-1)
        text = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        # the dual encoder's loss reads "image_embeds": a clip is the image side here
        return {"image_embeds": video, "text_embeds": text,
                "logit_scale": self.logit_scale.clamp(max=math.log(100)).exp()}
