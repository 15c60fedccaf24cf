"""Flamingo's gated cross-attention block, inserted before chosen layers of a frozen language model.

    x = x + tanh(attn_gate) * attn(attn_norm(x), memory)     text reads the (resampled) images
    x = x + tanh(ff_gate) * ff(ff_norm(x))

Both gates start at 0, so an untrained block is the identity and the model computes exactly its
language model; training opens them.  "float" gates are one number per block, "vector" gates one
per channel (IDEFICS' alpha_type).

Tokens that read no image (text before the first `<image>`, text whose image is padding) get a
zero attention output, as OpenFlamingo (`attn` zeroed where text_time == 0) and IDEFICS
(`cross_attention_gate`, applied to the attention output before the alpha gate) do; in both the
feed-forward still runs on every token, here too.  Keys and values come from the memory, of the
vision width (OpenFlamingo's dim_visual, IDEFICS' vision embed_dim), through `CrossAttention.kv`.

Two layouts, one naming (the hub maps are one template per tensor):

    glimpse (xattn.{layer}.)   OpenFlamingo (gated_cross_attn_layer.)   IDEFICS (gated_cross_attn_layers.{j}.)
    attn_norm                  attn.norm (LayerNorm)                    input_layernorm (RMSNorm)
    attn.q                     attn.to_q                                cross_attn.q_proj
    attn.kv                    attn.to_kv                               cross_attn.k_proj + v_proj
    attn.out                   attn.to_out                              cross_attn.o_proj
    attn.q_norm / k_norm       -                                        cross_attn.q/k_layer_norm (RMSNorm)
    attn_gate                  attn_gate [1]                            alpha_cross_attn [1] or [1, 1, D]
    ff_norm                    ff.0 (LayerNorm)                         post_attention_layernorm (RMSNorm)
    ff.fc1 / ff.fc2            ff.1 / ff.3 (GELU between, no biases)    -
    ff.gate / up / down        -                                        mlp.gate_proj / up_proj / down_proj
    ff_gate                    ff_gate [1]                              alpha_dense [1] or [1, 1, D]
"""

from __future__ import annotations

import torch
from torch import nn

from glimpse.models.cross_attention import CrossAttention
from glimpse.models.decoder import RMSNorm, SwiGLU

STYLES = ("openflamingo", "idefics")
GATES = ("float", "vector")


class _GeluMLP(nn.Module):
    """OpenFlamingo's FeedForward without its LayerNorm (that is the block's ff_norm)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, memory_dim: int, heads: int, head_dim: int | None = None,
                 ff_hidden: int | None = None, style: str = "openflamingo", gate: str = "float",
                 qk_norm: bool = False, norm_eps: float = 1e-6, act: str = "silu"):
        """`norm_eps` is IDEFICS' rms_norm_eps (its RMSNorms and q/k norms); OpenFlamingo's LayerNorms
        keep torch's 1e-5.  `act` is the IDEFICS SwiGLU's activation (the LM's hidden_act)."""
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"gated cross-attention style {style!r} must be one of {', '.join(STYLES)}")
        if gate not in GATES:
            raise ValueError(f"gate {gate!r} must be one of {', '.join(GATES)}")
        self.style = style
        of = style == "openflamingo"
        ff_hidden = ff_hidden or 4 * dim
        self.attn_norm = nn.LayerNorm(dim) if of else RMSNorm(dim, norm_eps)
        self.attn = CrossAttention(dim, heads, memory_dim, head_dim, bias=False, qk_norm=qk_norm,
                                   norm_eps=norm_eps)
        self.ff_norm = nn.LayerNorm(dim) if of else RMSNorm(dim, norm_eps)
        self.ff = _GeluMLP(dim, ff_hidden) if of else SwiGLU(dim, ff_hidden, act)
        shape = (1,) if gate == "float" else (dim,)
        self.attn_gate = nn.Parameter(torch.zeros(shape))
        self.ff_gate = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache=None, key=None) -> torch.Tensor:
        """x [B, T, D]; memory [B, S, Dm] (None when `cache` holds this block's keys and values under
        `key`, or when there are no images at all); mask bool [B, 1, T, S], True = the token reads
        the slot.  -> [B, T, D]."""
        if self._reads(memory, cache, key):
            y = self.attn(self.attn_norm(x), memory, mask, cache, key)
            x = x + self.attn_gate.tanh().to(x.dtype) * y
        return x + self.ff_gate.tanh().to(x.dtype) * self.ff(self.ff_norm(x))

    @staticmethod
    def _reads(memory, cache, key) -> bool:
        """Whether there is anything to read: a batch without images (no memory, or one of no slots)
        skips the attention, whose output would be zero for every token anyway."""
        if memory is not None:
            return memory.shape[1] > 0
        return cache is not None and key in cache.memory
