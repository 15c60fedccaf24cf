"""Relevance from attention maps: the equations of the explanation methods, on recorded maps.

Maps are attention probabilities [B, H, T, S] (glimpse.models.attention.record_attention) and, for the
gradient methods, their gradients with respect to the explained score.  Each function returns a relevance
matrix [B, T, S] (row t: how much each source token matters for token t); a caller reads the row of the
token that carries the decision (a class token, a pooled row, the position that predicts an answer word).

- raw: the last layer's map, averaged over heads.
- rollout (Abnar & Zuidema 2020): each layer's head-mean map plus the identity (the residual), rows
  normalised, chained from the first layer to the last; as `compute_rollout_attention` in
  hila-chefer/Transformer-Explainability.
- gradcam: one layer's map times its positive gradient, averaged over heads; LAVIS's `compute_gradcam`
  for BLIP's image-text matching (there on the cross-attention of one text layer).
- chefer (Chefer, Gur & Wolf, ICCV 2021, "Generic Attention-model Explainability for Interpreting
  Bi-Modal and Encoder-Decoder Transformers"): Ā = mean_h (∇A ⊙ A)⁺ per layer (rule 5); self-attention
  R_ss += Ā R_ss and R_sq += Ā R_sq (rules 6, 7); attention from modality s to modality q
  R_sq += R̄_ssᵀ Ā R̄_qq (rule 10) with R̄ = the relevance less the identity, rows normalised, plus the
  identity (eqs. 8, 9).
"""

from __future__ import annotations

import torch

ATTENTION_METHODS = ("raw", "rollout", "gradcam", "chefer")
GRADIENT_METHODS = ("gradcam", "chefer")


def _eye(B: int, N: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(N, dtype=like.dtype, device=like.device).expand(B, N, N)


def weighted_heads(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Ā = mean over heads of (∇A ⊙ A)⁺: [B, H, T, S] -> [B, T, S] (Chefer's rule 5, LAVIS's Grad-CAM)."""
    return (grad * attn).clamp(min=0).mean(1)


def raw(maps: list[torch.Tensor]) -> torch.Tensor:
    return maps[-1].mean(1)


def rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """[B, N, N]: the joint attention of self-attention layers (first to last)."""
    joint = None
    for attn in maps:
        a = attn.mean(1)
        a = a + _eye(a.shape[0], a.shape[-1], a)
        a = a / a.sum(-1, keepdim=True)
        joint = a if joint is None else a @ joint
    return joint


def gradcam(maps: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    return weighted_heads(maps[-1], grads[-1])


def chefer_self(maps: list[torch.Tensor], grads: list[torch.Tensor], R: torch.Tensor | None = None,
                cross: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rules 6 and 7 through self-attention layers: (R_ss [B, N, N], R_sq [B, N, M] or None).  `R` and
    `cross` continue earlier relevances (R_ss from the identity, R_sq from zero, when not given)."""
    for attn, grad in zip(maps, grads):
        a = weighted_heads(attn, grad)
        if R is None:
            R = _eye(a.shape[0], a.shape[-1], a).clone()
        if cross is not None:
            cross = cross + a @ cross
        R = R + a @ R
    return R, cross


def normalised(R: torch.Tensor) -> torch.Tensor:
    """R̄ (Chefer's eqs. 8-9): the self-relevance less the identity, rows normalised, plus the identity."""
    eye = _eye(R.shape[0], R.shape[-1], R)
    r = R - eye
    return r / r.sum(-1, keepdim=True).clamp_min(1e-12) + eye


def chefer_cross(R_ss: torch.Tensor, R_sq: torch.Tensor, R_qq: torch.Tensor, attn: torch.Tensor,
                 grad: torch.Tensor) -> torch.Tensor:
    """Rule 10: an attention layer from modality s (queries) to modality q (keys) adds
    R̄_ssᵀ Ā R̄_qq to R_sq [B, Ns, Nq]."""
    return R_sq + normalised(R_ss).transpose(-1, -2) @ weighted_heads(attn, grad) @ normalised(R_qq)


def self_relevance(method: str, maps: list[torch.Tensor], grads: list[torch.Tensor] | None = None) -> torch.Tensor:
    """[B, N, N] relevance of one stack of self-attention layers by `method` (ATTENTION_METHODS)."""
    if method == "raw":
        return raw(maps)
    if method == "rollout":
        return rollout(maps)
    if grads is None:
        raise ValueError(f"{method} needs the maps' gradients")
    if method == "gradcam":
        return gradcam(maps, grads)
    if method == "chefer":
        return chefer_self(maps, grads)[0]
    raise ValueError(f"unknown attention method {method!r}; one of {', '.join(ATTENTION_METHODS)}")
