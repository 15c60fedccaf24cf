"""Text generation with a `CausalLM`: greedy, sampling (temperature, top-k, top-p), beam search, streaming.

Prompts of different lengths are LEFT-padded into one batch (so every row's next token sits in the
last column), prefilled once into a KV cache with `position_ids = positions_from_mask(mask)`, then
decoded one token per step: the mask grows by a column of ones and the position by one.  A prompt's
tokens therefore do not depend on what else is in the batch (batch invariance, up to float noise).
Greedy decoding and sampling run on `DecodeBatch` (infer/batch.py), a fixed batch here; the server's
continuous batching drives the same engine with rows that join and leave between steps.

Results are the NEW tokens only, one list per prompt, and exclude what ended the row:

* EOS (`eos_token_id`, one id or a list): the row stops and the eos token is NOT returned.
  `ignore_eos=True` decodes exactly `max_new_tokens` tokens (benchmarks).
* Stop strings (need `decode(ids) -> str`): after every token the row's generated text (new tokens
  only, not the prompt) is decoded; if it contains a stop string, the token that completed it is
  dropped and the row stops.  Tokens before it are kept, so a stop string that spans several tokens
  can leave its beginning at the end of the returned text.
* `on_token(row, token_id)` is called for exactly the tokens that are returned, in order, as each
  step chooses them (a dropped eos / stop-string token is never reported).  Beam search only knows
  its winner at the end, so there the calls come after the search.  `stream` yields the same tokens.

Sampling draws from a `torch.Generator` seeded with `cfg.seed` (one multinomial draw per row per
step), so the same seed, prompts and batch give the same tokens; `seed=None` uses torch's global RNG.

Beam search (`num_beams > 1`, no sampling) keeps `num_beams` beams per prompt.  A beam that picks
eos among the top `num_beams` candidates becomes a finished hypothesis scored `sum_logprobs / len`
(the eos log-prob and the eos itself counted, as transformers with length_penalty=1.0).  A prompt
stops once it has `num_beams` finished hypotheses (transformers' early_stopping=True); otherwise,
after `max_new_tokens`, its running beams join the hypotheses.  The best-scoring one is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from glimpse.infer.batch import (
    DecodeBatch,
    GenerationConfig,
    _check_config,
    _check_prompts,
    _eos_ids,
    _pick,
    _prefill,
    _step,
)

__all__ = ["DecodeBatch", "GenerationConfig", "TextStream", "generate", "stream", "_pick"]


def _decode_events(model, prompts, cfg, pad_id, prefix_embeds, decode, out,
                   cancelled=None, memory=(None, None)) -> Iterator[tuple[int, int]]:
    """Greedy / sampling: one fixed `DecodeBatch` (infer/batch.py); appends to `out[row]` and yields
    (row, token) for each kept token as it is chosen, before the next forward pass.  `cancelled(row)`,
    asked before each step, ends a row early (a server's client went away)."""
    batch = DecodeBatch(model, cfg, pad_id=pad_id, decode=decode, fixed=True)
    try:
        batch.add(prompts, prefix_embeds=prefix_embeds, memory=memory[0], memory_mask=memory[1])
        while True:
            if cancelled is not None:
                batch.remove([row for row in batch.running if cancelled(row)])
            if not batch.running:
                break
            events, _ = batch.choose()
            for row, tok in events:
                out[row].append(tok)
                yield row, tok
            batch.advance()
    finally:
        batch.close()


def _beam_events(model, prompts, cfg, pad_id, prefix_embeds, out, memory=(None, None)) -> Iterator[tuple[int, int]]:
    """Beam search per prompt (see the module docstring); fills `out`, then yields its tokens."""
    B, K = len(prompts), cfg.num_beams
    eos = _eos_ids(cfg)
    logits, mask, pos, cache = _prefill(model, prompts, pad_id, prefix_embeds, cfg.max_new_tokens, *memory)
    V, device = logits.shape[-1], logits.device
    # prefill once per prompt, then copy each prompt's cache into its K beam rows (b * K + k)
    rows = torch.arange(B, device=device).repeat_interleave(K)
    cache.reorder(rows)
    logits, mask, pos = logits[rows], mask[rows], pos[rows]
    # only beam 0 starts alive: K identical beams would fill the first step with duplicates
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    beams: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]  # (score, tokens)
    for step in range(cfg.max_new_tokens):
        cand = (scores[:, :, None] + logits.float().log_softmax(-1).view(B, K, V)).view(B, K * V)
        # 2K candidates: even if K of them end in eos, K beams can still continue
        top, idx = cand.topk(min(2 * K, K * V), dim=-1)
        src = torch.zeros(B, K, dtype=torch.long)  # which beam each new beam extends
        nxt = torch.full((B, K), pad_id, dtype=torch.long)
        new_scores = torch.full((B, K), float("-inf"))
        new_beams = []
        for b in range(B):
            kept: list[list[int]] = []
            if len(finished[b]) < K:  # a done prompt's rows idle on -inf scores
                for rank, (s, j) in enumerate(zip(top[b].tolist(), idx[b].tolist())):
                    beam, tok = divmod(j, V)
                    if s == float("-inf") or len(kept) == K:
                        break
                    if tok in eos:
                        if rank < K:  # as transformers: eos only counts among the top K
                            finished[b].append((s / (step + 1), beams[b][beam]))
                        continue
                    src[b, len(kept)], nxt[b, len(kept)], new_scores[b, len(kept)] = beam, tok, s
                    kept.append(beams[b][beam] + [tok])
            new_beams.append(kept + [[] for _ in range(K - len(kept))])
        beams, scores = new_beams, new_scores.to(device)
        if all(len(f) >= K for f in finished) or step == cfg.max_new_tokens - 1:
            break
        rows = (torch.arange(B)[:, None] * K + src).view(-1).to(device)
        cache.reorder(rows)  # every beam of a prompt shares its mask and positions: no reindexing
        logits, mask, pos = _step(model, nxt.view(-1).to(device), mask, pos, cache)
    for b in range(B):
        hyps = list(finished[b])
        if len(hyps) < K:  # out of steps: the running beams compete too
            hyps += [(s / len(seq), seq) for s, seq in zip(scores[b].tolist(), beams[b])
                     if s != float("-inf") and seq]
        out[b] = list(max(hyps, key=lambda h: h[0])[1]) if hyps else []
        for tok in out[b]:
            yield b, tok


