"""Pooling a clip's per-frame embeddings into one: CLIP4Clip's similarity heads, as a part.

meanP: the mean over frames, which cannot see their order.  The frames are sorted per feature before
the sum, so the result is bit-identical under any permutation of the frames (a float sum depends on
its order; a sorted one does not) and a test can check "order-blind" exactly.
seqTransf: learned frame positions and a small transformer over the frames, added back to the frame
embeddings (CLIP4Clip's residual), then the mean: order now changes the result.
"""

from __future__ import annotations

import torch
from torch import nn

from glimpse.models.layers import Block, init_weights

MODES = ("meanP", "seqTransf")


class TemporalPool(nn.Module):
    def __init__(self, dim: int, mode: str = "seqTransf", layers: int = 2, heads: int = 2, max_frames: int = 16):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"temporal pooling {mode!r} must be one of {', '.join(MODES)}")
        self.mode = mode
        if mode == "seqTransf":
            self.frame_pos = nn.Parameter(torch.zeros(1, max_frames, dim))
            self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
            self.norm = nn.LayerNorm(dim)
            init_weights(self)
            nn.init.normal_(self.frame_pos, std=0.02)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, D]
        if self.mode == "meanP":
            return frames.sort(dim=1).values.mean(dim=1)
        return self.per_frame(frames).mean(dim=1)

    def per_frame(self, frames: torch.Tensor) -> torch.Tensor:
        """seqTransf's frames before the mean [B, T, D]: each frame's embedding with what the transformer
        read from the others (the video LLaVA's temporal tokens)."""
        if self.mode == "meanP":
            return frames
        T = frames.shape[1]
        if T > self.frame_pos.shape[1]:
            raise ValueError(f"{T} frames: this temporal transformer has positions for {self.frame_pos.shape[1]}")
        x = frames + self.frame_pos[:, :T]
        for block in self.blocks:
            x = block(x)
        return frames + self.norm(x)
