"""ViT image tower, shaped so that CLIP-ViT and SigLIP vision checkpoints map into it.

CLIP: class token, `pre_norm`, pool the class token.  SigLIP: no class token, no pre-norm,
attention-pool ("map").  Patch embedding is a strided conv, as in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glimpse.models.layers import AttentionPool, Block, clip_init, init_weights


@dataclass
class VisionConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 256
    layers: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"
    class_token: bool = True
    pre_norm: bool = True
    pool: str = "cls"  # cls | mean | map
    patch_bias: bool = False
    eps: float = 1e-5


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.pool not in ("cls", "mean", "map") or (cfg.pool == "cls" and not cfg.class_token):
            raise ValueError(f"vision pool {cfg.pool!r} needs one of cls (with class_token), mean, map")
        self.cfg = cfg
        D = cfg.width
        self.n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, D, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.class_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_patches + int(cfg.class_token), D))
        self.pre_norm = nn.LayerNorm(D, eps=cfg.eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.eps) for _ in range(cfg.layers))
        self.post_norm = nn.LayerNorm(D, eps=cfg.eps)
        self.head = AttentionPool(D, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.eps) if cfg.pool == "map" else None
        init_weights(self)
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.class_token is not None:
            nn.init.normal_(self.class_token, std=D**-0.5)
        clip_init(self.blocks, D)

    def forward_features(self, pixel_values: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """All token states [B, T, D]; `layer` (negative counts from the end, as HF's
        vision_feature_layer) stops early and returns that block's output without the post-norm."""
        # pixels come as float32; a tower loaded in bf16 or fp16 reads them in its own dtype
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pre_norm(x + self.pos_embed)
        stop = len(self.blocks) if layer is None else layer % (len(self.blocks) + 1)
        for block in self.blocks[:stop]:
            x = block(x)
        return self.post_norm(x) if layer is None else x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled image representation [B, D]."""
        x = self.forward_features(pixel_values)
        if self.cfg.pool == "cls":
            return x[:, 0]
        if self.cfg.pool == "map":
            return self.head(x)
        return x.mean(dim=1)