@torch.no_grad()
def _events(model, prompts, cfg, pad_id=0, prefix_embeds=None, decode=None, cancelled=None, memory=None,
            memory_mask=None, *, out):
    """Dispatch to the greedy/sampling loop or beam search; yields (row, token), fills `out`.
    (torch.no_grad on a generator function holds only while the generator itself runs.)"""
    _check_config(cfg, decode)
    _check_prompts(prompts, prefix_embeds, memory, memory_mask)
    if cfg.max_new_tokens == 0:
        return
    if cfg.num_beams > 1:
        yield from _beam_events(model, prompts, cfg, pad_id, prefix_embeds, out, (memory, memory_mask))
    else:
        yield from _decode_events(model, prompts, cfg, pad_id, prefix_embeds, decode, out, cancelled,
                                  (memory, memory_mask))


def generate(model, prompts: list[list[int]], cfg: GenerationConfig, *, pad_id: int = 0,
             prefix_embeds: list[torch.Tensor] | None = None,
             decode: Callable[[list[int]], str] | None = None,
             on_token: Callable[[int, int], None] | None = None,
             cancelled: Callable[[int], bool] | None = None,
             memory: list[torch.Tensor] | None = None,
             memory_mask: list[torch.Tensor] | None = None) -> list[list[int]]:
    """New token ids per prompt (no prompt, no eos; see the module docstring for stopping rules).

    prompts: token ids, at least one each; left-padded with `pad_id` (its value never matters:
      padding is masked out).  Put the model in eval mode first.
    prefix_embeds: optional, per prompt a [T_i, D] tensor fed INSTEAD of the prompt's token
      embeddings (a VLM splices image features in).  `len(prompts[i])` must equal T_i: the ids only
      give lengths (their values are unused, placeholders are fine); generated tokens go through
      `model.embed` as usual.
    decode: ids -> text, needed by `cfg.stop_strings`.  on_token(row, token_id): streaming hook.
    cancelled(row) -> bool: checked before every step; a True row stops (greedy / sampling only).
    memory: per prompt the [S_i, D] states its cross-attention reads (an encoder-decoder's image
      tokens, Flamingo's resampled images), computed into the cache once, at the prefill.
    memory_mask: per prompt a bool [T_i, S_i], which slots each prompt token reads (default: all);
      generated tokens read what the prompt's last token reads.
    """
    out: list[list[int]] = [[] for _ in prompts]
    for row, tok in _events(model, prompts, cfg, pad_id, prefix_embeds, decode, cancelled, memory, memory_mask,
                            out=out):
        if on_token is not None:
            on_token(row, tok)
    return out


def stream(model, prompt: list[int], cfg: GenerationConfig, **kw) -> Iterator[int]:
    """Yield one prompt's new tokens as they are chosen (the tokens `generate` would return).
    kw: pad_id, prefix_embeds (a one-element list), decode."""
    for _, tok in _events(model, [prompt], cfg, out=[[]], **kw):
        yield tok


class TextStream:
    """Tokens in, text pieces out: each piece is what the newest token added to the decoded text
    (leading spaces dropped, half a multi-byte character held back), so the pieces join to the
    stripped-at-the-start text of all tokens.

    Decoding is incremental, as vLLM's detokenizer: only the tokens since the last emitted piece are
    decoded, with the few before them as context (a token's text can depend on its neighbours: a
    leading space, half of a multi-byte character), so an answer of n tokens costs O(n), not O(n^2)."""

    def __init__(self, decode):
        self.decode, self.tokens = decode, []
        self.prefix, self.read = 0, 0  # tokens[prefix:read] were emitted and are the context of the next piece
        self.started = False  # a non-space character was emitted (leading spaces are dropped until then)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self.decode(self.tokens[self.prefix:self.read])
        text = self.decode(self.tokens[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):  # nothing new yet, or half a character
            return ""
        piece = text[len(before):]
        self.prefix, self.read = self.read, len(self.tokens)
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        return piece
