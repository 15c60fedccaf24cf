"""Relevance through glimpse's towers: which recorded maps belong to a ViT or a text tower, and which row
of their relevance carries the pooled output."""

from __future__ import annotations

import torch

from glimpse.explain import relevance as rel
from glimpse.models.text import TextTransformer
from glimpse.models.vision import VisionTransformer


def grads_of(score: torch.Tensor, maps: list[torch.Tensor], retain_graph: bool = False) -> list[torch.Tensor]:
    """d score / d map for every map (zeros for a map the score does not depend on)."""
    grads = torch.autograd.grad(score, maps, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(m) if g is None else g for m, g in zip(maps, grads)]


def vision_layers(vision: VisionTransformer, layer: int | None = None) -> list:
    """The attention modules of the blocks a forward to `layer` runs (all of them by default)."""
    stop = len(vision.blocks) if layer is None else layer % (len(vision.blocks) + 1)
    return [b.attn for b in vision.blocks[:stop]]


def patch_columns(vision: VisionTransformer) -> slice:
    """The token columns that are image patches (after the class token, where there is one)."""
    return slice(1, None) if vision.class_token is not None else slice(0, None)


def vision_relevance(vision: VisionTransformer, method: str, maps: list[torch.Tensor],
                     grads: list[torch.Tensor] | None, head_map: torch.Tensor | None = None,
                     head_grad: torch.Tensor | None = None) -> torch.Tensor:
    """[B, n_patches] relevance of each patch for the tower's pooled output: the class token's row; for
    mean pooling, the mean row; for attention pooling (SigLIP's head), the probe's attention (`head_map`
    [B, H, 1, N] and its gradient) times the tokens' relevance."""
    R = rel.self_relevance(method, maps, grads)  # [B, N, N]
    pool = vision.cfg.pool
    if pool == "map":
        if method in ("raw", "gradcam"):  # one layer: the probe's own attention
            row = rel.weighted_heads(head_map, head_grad) if method == "gradcam" else head_map.mean(1)
            return row[:, 0, patch_columns(vision)]
        probe = rel.weighted_heads(head_map, head_grad) if method == "chefer" else head_map.mean(1)
        return (probe @ R)[:, 0, patch_columns(vision)]
    if pool == "cls":
        return R[:, 0, patch_columns(vision)]
    if method == "chefer":  # every token's identity (its residual) would add the same to every patch
        R = R - torch.eye(R.shape[-1], device=R.device)
    return R.mean(1)[:, patch_columns(vision)]


def text_pool_rows(text: TextTransformer, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] weights of the rows the text tower pools (one-hot, or uniform over real tokens for mean)."""
    B, T = attention_mask.shape
    pool = text.cfg.pool
    w = torch.zeros(B, T, device=attention_mask.device)
    if pool == "cls":
        w[:, 0] = 1
    elif pool == "last":
        w[:, -1] = 1
    elif pool == "mean":
        w = attention_mask.float() / attention_mask.float().sum(1, keepdim=True).clamp_min(1)
    else:  # eos: the last real token
        w[torch.arange(B), attention_mask.sum(1).long().clamp_min(1) - 1] = 1
    return w


def text_relevance(text: TextTransformer, method: str, maps: list[torch.Tensor], grads: list[torch.Tensor] | None,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] relevance of each token for the text tower's pooled output (padding 0)."""
    R = rel.self_relevance(method, maps, grads)
    if method == "chefer":  # the pooled token's own identity is not what it read
        R = R - torch.eye(R.shape[-1], device=R.device)
    w = text_pool_rows(text, attention_mask)
    return (w[:, None] @ R)[:, 0] * attention_mask.float()
