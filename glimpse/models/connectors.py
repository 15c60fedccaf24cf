"""Connectors: image features -> tokens in the language model's embedding space.

- `linear`: one projection (LLaVA-1.0).
- `mlp2x_gelu`: Linear -> GELU -> Linear (LLaVA-1.5's projector; HF `multi_modal_projector.linear_1/2`).
- `prefix`: Frozen/ClipCap's prefix mapper: the pooled image feature -> n prefix tokens
  (or, `prefix_source: patches`, n tokens from n groups of patch tokens).
- `pixel_shuffle`: fold each f x f block of patch tokens into one token of f² times the width
  (Idefics3, nanoVLM), cutting the image tokens by f² before projection.
- `image_positions` (projectors): a learned embedding per image-token position, added to the
  projected tokens.  The LM's own positions (RoPE) only steer where attention looks; what a
  question token reads from an image token is that token's value, so "where is the red cross?"
  needs the position in the token itself.  Off by default (real LLaVA checkpoints have none).
- `norm` (projectors): a LayerNorm on the (shuffled) features before the first linear, as
  InternVL's `mlp1` and Qwen2-VL's merger have.  A ViT's hidden states before its final norm
  are large (norm about 30 in the shapes towers), and so, through the projector, are the image
  tokens, next to text embeddings of norm about 1; the norm brings them to about 7 (README,
  "glimpse demo, LLaVA part", for what it did to training).  Off by default (real LLaVA
  checkpoints have none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, N, D] patch tokens on a square grid -> [B, N / f², D·f²]; each output token holds a
    f x f block of neighbouring patches, in row-major order."""
    if factor == 1:
        return x
    B, N, D = x.shape
    side = int(round(N**0.5))
    if side * side != N or side % factor:
        raise ValueError(f"pixel shuffle by {factor} needs a square grid of patches divisible by it, got {N}")
    g = side // factor
    x = x.view(B, g, factor, g, factor, D).permute(0, 1, 3, 2, 4, 5)  # [B, g, g, f, f, D]
    return x.reshape(B, g * g, factor * factor * D)


class Projector(nn.Module):
    """`linear` or `mlp2x_gelu`: per token, [B, N, in] -> [B, N, out]."""

    def __init__(self, kind: str, dim_in: int, dim_out: int, positions: int = 0, norm: bool = False):
        super().__init__()
        if kind not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"projector {kind!r} must be linear or mlp2x_gelu")
        self.norm = nn.LayerNorm(dim_in) if norm else None
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out) if kind == "mlp2x_gelu" else None
        # zeros: a projector trained without positions computes the same function at the start
        self.position = nn.Parameter(torch.zeros(positions, dim_out)) if positions else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x if self.norm is None else self.norm(x))
        x = x if self.linear_2 is None else self.linear_2(F.gelu(x))
        if self.position is not None:
            if x.shape[-2] != self.position.shape[0]:
                raise ValueError(f"the projector has {self.position.shape[0]} image positions, got {x.shape[-2]} tokens")
            x = x + self.position.to(x.dtype)
        return x


class PrefixMapper(nn.Module):
    """Frozen / ClipCap: image features -> n prefix tokens [B, n, out] through a two-layer tanh MLP.

    source "pooled": the pooled feature [B, in] maps to all n tokens at once (ClipCap's MLP mapper).
    source "patches": the patch tokens [B, N, in] are averaged into n groups in reading order and
    each group maps to one token (tokens that keep where things are, which one pooled vector blurs).
    """

    def __init__(self, dim_in: int, dim_out: int, n_tokens: int, source: str = "pooled"):
        super().__init__()
        if source not in ("pooled", "patches"):
            raise ValueError(f"prefix source {source!r} must be pooled or patches")
        self.n_tokens, self.dim_out, self.source = n_tokens, dim_out, source
        per_token = source == "patches"
        hidden = dim_out if per_token else dim_out * n_tokens // 2
        self.fc1 = nn.Linear(dim_in, hidden)
        self.fc2 = nn.Linear(hidden, dim_out if per_token else dim_out * n_tokens)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.source == "pooled":  # [B, in] -> [B, n, out]
            return self.fc2(torch.tanh(self.fc1(features))).view(-1, self.n_tokens, self.dim_out)
        groups = F.adaptive_avg_pool1d(features.transpose(1, 2), self.n_tokens).transpose(1, 2)  # [B, n, in]
        return self.fc2(torch.tanh(self.fc1(groups)))
