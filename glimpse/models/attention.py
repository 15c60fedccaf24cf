"""Every attention layer of glimpse computes its attention through `attend`: the fused kernel
(`scaled_dot_product_attention`) normally, explicit probabilities in explain mode, and two products
for the one query of a compiled batch-1 decode step on a CPU (`_one_query`).

SDPA returns no attention weights (transformers' SDPA path neither, transformers#31990), and an
explanation needs them, with their gradients.  Inside `record_attention()`, `attend` computes
softmax(q k^T * scale + mask) itself, keeps the probabilities in the recorder under the module that
asked, and multiplies them into v; the output equals SDPA's to float rounding (tested within 1e-5 on
every family's logits).  With gradients on, each map is made a node of the graph, so
`torch.autograd.grad(score, recorder.maps_of(...))` gives d score / d attention for every layer,
whether or not the weights themselves require gradients (a frozen tower's maps still get theirs).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

# The recorder of this thread (or task); `_ACTIVE` counts the open ones anywhere, so that the usual path
# reads one plain global (which torch.compile traces without a graph break) and never the context variable.
_RECORDER: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar("glimpse_attention",
                                                                                    default=None)
_ACTIVE = 0


class AttentionRecorder:
    """The attention probabilities [B, H, T, S] of each attention call, in call order, by module."""

    def __init__(self):
        self.calls: list[tuple[nn.Module, torch.Tensor]] = []

    def maps_of(self, modules) -> list[torch.Tensor]:
        """The maps of `modules` (in their order), each module's latest call."""
        latest = {id(m): p for m, p in self.calls}
        missing = [m for m in modules if id(m) not in latest]
        if missing:
            raise RuntimeError(f"{len(missing)} attention layers recorded nothing: was the forward run inside "
                               "record_attention()?")
        return [latest[id(m)] for m in modules]


@contextlib.contextmanager
def record_attention():
    """Explain mode: attention through explicit probabilities, each kept in the recorder yielded."""
    global _ACTIVE
    recorder = AttentionRecorder()
    token = _RECORDER.set(recorder)
    _ACTIVE += 1
    try:
        yield recorder
    finally:
        _ACTIVE -= 1
        _RECORDER.reset(token)


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one sequence's one new token (a compiled fp32 decode step at batch 1 on a CPU, where
    it was measured), as two products and a softmax that inductor fuses: SDPA's CPU kernel has a fixed
    cost of ~90 us a layer, more than this work; about 1 ms of a 15 ms step of bench/vlm_vs_transformers.py's
    model (at batch 16 SDPA's one pass over the cache wins, bench/RESULTS.md).  Grouped-query heads: the
    query heads of a kv head are its rows.  A mask with no True gives NaN here (SDPA gives zeros); no
    decode step has one."""
    H, hd, KV = q.shape[1], q.shape[3], k.shape[1]
    scores = (q.reshape(1, KV, H // KV, hd) @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # [1, KV, G, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(1, 1, 1, -1), float("-inf"))
    return (scores.softmax(-1) @ v).reshape(1, H, 1, hd)


def attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           attn_mask: torch.Tensor | None = None, is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """Attention of q [B, H, T, hd] over k, v [B, H|KV, S, hd] -> [B, H, T, hd], SDPA's semantics:
    a bool mask is True where a query may attend, a float mask is added to the scores; `is_causal`
    aligns the causal triangle to the top left, as SDPA does."""
    recorder = _RECORDER.get() if _ACTIVE else None
    if recorder is None and q.shape[0] == 1 and q.shape[2] == 1 and not is_causal and q.device.type == "cpu" \
            and q.dtype == torch.float32 and torch.compiler.is_compiling() \
            and (attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.numel() == k.shape[-2])):
        return _one_query(q, k, v, attn_mask)
    if recorder is None:
        extra = {"enable_gqa": True} if enable_gqa else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **extra)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: query head h reads kv head h // (H / KV)
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    T, S = q.shape[-2], k.shape[-2]
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    if is_causal:
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    probs = scores.softmax(-1)
    if torch.is_grad_enabled() and not probs.requires_grad:
        probs.requires_grad_(True)  # a frozen layer's map: a leaf that gradients still reach
    recorder.calls.append((module, probs))
    return (probs @ v.float()).to(v.dtype)
