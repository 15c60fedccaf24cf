"""A user as the sequence of what they bought: SASRec's causal transformer, or the mean of the history.

Histories are left-padded (index -1 is padding), so the newest item is always in the last slot and a
learned position says how long ago an item was bought (with from_start, a second one says how far from
the oldest, so that "the later half of the history" is easy to find); the state at each slot summarises
the history up to it (causal), which lets training predict every next item of a sequence at once (Kang
& McAuley 2018).
`mean` is the order-blind control: the running mean of the item embeddings so far.
"""

from __future__ import annotations

import torch
from torch import nn

from glimpse.models.layers import Block, init_weights

MODES = ("sasrec", "mean")


class SequenceEncoder(nn.Module):
    def __init__(self, dim: int, mode: str = "sasrec", layers: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.1, from_start: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"user encoder {mode!r} must be one of {', '.join(MODES)}")
        self.mode, self.max_len = mode, max_len
        self.dropout = nn.Dropout(dropout)
        self.from_start = from_start and mode == "sasrec"
        if mode == "sasrec":
            self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
            if self.from_start:  # each item's place counted from the oldest as well as from the newest
                self.start_embed = nn.Parameter(torch.zeros(max_len, dim))
            self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=2.0) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        init_weights(self)
        if mode == "sasrec":
            nn.init.normal_(self.pos_embed, std=0.02)
        if self.from_start:
            nn.init.normal_(self.start_embed, std=0.02)

    def forward(self, items: torch.Tensor, item_embeds: torch.Tensor) -> torch.Tensor:
        """items [B, T] (item indices, -1 = padding on the left), item_embeds [N, D] -> states [B, T, D]."""
        B, T = items.shape
        if T > self.max_len:
            raise ValueError(f"a history of {T} items: this user encoder has positions for {self.max_len}")
        valid = items >= 0
        x = item_embeds[items.clamp(min=0)] * valid[..., None]
        if self.mode == "mean":
            h = x.cumsum(1) / valid.cumsum(1).clamp(min=1)[..., None]
            return self.proj(self.norm(h))
        x = x + self.pos_embed[:, self.max_len - T:]
        if self.from_start:
            x = x + self.start_embed[(valid.cumsum(1) - 1).clamp(min=0)] * valid[..., None]
        x = self.dropout(x)
        causal = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()
        mask = causal & valid[:, None, :]  # [B, T, T]: earlier, real items
        mask = mask | torch.eye(T, dtype=torch.bool, device=items.device)  # a padding slot sees itself (no empty rows)
        mask = mask[:, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.proj(self.norm(x))
