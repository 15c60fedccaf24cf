"""Text generation with a `CausalLM`: greedy, sampling (temperature, top-k, top-p), beam search, streaming.

Prompts of different lengths are LEFT-padded into one batch (so every row's next token sits in the
last column), prefilled once into a KV cache with `position_ids = positions_from_mask(mask)`, then
decoded one token per step: the mask grows by a column of ones and the position by one.  A prompt's
tokens therefore do not depend on what else is in the batch (batch invariance, up to float noise).

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
from dataclasses import dataclass, field

import torch

from glimpse.models.decoder import positions_from_mask


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    num_beams: int = 1
    eos_token_id: int | list[int] | None = None
    stop_strings: list[str] = field(default_factory=list)  # needs a `decode` callable
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks decode a fixed number of tokens
    cuda_graph: bool = True  # on CUDA, replay each greedy/sampling step as a CUDA graph (infer/cuda_graph.py)


def _eos_ids(cfg: GenerationConfig) -> set[int]:
    if cfg.ignore_eos or cfg.eos_token_id is None:
        return set()
    return {cfg.eos_token_id} if isinstance(cfg.eos_token_id, int) else set(cfg.eos_token_id)


def _check(prompts, cfg: GenerationConfig, prefix_embeds, decode) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    if cfg.max_new_tokens < 0 or cfg.num_beams < 1 or cfg.top_k < 0:
        raise ValueError("max_new_tokens and top_k must be >= 0, num_beams >= 1")
    if cfg.do_sample and cfg.temperature <= 0:
        raise ValueError("sampling needs temperature > 0 (use do_sample=False for greedy)")
    if cfg.do_sample and cfg.num_beams > 1:
        raise ValueError("beam search is greedy: do_sample with num_beams > 1 is not supported")
    if cfg.stop_strings and decode is None:
        raise ValueError("stop_strings need a `decode` callable (token ids -> text)")
    if prefix_embeds is not None:
        if len(prefix_embeds) != len(prompts):
            raise ValueError(f"{len(prefix_embeds)} prefix_embeds for {len(prompts)} prompts")
        for i, (p, e) in enumerate(zip(prompts, prefix_embeds)):
            if e.ndim != 2 or e.shape[0] != len(p):
                raise ValueError(f"prefix_embeds[{i}] is {tuple(e.shape)}, expected [{len(p)}, D]")


def _memory_inputs(memory, memory_mask, T: int, device) -> dict:
    """Per-prompt memories [S_i, D] and masks [T_i, S_i] as the batch's [B, S, D] and [B, 1, T, S]:
    memories padded at the end (slots no token reads), masks left-padded with the prompts."""
    if memory is None:
        return {}
    S = max(m.shape[0] for m in memory)
    mem = torch.zeros(len(memory), S, memory[0].shape[-1], dtype=memory[0].dtype, device=device)
    for i, m in enumerate(memory):
        mem[i, :m.shape[0]] = m
    if memory_mask is None and all(m.shape[0] == S for m in memory):
        return {"memory": mem}
    mask = torch.zeros(len(memory), 1, T, S, dtype=torch.bool, device=device)
    for i, m in enumerate(memory):
        if memory_mask is None:
            mask[i, 0, :, :m.shape[0]] = True
        else:
            t, s = memory_mask[i].shape
            mask[i, 0, T - t:, :s] = memory_mask[i].to(device)
    return {"memory": mem, "memory_mask": mask}


def _prefill(model, prompts, pad_id: int, prefix_embeds, extra: int, memory=None, memory_mask=None):
    """Left-pad, run the prompts through a fresh cache with room for `extra` more tokens.
    -> (last logits [B, V], mask [B, T], last positions [B, 1], cache)."""
    device = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, T - len(p):] = 1
    pos = positions_from_mask(mask)
    cache = model.new_cache(B, T + extra)
    x = model.embed(ids)  # the padding keeps pad_id's embedding; the mask hides it anyway
    for i, e in enumerate(prefix_embeds or []):
        x[i, T - e.shape[0]:] = e.to(x)
    hidden = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, cache=cache, return_hidden=True,
                   **_memory_inputs(memory, memory_mask, T, device))
    return model.lm_head(hidden[:, -1]), mask, pos[:, -1:], cache  # logits of the last position only


def _step(model, tokens: torch.Tensor, mask, pos, cache):
    """Feed one token per row [N]; -> (logits [N, V], mask, pos)."""
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    pos = pos + 1
    return model(tokens[:, None], mask, position_ids=pos, cache=cache)[:, -1], mask, pos


# Below this a temperature changes no draw (a logit gap of 1e-5 becomes 10 nats), and logits / T can
# overflow float32 (1e-40 is subnormal), which would make every probability NaN.
MIN_TEMPERATURE = 1e-6


def _pick(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row [N] from logits [N, V]: argmax, or a draw after temperature/top-k/top-p."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(cfg.temperature, MIN_TEMPERATURE)
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # drop a token when the more likely ones already reach top_p: the smallest set with
        # mass >= top_p survives, and the most likely token always does
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        drop[:, 0] = False
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _decode_events(model, prompts, cfg, pad_id, prefix_embeds, decode, out,
                   cancelled=None, memory=(None, None)) -> Iterator[tuple[int, int]]:
    """Greedy / sampling loop: appends to `out[row]` and yields (row, token) for each kept token.
    `cancelled(row)`, asked before each step, ends a row early (a server's client went away)."""
    eos = _eos_ids(cfg)
    logits, mask, pos, cache = _prefill(model, prompts, pad_id, prefix_embeds, cfg.max_new_tokens, *memory)
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(cfg.seed)
    alive = [True] * len(prompts)
    static = None  # after the prefill, steps replay as a CUDA graph where there is one
    if cfg.cuda_graph and logits.is_cuda and cfg.max_new_tokens > 1:
        from glimpse.infer.cuda_graph import StaticDecoder

        static = StaticDecoder(model, cache, mask, pos)
    try:
        for step in range(cfg.max_new_tokens):
            if cancelled is not None:
                alive = [a and not cancelled(row) for row, a in enumerate(alive)]
                if not any(alive):
                    break
            tokens = _pick(logits, cfg, generator)
            for row, tok in enumerate(tokens.tolist()):
                if not alive[row]:
                    continue
                if tok in eos:
                    alive[row] = False
                    continue
                out[row].append(tok)
                if cfg.stop_strings and any(s in decode(out[row]) for s in cfg.stop_strings):
                    out[row].pop()  # documented cut: drop the token that completed the stop string
                    alive[row] = False
                    continue
                yield row, tok
            if not any(alive) or step == cfg.max_new_tokens - 1:
                break  # the last chosen token needs no forward pass
            # finished rows keep stepping (the batch stays rectangular) on pad tokens nobody reads
            tokens = tokens.masked_fill(~torch.tensor(alive, device=tokens.device), pad_id)
            if static is not None:
                logits = static.step(tokens)
            else:
                logits, mask, pos = _step(model, tokens, mask, pos, cache)
    finally:
        if static is not None:
            static.close()


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
    _check(prompts, cfg, prefix_embeds, decode)
    if memory is not None and (len(memory) != len(prompts) or (memory_mask is not None and len(memory_mask) != len(prompts))):
        raise ValueError(f"{len(memory)} memories (and their masks) for {len(prompts)} prompts")
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
