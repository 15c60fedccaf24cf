"""The dual encoder family's models: the two-tower `DualEncoder` (a part, glimpse/models/dual_encoder.py)
and the one-tower models a Hugging Face folder may hold (CLIPTextModel, CLIPVisionModel, SigLIP's).
"""

from __future__ import annotations

import torch
from torch import nn

from glimpse.models.dual_encoder import DualEncoder, DualEncoderConfig
from glimpse.models.text import TextConfig, TextTransformer
from glimpse.models.vision import VisionConfig, VisionTransformer

__all__ = ["DualEncoder", "DualEncoderConfig", "TextEncoder", "ImageEncoder"]


class TextEncoder(nn.Module):
    """One text tower with its optional projection: transformers' CLIPTextModel(WithProjection),
    SiglipTextModel, or a BertModel used as a text tower.  `forward` gives the last hidden states
    [B, T, D] (HF's last_hidden_state); `get_text_features` the pooled, projected text [B, E]."""

    def __init__(self, cfg: TextConfig, embed_dim: int = 0, projection_bias: bool = False):
        super().__init__()
        self.text = TextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.width, embed_dim, bias=projection_bias) if embed_dim else None
        # what DualEncoderPipeline reads: the text settings and the embedding size
        self.cfg = DualEncoderConfig(text=cfg, embed_dim=embed_dim or cfg.width)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.text(input_ids, attention_mask)
        return x if self.text_projection is None else self.text_projection(x)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValueError("this is a text-only model: it has no image tower")

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.text.forward_features(input_ids, attention_mask, token_type_ids)


class ImageEncoder(nn.Module):
    """One image tower with its optional projection: CLIPVisionModel(WithProjection), SiglipVisionModel.
    `forward` gives all token states [B, T, D] after the post-norm; `get_image_features` the pooled,
    projected image [B, E]."""

    def __init__(self, cfg: VisionConfig, embed_dim: int = 0):
        super().__init__()
        self.vision = VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, embed_dim, bias=False) if embed_dim else None
        self.cfg = DualEncoderConfig(vision=cfg, embed_dim=embed_dim or cfg.width)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.vision(pixel_values)
        return x if self.visual_projection is None else self.visual_projection(x)

    def get_text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        raise ValueError("this is a vision-only model: it has no text tower")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision.forward_features(pixel_values)
