"""One decoding step of a CausalLM replayed as a CUDA graph.

At small batch sizes a decode step is dozens of tiny kernels, and launching them from Python
costs more than running them: a 1B model on an H100 spends most of each token waiting on the
CPU.  A CUDA graph records the step's kernels once and replays them with one launch.

A graph needs fixed shapes and addresses, so the step works on static buffers: the new tokens
[B, 1], their positions [B, 1], the KV cache slot they write (`KVCache.slot`, a device tensor),
and a bool mask over all `max_len` cache positions [B, 1, 1, S] (the prompt's real tokens, then
each generated one).  Attention therefore reads the whole preallocated cache, masked; the
arithmetic per real position is the same as the eager step's.
"""

from __future__ import annotations

import torch


class StaticDecoder:
    def __init__(self, model, cache, mask: torch.Tensor, pos: torch.Tensor):
        """`mask` [B, L] and `pos` [B, 1]: the prefilled cache's padding mask and last positions."""
        B, L = mask.shape
        S, device = cache.max_len, mask.device
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.pos = pos.clone()
        self.slot = torch.tensor([L], device=device)
        self.valid = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=device)
        self.valid[:, 0, 0, :L] = mask.bool()
        self.columns = torch.arange(S, device=device)
        cache.slot = self.slot
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (kernel selection, workspace) off the main stream
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
        except Exception:
            cache.slot = None
            raise

    def _forward(self) -> torch.Tensor:
        mask = self.valid | (self.columns == self.slot)  # the new token also sees itself
        return self.model(self.tokens, mask, position_ids=self.pos + 1, cache=self.cache)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; -> the next logits [B, V] (a buffer the next step overwrites)."""
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        self.valid.index_fill_(3, self.slot, True)
        self.slot += 1
        self.pos += 1
        return self.logits

    def close(self) -> None:
        self.cache.slot = None
        self.cache.length = int(self.slot.item())
