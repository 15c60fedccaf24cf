"""Fusion layers (ALBEF, BLIP): the text attends to the image, and the heads that read fused states.

The fusion operator is configurable, so that what cross-attention buys can be measured:
- cross_attention: each fusion layer is self-attention over the text, cross-attention from the
  text to the image patches, and an MLP (ALBEF, BLIP);
- concat: text tokens and image patches in one sequence through self-attention layers
  (single-stream, as VisualBERT/UNITER);
- weighted_sum / product: the pooled image feature is combined with every text state (the [CLS]
  state being the pooled text feature) by a learned per-channel gate, or by an elementwise
  product; the same number of self-attention layers follows, so depth and width are equal and
  only the way the image enters differs.

The heads: ITC projections and temperature, BERT's MLM prediction head, a VQA answer classifier.
The model that wires them with two towers is the fusion family's (glimpse/families/fusion).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.models.attention import attend
from glimpse.models.layers import ACTIVATIONS, MLP, Attention
from glimpse.models.text import TextConfig

FUSIONS = ("cross_attention", "concat", "weighted_sum", "product")


class CrossAttention(nn.Module):
    """Queries from the text, keys and values from the image tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # [B, T, D], [B, N, D]
        B, T, D = x.shape
        hd = D // self.heads
        q = self.q(x).view(B, T, self.heads, hd).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        y = attend(self, q, k, v)  # every image token is real: no mask
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class FusionBlock(nn.Module):
    """Pre-norm: self-attention, then (cross_attention only) attention to the image, then the MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, act: str, eps: float, cross: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.ln_cross = nn.LayerNorm(dim, eps=eps) if cross else None
        self.cross = CrossAttention(dim, heads) if cross else None
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, image: torch.Tensor | None = None):
        x = x + self.attn(self.ln1(x), mask)
        if self.cross is not None:
            x = x + self.cross(self.ln_cross(x), image)
        return x + self.mlp(self.ln2(x))


class Fusion(nn.Module):
    """The fusion layers and the image's way into them (`op`, one of FUSIONS)."""

    def __init__(self, op: str, vision_width: int, t: TextConfig, layers: int):
        super().__init__()
        D = t.width
        self.op = op
        self.image_proj = nn.Linear(vision_width, D)  # image tokens into the text's width
        if self.op == "concat":
            self.type_embed = nn.Parameter(torch.zeros(2, D))  # which stream a token came from
        if self.op == "weighted_sum":
            self.gate = nn.Parameter(torch.zeros(D))  # sigmoid(0) = 1/2: equal weights at the start
        cross = self.op == "cross_attention"
        self.blocks = nn.ModuleList(FusionBlock(D, t.heads, t.mlp_ratio, t.act, t.eps, cross)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(D, eps=t.eps)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, patches: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """text [B, T, D], text_mask [B, T], patches [B, N, Dv], pooled [B, Dv] -> fused text states [B, T, D]."""
        B, T, _ = text.shape
        image = None
        mask = text_mask.bool()
        if self.op == "cross_attention":
            x, image = text, self.image_proj(patches)
        elif self.op == "concat":
            img = self.image_proj(patches) + self.type_embed[1]
            x = torch.cat([text + self.type_embed[0], img], dim=1)  # [B, T + N, D]
            mask = torch.cat([mask, mask.new_ones(B, img.shape[1])], dim=1)
        else:
            v = self.image_proj(pooled)[:, None]  # [B, 1, D]
            if self.op == "weighted_sum":
                g = torch.sigmoid(self.gate)
                x = g * text + (1 - g) * v
            else:
                x = text * v
        attn_mask = None if bool(mask.all()) else mask[:, None, None, :]  # [B, 1, 1, S]
        for block in self.blocks:
            x = block(x, attn_mask, image)
        return self.norm(x[:, :T])


class ContrastiveHead(nn.Module):
    """ITC: projections of the unimodal features into a shared space, and the temperature."""

    def __init__(self, vision_width: int, text_width: int, embed_dim: int, temperature: float):
        super().__init__()
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100)).exp()  # as CLIP, for stability


class MLMHead(nn.Module):
    """BERT's prediction head: dense + activation + norm, then a decoder whose weight is the text
    tower's token embedding (tied by the model), with its own bias."""

    def __init__(self, dim: int, vocab: int, act: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = ACTIVATIONS[act]
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


class AnswerHead(nn.Module):
    """VQA as classification over the answer vocabulary (the classifier of BUTD/ViLT)."""

    def __init__(self, dim: int, n_answers: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(2 * dim, eps=eps)
        self.fc2 = nn.Linear(2 * dim, n_answers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


def pad_tokens(x: torch.Tensor, T: int) -> torch.Tensor:
    """Right-pad dim 1 of token states [B, t, D] or a mask [B, t] with zeros to length T."""
    if x.shape[1] == T:
        return x
    return F.pad(x, (0, 0, 0, T - x.shape[1]) if x.dim() == 3 else (0, T - x.shape[1]))
