"""The decoding engine: rows that decode together over one KV cache, one token per step.

`DecodeBatch` is greedy / sampling decoding with a `CausalLM` (or any model with its `embed`, `lm_head`,
`new_cache` and forward).  `generate` drives a fixed batch (every row added at once); `glimpse serve`
drives a running batch (continuous batching: rows join between steps, finished rows leave at once).

Layout.  Rows are LEFT-padded and right-aligned: the cache holds `L` columns, and a row's n processed
tokens (its prompt, then each generated token fed back) fill its last n columns; `mask` [B, L] marks
them and `pos` [B, 1] is each row's last position (n - 1, as `positions_from_mask`).  A step feeds one
token per row: one more column of ones, every position + 1.  What a row attends to, and the positions
it sees, are therefore those of the row decoded alone; only padding columns, hidden by the mask, differ
(batch invariance, up to float noise).

* `add(prompts)`: the new rows are prefilled together in a cache of their own (left-padded among
  themselves, `_prefill`), then merged into the batch: the shorter side gets padding columns on the left.
  Their next-token logits join the batch's.  A batch whose rows read a cross-attention memory takes
  them in one `add` (memories of different sizes are not merged).
* `choose()`: picks every running row's next token from its logits and applies the stopping rules (eos,
  stop strings, the row's own `max_new_tokens`); -> the kept tokens and the rows that ended.
* `advance()`: feeds the chosen tokens of the rows still running through the model (new logits).
  `step()` is both.  Between `choose` and `advance` the caller streams the tokens, and may `remove` rows.
* `remove(rows)`: rows leave (a client went away).

A running batch keeps its cache compact: the rows that ended or left are dropped at the next `add` or
`advance`, and with them the leading columns no remaining row reads, so the cache is never wider than
its longest row (a learned-position model's context bounds each row, hence the batch).  A fixed batch
(`fixed=True`) takes its rows in one `add` and keeps its shapes: an ended row idles on pad tokens that
nobody reads, so that each step can replay as a CUDA graph or run compiled (infer/static_decode.py) and
a seeded sampler draws over the same rows every step.

Sampling draws from a `torch.Generator` seeded with `cfg.seed` (one multinomial draw per row per step),
so the same seed, prompts and batch give the same tokens; `seed=None` uses torch's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glimpse.infer.packed_linear import pack_linears
from glimpse.infer.static_decode import COMPILE_LENGTH_BUCKET, StaticDecoder, compiled_prefill
from glimpse.models.decoder import KVCache, positions_from_mask


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
    cuda_graph: bool = True  # on CUDA, replay each greedy/sampling step as a CUDA graph (infer/static_decode.py)
    # run each step of a fixed batch compiled (infer/static_decode.py; on CUDA inside the step's CUDA
    # graph; on a CPU the prefill too): about a minute of compiling per batch shape, then faster tokens;
    # for long or many generations of one shape
    compile: bool = False


def _eos_ids(cfg: GenerationConfig) -> set[int]:
    if cfg.ignore_eos or cfg.eos_token_id is None:
        return set()
    return {cfg.eos_token_id} if isinstance(cfg.eos_token_id, int) else set(cfg.eos_token_id)


def _check_config(cfg: GenerationConfig, decode) -> None:
    if cfg.max_new_tokens < 0 or cfg.num_beams < 1 or cfg.top_k < 0:
        raise ValueError("max_new_tokens and top_k must be >= 0, num_beams >= 1")
    if cfg.do_sample and cfg.temperature <= 0:
        raise ValueError("sampling needs temperature > 0 (use do_sample=False for greedy)")
    if cfg.do_sample and cfg.num_beams > 1:
        raise ValueError("beam search is greedy: do_sample with num_beams > 1 is not supported")
    if cfg.stop_strings and decode is None:
        raise ValueError("stop_strings need a `decode` callable (token ids -> text)")
    if cfg.compile and cfg.num_beams > 1:
        raise ValueError("compile is for greedy decoding and sampling; beam search runs eagerly")


def _check_prompts(prompts, prefix_embeds, memory=None, memory_mask=None) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    if prefix_embeds is not None:
        if len(prefix_embeds) != len(prompts):
            raise ValueError(f"{len(prefix_embeds)} prefix_embeds for {len(prompts)} prompts")
        for i, (p, e) in enumerate(zip(prompts, prefix_embeds)):
            if e.ndim != 2 or e.shape[0] != len(p):
                raise ValueError(f"prefix_embeds[{i}] is {tuple(e.shape)}, expected [{len(p)}, D]")
    if memory is not None and (len(memory) != len(prompts) or (memory_mask is not None and len(memory_mask) != len(prompts))):
        raise ValueError(f"{len(memory)} memories (and their masks) for {len(prompts)} prompts")


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


def _prefill(model, prompts, pad_id: int, prefix_embeds, extra: int, memory=None, memory_mask=None,
             compile: bool = False):
    """Left-pad, run the prompts through a fresh cache with room for `extra` more tokens (`compile`: on a
    CPU, as a compiled program, unless they read a cross-attention memory).
    -> (last logits [B, V], mask [B, T], last positions [B, 1], cache)."""
    pack_linears(model)  # on a CPU the decode steps then multiply by oneDNN-packed weights
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
    if compile and memory is None and device.type == "cpu":  # where it was measured (bench/RESULTS.md)
        hidden = compiled_prefill(model, x, mask, pos, cache)
    else:
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


class DecodeBatch:
    """Rows decoding together (see the module docstring).  Rows are named by the handles `add` returns
    (a fixed batch's are 0..B-1, its prompts' indices)."""

    def __init__(self, model, cfg: GenerationConfig, *, pad_id: int = 0, decode=None, fixed: bool = False):
        _check_config(cfg, decode)
        if cfg.num_beams > 1:
            raise ValueError("beam search keeps its own beams: a DecodeBatch decodes greedily or samples")
        self.model, self.cfg, self.pad_id, self.decode, self.fixed = model, cfg, pad_id, decode, fixed
        self.eos = _eos_ids(cfg)
        self.device = next(model.parameters()).device
        if cfg.compile and not fixed:
            raise ValueError("compile is for a fixed batch (a running batch's shapes change between steps)")
        self.generator = None
        if cfg.do_sample and cfg.seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.cache: KVCache | None = None
        self.mask = self.pos = self.logits = None  # [B, L], [B, 1], [B, V]: the next token's logits
        self.handles: list[int] = []  # the cache's rows, in order
        self._out: dict[int, list[int]] = {}  # a running row's kept tokens
        self._limit: dict[int, int] = {}  # a running row's max_new_tokens
        self._ended: set[int] = set()  # rows in the cache that no longer decode
        self._chosen: torch.Tensor | None = None  # tokens chosen and not yet fed
        self._static = None  # a fixed batch's static step: a CUDA graph or a compiled program
        self._next = 0

    @property
    def running(self) -> list[int]:
        """The rows still decoding, in cache order."""
        return [h for h in self.handles if h not in self._ended]

    @torch.no_grad()
    def add(self, prompts: list[list[int]], *, prefix_embeds: list[torch.Tensor] | None = None,
            max_new_tokens: int | list[int] | None = None, memory: list[torch.Tensor] | None = None,
            memory_mask: list[torch.Tensor] | None = None) -> list[int]:
        """Prefill prompts as new rows; -> their handles.  Arguments as `generate`'s; `max_new_tokens`
        (one, or one per prompt; default the config's) ends each row.  Between steps only."""
        _check_prompts(prompts, prefix_embeds, memory, memory_mask)
        limits = max_new_tokens if max_new_tokens is not None else self.cfg.max_new_tokens
        limits = [limits] * len(prompts) if isinstance(limits, int) else list(limits)
        if len(limits) != len(prompts) or min(limits) < 1:
            raise ValueError("each row needs a max_new_tokens of at least 1")
        if self._chosen is not None:
            raise RuntimeError("rows join between steps: advance() first")
        if self.fixed and self.handles:
            raise ValueError("a fixed batch takes all its rows in one add")
        if self.running and (memory is not None or self.cache.memory):
            raise ValueError("a batch with a cross-attention memory takes its rows in one add")
        # a fixed batch's cache has room for every step; a running batch's is rebuilt as rows come and go
        extra = max(limits) if self.fixed else 0
        if self.cfg.compile:  # cache lengths in buckets, so that similar prompts share a compiled step
            T = max(len(p) for p in prompts)
            extra = -(-(T + extra) // COMPILE_LENGTH_BUCKET) * COMPILE_LENGTH_BUCKET - T
        logits, mask, pos, cache = _prefill(self.model, prompts, self.pad_id, prefix_embeds, extra, memory,
                                            memory_mask, compile=self.cfg.compile)
        handles = list(range(self._next, self._next + len(prompts)))
        self._next += len(prompts)
        for h, n in zip(handles, limits):
            self._out[h], self._limit[h] = [], n
        if self.fixed:
            self.cache, self.mask, self.pos, self.logits, self.handles = cache, mask, pos, logits, handles
            if max(limits) > 1 and (self.cfg.compile or (self.cfg.cuda_graph and logits.is_cuda)):
                self._static = StaticDecoder(self.model, cache, mask, pos, compiled=self.cfg.compile,
                                             graph=self.cfg.cuda_graph and logits.is_cuda)
        else:
            self._rebuild((logits, mask, pos, cache, handles))
        return handles

    @torch.no_grad()
    def choose(self) -> tuple[list[tuple[int, int]], dict[int, str]]:
        """Pick each running row's next token; -> ([(row, token)] kept, {row: why it ended}), where why
        is "eos", "stop" (a stop string: its completing token is dropped) or "length" (max_new_tokens).
        The eos token and a stop string's completing token are never returned."""
        if self._chosen is not None:
            raise RuntimeError("choose() twice without advance()")
        events: list[tuple[int, int]] = []
        ended: dict[int, str] = {}
        if not self.running:  # nothing to choose; advance() then only drops what ended
            self._chosen = torch.zeros(len(self.handles), dtype=torch.long, device=self.device)
            return events, ended
        tokens = _pick(self.logits, self.cfg, self.generator)
        for h, tok in zip(self.handles, tokens.tolist()):
            if h in self._ended:
                continue
            out = self._out[h]
            if tok in self.eos:
                ended[h] = "eos"
                continue
            out.append(tok)
            if self.cfg.stop_strings and any(s in self.decode(out) for s in self.cfg.stop_strings):
                out.pop()  # documented cut: drop the token that completed the stop string
                ended[h] = "stop"
                continue
            events.append((h, tok))
            if len(out) >= self._limit[h]:
                ended[h] = "length"  # the last token needs no forward pass
        self._end(ended)
        self._chosen = tokens
        return events, ended

    @torch.no_grad()
    def advance(self) -> None:
        """Feed the chosen tokens of the rows still running: their next logits."""
        tokens, self._chosen = self._chosen, None
        if tokens is None:
            raise RuntimeError("advance() without choose()")
        if not self.fixed:
            tokens = tokens[[i for i, h in enumerate(self.handles) if h not in self._ended]]
            if self._ended:
                self._rebuild()
            if self.cache is None:
                return
            if self.cache.length == self.cache.max_len:
                self._rebuild()  # out of room: a wider cache
        elif not self.running:
            return
        elif self._ended:  # ended rows of a fixed batch step on pad tokens nobody reads (it stays rectangular)
            idle = torch.tensor([h in self._ended for h in self.handles], device=tokens.device)
            tokens = tokens.masked_fill(idle, self.pad_id)
        if self._static is not None:
            self.logits = self._static.step(tokens)
        else:
            self.logits, self.mask, self.pos = _step(self.model, tokens, self.mask, self.pos, self.cache)

    def step(self) -> tuple[list[tuple[int, int]], dict[int, str]]:
        """`choose`, then `advance`."""
        result = self.choose()
        self.advance()
        return result

    def remove(self, rows) -> None:
        """These rows leave (their tokens so far were already reported)."""
        self._end(h for h in rows if h in self._out)

    def close(self) -> None:
        if self._static is not None:
            self._static.close()
            self._static = None

    # -- the cache of a running batch ---------------------------------------------------------------
    def _end(self, rows) -> None:
        for h in rows:
            self._ended.add(h)
            self._out.pop(h, None)
            self._limit.pop(h, None)

    def _rebuild(self, new=None) -> None:
        """A fresh cache of the running rows, then the `new` ones (logits, mask, pos, cache, handles from
        `_prefill`), each right-aligned, no column that no row reads, room for the next steps."""
        keep = [i for i, h in enumerate(self.handles) if h not in self._ended]
        parts = []
        if keep:
            idx = torch.tensor(keep, device=self.device)
            parts.append((self.logits[idx], self.mask[idx], self.pos[idx], self.cache, idx,
                          [self.handles[i] for i in keep]))
        if new is not None:
            logits, mask, pos, cache, handles = new
            parts.append((logits, mask, pos, cache, None, handles))
        self._ended = set()
        if not parts:
            self.cache = self.mask = self.pos = self.logits = None
            self.handles = []
            return
        widths = [int(p[1].sum(1).max()) for p in parts]  # each part's longest row
        L = max(widths)
        room = max(1, min(self._limit[h] - len(self._out[h]) for p in parts for h in p[5]))
        B = sum(len(p[5]) for p in parts)
        cache = self.model.new_cache(B, L + room)
        mask = torch.zeros(B, L, dtype=parts[0][1].dtype, device=self.device)
        start = 0
        for (_, m, _, old, idx, handles), w in zip(parts, widths):
            rows, end = slice(start, start + len(handles)), old.length
            for layer in range(len(cache.k)):
                for dst, src in ((cache.k[layer], old.k[layer]), (cache.v[layer], old.v[layer])):
                    src = src[:, :, end - w:end]
                    dst[rows, :, L - w:L] = src if idx is None else src[idx]
            mask[rows, L - w:] = m[:, m.shape[1] - w:]
            start += len(handles)
        cache.length = L
        if parts[0][3].memory:  # cross-attention states: a batch that has them takes no other rows (add)
            idx = parts[0][4]
            cache.memory = {key: tuple(t.index_select(0, idx) for t in val) if isinstance(val, tuple)
                            else val.index_select(0, idx) for key, val in parts[0][3].memory.items()} \
                if idx is not None else dict(parts[0][3].memory)
        self.cache, self.mask = cache, mask
        self.pos = torch.cat([p[2] for p in parts])
        self.logits = torch.cat([p[0] for p in parts])
        self.handles = [h for p in parts for h in p[5]]
