"""Transformer text tower (CLIP-text shape: learned positions, pre-norm blocks, final norm).

The same tower takes SigLIP's text model (bidirectional, pools the last position) and BERT
(`norm: post` blocks, `embed_norm` after the embeddings, token-type embeddings, no final norm).

Pooling: "eos" takes the state at each sequence's last real token (CLIP pools its EOS
token), "cls" the first token, "mean" the masked mean, "last" the last position whatever the
mask (SigLIP, whose texts are padded to the full length).  With `causal=True` (CLIP) padding
after the EOS cannot influence it, so no padding mask is needed and SDPA takes its fast
causal path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glimpse.models.layers import Block, clip_init, init_weights


@dataclass
class TextConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer
    context_length: int = 32
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"
    causal: bool = True
    pool: str = "eos"  # eos | cls | mean | last
    eps: float = 1e-5
    norm: str = "pre"  # pre (CLIP, SigLIP) | post (BERT) layer-norm placement in the blocks
    final_norm: bool = True  # a layer norm after the last block (CLIP, SigLIP; not BERT)
    embed_norm: bool = False  # a layer norm on the summed embeddings (BERT)
    type_vocab_size: int = 0  # >0: BERT's token-type (segment) embeddings


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("text vocab_size must be set (from the tokenizer)")
        if cfg.pool not in ("eos", "cls", "mean", "last"):
            raise ValueError(f"text pool {cfg.pool!r} must be one of eos, cls, mean, last")
        self.cfg = cfg
        D = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, D))
        self.type_embed = nn.Embedding(cfg.type_vocab_size, D) if cfg.type_vocab_size else None
        self.embed_norm = nn.LayerNorm(D, eps=cfg.eps) if cfg.embed_norm else None
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.eps, cfg.norm)
                                    for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(D, eps=cfg.eps) if cfg.final_norm else nn.Identity()
        init_weights(self)
        nn.init.normal_(self.pos_embed, std=0.01)
        clip_init(self.blocks, D)

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape  # [B, T]
        if T > self.cfg.context_length:
            raise ValueError(f"text of {T} tokens is longer than the context length {self.cfg.context_length}")
        x = self.token_embed(input_ids) + self.pos_embed[:, :T]
        if self.type_embed is not None:  # segment 0 unless told otherwise, as BERT
            x = x + (self.type_embed.weight[0] if token_type_ids is None else self.type_embed(token_type_ids))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        mask = None
        if not self.cfg.causal and attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask[:, None, None, :].bool()  # [B, 1, 1, T]
        for block in self.blocks:
            x = block(x, mask, causal=self.cfg.causal)
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled text representation [B, D]."""
        return self.pool(self.forward_features(input_ids, attention_mask), input_ids, attention_mask)

    def pool(self, x: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled representation [B, D] of token states x [B, T, D] (forward_features')."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.cfg.pool == "cls":
            return x[:, 0]
        if self.cfg.pool == "last":
            return x[:, -1]
        if self.cfg.pool == "mean":
            m = attention_mask.unsqueeze(-1).to(x.dtype)
            return (x * m).sum(1) / m.sum(1).clamp_min(1)
        last = attention_mask.sum(1).long().clamp_min(1) - 1  # right padding: the EOS is the last real token
        return x[torch.arange(x.shape[0], device=x.device), last]
