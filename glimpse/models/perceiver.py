"""Perceiver resampler: a fixed number of learned latents read an image's tokens (Flamingo).

Each layer lets the latents attend to the image tokens *and themselves* (keys and values come
from concat(media, latents)), then runs a feed-forward; a final LayerNorm closes the stack.  So
every image, whatever its token count, becomes `n_latents` vectors of the vision width.

Two styles differ only in the feed-forward's activation (GELU vs ReLU) and IDEFICS' optional
LayerNorm over each head's queries and keys; the parameter names line up one template each:

    glimpse (resampler.)        OpenFlamingo (perceiver.)     IDEFICS (model.perceiver_resampler.)
    latents                     latents                       latents
    layers.{i}.attn.media_norm  layers.{i}.0.norm_media       blocks.{i}.0.context_layer_norm
    layers.{i}.attn.latents_norm layers.{i}.0.norm_latents    blocks.{i}.0.latents_layer_norm
    layers.{i}.attn.q           layers.{i}.0.to_q             blocks.{i}.0.q_proj
    layers.{i}.attn.kv          layers.{i}.0.to_kv            blocks.{i}.0.k_proj + v_proj (concatenated)
    layers.{i}.attn.out         layers.{i}.0.to_out           blocks.{i}.0.output_proj
    layers.{i}.attn.q/k_norm    -                             blocks.{i}.0.q/k_layer_norm (optional)
    layers.{i}.ff.norm          layers.{i}.1.0                blocks.{i}.1.ln
    layers.{i}.ff.fc1           layers.{i}.1.1                blocks.{i}.1.fc
    layers.{i}.ff.fc2           layers.{i}.1.3                blocks.{i}.1.c_proj
    norm                        norm                          layer_norm

No projection has a bias (as in both).  OpenFlamingo's optional frame and media-time embeddings
(unused by its released models) are not implemented.
"""

from __future__ import annotations

import torch
from torch import nn

from glimpse.models.attention import attend

STYLES = ("openflamingo", "idefics")


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.media_norm = nn.LayerNorm(dim)
        self.latents_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(dim, 2 * inner, bias=False)  # k rows, then v rows (OpenFlamingo's to_kv)
        self.out = nn.Linear(inner, dim, bias=False)
        # IDEFICS: a LayerNorm (with bias) over each head's queries and keys
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else None

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media [B, T, D], latents [B, L, D] -> the latents' update [B, L, D]."""
        B, L, _ = latents.shape
        H, hd = self.heads, self.head_dim
        latents = self.latents_norm(latents)
        both = torch.cat([self.media_norm(media), latents], dim=1)  # [B, T + L, D]
        q = self.q(latents).view(B, L, H, hd).transpose(1, 2)  # [B, H, L, hd]
        k, v = self.kv(both).view(B, both.shape[1], 2, H, hd).permute(2, 0, 3, 1, 4)  # 2 x [B, H, T + L, hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        y = attend(self, q, k, v)
        return self.out(y.transpose(1, 2).reshape(B, L, H * hd))


class PerceiverFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()  # OpenFlamingo: exact GELU; IDEFICS: ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, ff_hidden: int, act: str, qk_norm: bool):
        super().__init__()
        self.attn = PerceiverAttention(dim, heads, head_dim, qk_norm)
        self.ff = PerceiverFeedForward(dim, ff_hidden, act)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, depth: int = 6, heads: int = 8, head_dim: int = 64, n_latents: int = 64,
                 ff_mult: int = 4, style: str = "openflamingo", qk_norm: bool = False):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"perceiver style {style!r} must be one of {', '.join(STYLES)}")
        self.style = style
        self.latents = nn.Parameter(torch.randn(n_latents, dim))
        act = "gelu" if style == "openflamingo" else "relu"
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads, head_dim, ff_mult * dim, act, qk_norm)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    @property
    def n_latents(self) -> int:
        return self.latents.shape[0]

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, N_images, T, D] (or [N_images, T, D]) -> [B, N_images, n_latents, D]
        (or [N_images, n_latents, D]); each image is resampled on its own."""
        lead = media.shape[:-2]
        x = media.reshape(-1, *media.shape[-2:])  # [B * N, T, D]
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents).view(*lead, self.n_latents, -1)
