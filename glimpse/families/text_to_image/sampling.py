"""Sampling code grids from a prior, with classifier-free guidance, and re-ranking by CLIP.

Guidance runs the conditional and the unconditional rows as one batch and mixes their logits,
u + g (c - u) (Ho & Salimans; Muse applies it to token logits the same way).  Composed guidance
(`phrase_guidance` w > 0) adds a term per phrase of the prompt (one object each): `conjunction`,
u + g (c - u) + w sum_i (c_i - u), Composable Diffusion's conjunction (Liu et al. 2022, eq. 10) on
token logits, c_i the phrase alone; or `leave_one_out`, + w sum_i (c - c_-i), c_-i the prompt
without phrase i.  Either way each object's own condition pulls where the whole caption's reading
is weak (on the shapes world it hurts: docs/results.md, 2026-11-27, session 12).

MaskGIT (Chang et al. 2022; google-research/maskgit `maskgit/libml/parallel_decode.py`): start with
every code masked; at step t of S, sample every masked position, keep the most confident samples and
mask the rest again, so that cos(pi/2 * t/S) of the grid is still masked after step t.  Confidence is
the sampled code's log-probability plus Gumbel noise scaled by `choice_temperature * (1 - t/S)`.

Autoregressive: the start token, then one code after another, keys and values kept in a KV cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from glimpse.families.text_to_image.model import TextToImage


def _guided(logits: torch.Tensor, guidance: float, phrases: tuple | None = None) -> torch.Tensor:
    """Rows [cond; uncond] (then, with `phrases` = (owner [P], weight, mode), one row per phrase, phrase
    i of prompt row owner[i]) -> the guided logits of the cond rows."""
    if phrases is not None:
        owner, weight, mode = phrases
        B = (len(logits) - len(owner)) // 2
        cond, uncond, per_phrase = logits[:B], logits[B:2 * B], logits[2 * B:]
        guided = uncond + guidance * (cond - uncond)
        term = per_phrase - uncond[owner] if mode == "conjunction" else cond[owner] - per_phrase
        return guided.index_add(0, owner, term, alpha=weight)
    if guidance == 1.0:
        return logits[: len(logits) // 2]
    cond, uncond = logits.chunk(2)
    return uncond + guidance * (cond - uncond)


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(probs.shape[:-1])


def _both(memory: torch.Tensor, memory_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory twice over: conditional rows, then the same rows reading only the null slot."""
    uncond = torch.zeros_like(memory_mask)
    uncond[..., 0] = True
    return torch.cat([memory, memory]), torch.cat([memory_mask, uncond])


def _pad_cat(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    """Two (memory [*, S, D], mask [*, 1, 1, S]) batches as one, the shorter padded with masked slots."""
    S = max(a[0].shape[1], b[0].shape[1])
    mems, masks = [], []
    for m, k in (a, b):
        mems.append(F.pad(m, (0, 0, 0, S - m.shape[1])))
        masks.append(F.pad(k, (0, S - k.shape[-1]), value=False))
    return torch.cat(mems), torch.cat(masks)


@torch.no_grad()
def sample_maskgit(model: TextToImage, memory: torch.Tensor, memory_mask: torch.Tensor, *, steps: int,
                   guidance: float, temperature: float, choice_temperature: float,
                   generator: torch.Generator | None = None, phrases: tuple | None = None) -> torch.Tensor:
    """Code grids [B, N] for text memories [B, S, D].  `phrases`: (memory, mask, owner [P], weight,
    mode) of the prompts' phrases, for composed guidance."""
    cfg = model.cfg
    B, N, mask_id = memory.shape[0], cfg.vq.tokens_per_image, cfg.special_id
    memory, memory_mask = _both(memory, memory_mask)
    mix = None
    if phrases is not None:
        p_memory, p_mask, *mix = phrases
        memory, memory_mask = _pad_cat((memory, memory_mask), (p_memory, p_mask))
    tokens = torch.full((B, N), mask_id, dtype=torch.long, device=memory.device)
    for t in range(steps):
        rows = torch.cat([tokens, tokens] + ([tokens[mix[0]]] if mix else []))
        logits = _guided(model(rows, memory, memory_mask), guidance, mix)  # [B, N, K]
        unknown = tokens == mask_id
        sampled = torch.where(unknown, _sample(logits, temperature, generator), tokens)
        ratio = (t + 1) / steps
        # how many stay masked after this step: cos(pi/2 * ratio) of the grid, at least one fewer than now
        # is masked (progress every step), none after the last
        n_masked = unknown.sum(1, keepdim=True)
        keep_masked = torch.clamp(torch.full_like(n_masked, math.floor(N * math.cos(math.pi / 2 * ratio))),
                                  max=n_masked - 1).clamp(min=0)
        if t == steps - 1:
            keep_masked.zero_()
        logp = F.log_softmax(logits.float(), -1).gather(-1, sampled[..., None])[..., 0]
        u = torch.rand(logp.shape, generator=generator, device=logp.device).clamp(1e-20, 1.0)
        confidence = logp + choice_temperature * (1 - ratio) * -torch.log(-torch.log(u))
        confidence = confidence.masked_fill(~unknown, math.inf)  # codes already chosen stay
        order = confidence.argsort(1)  # least confident first
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
        tokens = torch.where(rank < keep_masked, torch.full_like(sampled, mask_id), sampled)
    return tokens


@torch.no_grad()
def sample_autoregressive(model: TextToImage, memory: torch.Tensor, memory_mask: torch.Tensor, *,
                          guidance: float, temperature: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Code grids [B, N], one code after another with a KV cache."""
    cfg = model.cfg
    B, N = memory.shape[0], cfg.vq.tokens_per_image
    memory, memory_mask = _both(memory, memory_mask)
    cache = model.prior.new_cache(2 * B, N + 1)
    step = torch.full((2 * B, 1), cfg.special_id, dtype=torch.long, device=memory.device)
    out = []
    for i in range(N):  # the start token reads the text; later steps reuse its keys and mask from the cache
        text = {"memory": memory, "memory_mask": memory_mask} if i == 0 else {}
        logits = model.code_logits(model.prior(step, cache=cache, **text)[:, -1:, : cfg.codes], start=i)[:, 0]
        code = _sample(_guided(logits, guidance), temperature, generator)  # [B]
        out.append(code)
        step = torch.cat([code, code])[:, None]
    return torch.stack(out, 1)


@torch.no_grad()
def generate_codes(model: TextToImage, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, steps: int,
                   guidance: float, temperature: float, choice_temperature: float,
                   generator: torch.Generator | None = None, phrases: tuple | None = None) -> torch.Tensor:
    """The tokenizer's codes [B, N] of generated images (the samplers give the prior's ids).  `phrases`:
    (input_ids [P, T'], attention_mask, owner [P], weight, mode), each phrase's tokens and the prompt row
    it belongs to, for composed guidance (maskgit only)."""
    memory, memory_mask = model.text_memory(input_ids, attention_mask)
    if phrases is not None and model.cfg.kind != "maskgit":
        raise ValueError("composed (per-phrase) guidance is for the maskgit prior")
    if phrases is not None:
        ids, mask, *rest = phrases
        phrases = (*model.text_memory(ids, mask), *rest)
    if model.cfg.kind == "maskgit":
        codes = sample_maskgit(model, memory, memory_mask, steps=steps, guidance=guidance, temperature=temperature,
                               choice_temperature=choice_temperature, generator=generator, phrases=phrases)
    else:
        codes = sample_autoregressive(model, memory, memory_mask, guidance=guidance, temperature=temperature,
                                      generator=generator)
    return model.vq_ids(codes)
