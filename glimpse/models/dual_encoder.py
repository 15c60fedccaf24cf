"""The contrastive dual encoder (CLIP, SigLIP): image tower + text tower + projections + temperature.

A part, not only the dual-encoder family's model: the text-to-image family holds one as its frozen
text encoder and judge.  Method names follow transformers' CLIPModel: `get_image_features`,
`get_text_features`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.models.text import TextConfig, TextTransformer
from glimpse.models.vision import VisionConfig, VisionTransformer


@dataclass
class DualEncoderConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    loss: str = "clip"  # clip (InfoNCE) | siglip (sigmoid)
    init_logit_scale: float = 0.0  # 0: the loss's own default (log 1/0.07 for clip, log 10 for siglip)
    init_logit_bias: float = -10.0  # siglip only
    projection_bias: bool = False
    vision_projection: bool = True  # False: image features are the pooled tower output (SigLIP)
    # training: each caption also gives a hard negative with swapped attributes (NegCLIP; the shapes world's
    # words: glimpse.data.negatives), one more candidate text for every image of the batch
    hard_negatives: bool = False


class DualEncoder(nn.Module):
    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        if cfg.loss not in ("clip", "siglip"):
            raise ValueError(f"dual encoder loss {cfg.loss!r} must be clip or siglip")
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.text = TextTransformer(cfg.text)
        if not cfg.vision_projection and cfg.vision.width != cfg.embed_dim:
            raise ValueError(f"without a vision projection embed_dim ({cfg.embed_dim}) must be the vision width")
        self.visual_projection = (nn.Linear(cfg.vision.width, cfg.embed_dim, bias=cfg.projection_bias)
                                  if cfg.vision_projection else nn.Identity())
        self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim, bias=cfg.projection_bias)
        for proj in (self.visual_projection, self.text_projection):
            if not isinstance(proj, nn.Linear):
                continue
            nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        scale = cfg.init_logit_scale or (math.log(1 / 0.07) if cfg.loss == "clip" else math.log(10.0))
        self.logit_scale = nn.Parameter(torch.tensor(scale))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.init_logit_bias)) if cfg.loss == "siglip" else None

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision(pixel_values))  # [B, E]

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_projection(self.text(input_ids, attention_mask))  # [B, E]

    def forward(self, pixel_values, input_ids, attention_mask=None, negative_ids=None,
                negative_mask=None) -> dict[str, torch.Tensor]:
        """Normalised embeddings and the (clamped) temperature; the loss is in glimpse.losses.  Hard
        negative texts (`negative_ids` [n, T], padded as `input_ids`) go through the text tower in the
        same pass and come out as "negative_embeds" [n, E]."""
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)
        b = input_ids.shape[0]
        if negative_ids is not None:
            input_ids = torch.cat([input_ids, negative_ids])
            attention_mask = None if attention_mask is None else torch.cat([attention_mask, negative_mask])
        text = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        text, negatives = text[:b], text[b:]
        # CLIP clamps the learned temperature at 100 to keep training stable
        out = {"image_embeds": image, "text_embeds": text, "logit_scale": self.logit_scale.clamp(max=math.log(100)).exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if negative_ids is not None:
            out["negative_embeds"] = negatives
        return out
