"""Training objectives as plain functions of model outputs.

Contrastive losses gather the other processes' embeddings, so under DDP each process
scores its local rows against the whole global batch.  Each process's loss is weighted by
its share of the global batch (x world / total rows: 1 when shares are equal), so the mean
DDP takes equals the single-process loss on the same global batch, and so do the
gradients, even when processes dropped different numbers of bad samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from glimpse.train.distributed import gather_with_grad


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over normalised embeddings [B, E]."""
    (all_image, offset), (all_text, _) = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    logits_i2t = logit_scale * image_embeds @ all_text.T  # [b, B]
    logits_t2i = logit_scale * text_embeds @ all_image.T  # [b, B]
    loss = (F.cross_entropy(logits_i2t.float(), labels) + F.cross_entropy(logits_t2i.float(), labels)) / 2
    return loss * _share(image_embeds.shape[0], all_image.shape[0])


def siglip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, normalised per image as in the paper: -Σ log σ(z·(s·x·y + b)) / B."""
    all_text, offset = gather_with_grad(text_embeds)
    b = image_embeds.shape[0]
    logits = (logit_scale * image_embeds @ all_text.T + logit_bias).float()  # [b, B]
    labels = -torch.ones_like(logits)
    cols = torch.arange(b, device=logits.device) + offset
    labels[torch.arange(b, device=logits.device), cols] = 1.0
    return -F.logsigmoid(labels * logits).sum() / b * _share(b, all_text.shape[0])


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, T, V] at position t predict labels[:, t + 1];
    positions labelled `ignore_index` (padding, prompts) carry no loss."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=ignore_index)


def lm_loss_at_targets(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                       ignore_index: int = -100) -> torch.Tensor:
    """`lm_loss` computed from hidden states [B, T, D], with logits only at the positions that
    have a target.  The same value; with few targets (assistant tokens only, never image tokens)
    and a large vocabulary, most of the head's matmul and the [B, T, V] logits are never made."""
    targets = labels[:, 1:]
    keep = targets != ignore_index
    logits = lm_head(hidden[:, :-1][keep])  # [N, V]
    return F.cross_entropy(logits.float(), targets[keep])


def _share(local: int, total: int) -> float:
    """local rows / the mean rows per process: the weight that makes DDP's mean the global mean."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return local * world / total


def contrastive_loss(out: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "siglip":
        return siglip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"])
    return clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
