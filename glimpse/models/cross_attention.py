"""Masked cross-attention: text tokens (queries) read a memory of image states (keys and values).

One module serves three layouts:

    glimpse               GPT-2 (VisionEncoderDecoder)      IDEFICS v1 gated block      OpenFlamingo
    q                     crossattention.q_attn             cross_attn.q_proj           attn.to_q
    kv (k and v fused)    crossattention.c_attn             cross_attn.k_proj + v_proj  attn.to_kv
    out                   crossattention.c_proj             cross_attn.o_proj           attn.to_out
    q_norm / k_norm       -                                 cross_attn.q/k_layer_norm   -

The memory's keys and values do not change while a caption or answer is generated, so with a
`KVCache` they are computed once, at the prefill, and kept in the cache under this layer's index
(`cache.memory`), which beam search reorders with the rest.

`mask` [B, 1, T, S] (True = attend) says which memory slots each token reads (Flamingo: only the
latest image before it).  A token that may read none (text before the first image) gets a zero
output rather than the NaN of a softmax over nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from glimpse.models.attention import attend
from glimpse.models.layers import RMSNorm


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, memory_dim: int | None = None, head_dim: int | None = None,
                 bias: bool = True, qk_norm: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.head_dim = hd = head_dim or dim // heads
        if head_dim is None and dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        inner = heads * hd
        self.q = nn.Linear(dim, inner, bias=bias)
        self.kv = nn.Linear(memory_dim or dim, 2 * inner, bias=bias)
        self.out = nn.Linear(inner, dim, bias=bias)
        # IDEFICS' qk_layer_norms: an RMSNorm over each head's queries and keys
        self.q_norm = RMSNorm(hd, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(hd, norm_eps) if qk_norm else None

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, S, hd] of a memory [B, S, Dm]."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache=None, key=None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D].  `memory` [B, S, Dm], or None when `cache` already holds this
        layer's keys and values (stored there under `key` at the prefill)."""
        B, T, _ = x.shape
        kv = None if cache is None else cache.memory.get(key)
        if kv is None:
            if memory is None:
                raise ValueError("cross-attention needs a memory (the image states) or a cache that holds it")
            kv = self.memory_kv(memory)
            if cache is not None:
                cache.memory[key] = kv
        k, v = kv
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        if self.q_norm is not None:
            q = self.q_norm(q)
        reads = None
        if mask is not None:
            reads = mask.any(-1, keepdim=True)  # [B, 1, T, 1]: the token reads something
            mask = mask | ~reads  # an empty row attends everywhere, and its output is zeroed below
        y = attend(self, q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        y = self.out(y.transpose(1, 2).reshape(B, T, -1))
        # zeroed after the projection: with a bias (GPT-2's c_proj), out(0) would be the bias, not zero
        return y if reads is None else y * reads[:, 0]


def latest_image_mask(media_index: torch.Tensor, images: int, tokens_per_image: int) -> torch.Tensor:
    """The Flamingo mask [B, 1, T, images * tokens_per_image]: each token reads only the tokens of
    the latest image before it (`media_index` [B, T]: that image's number, -1 for none)."""
    slot_image = torch.arange(images, device=media_index.device).repeat_interleave(tokens_per_image)  # [S]
    return (media_index[:, None, :, None] == slot_image[None, None, None, :])


def media_index_of(input_ids: torch.Tensor, image_token_id: int, image_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The latest image before (or at) each token [B, T], counted from 0 within its row, -1 where no
    image came yet.  `image_valid` [B, N] False marks padded image slots: a token whose latest
    image is padding reads none."""
    idx = (input_ids == image_token_id).long().cumsum(-1) - 1  # [B, T]
    if image_valid is not None and image_valid.numel():
        ok = torch.cat([image_valid.bool(), image_valid.new_zeros(image_valid.shape[0], 1).bool()], 1)
        real = ok.gather(1, idx.clamp_min(0).clamp_max(image_valid.shape[1]))
        idx = idx.masked_fill(~real, -1)
    return idx
