"""Causal decoder language model: the Llama family (Llama, Qwen2, ...) and GPT-2.

Llama: RMSNorm pre-norm, rotary positions (rotate-half convention, as transformers), grouped-query
attention (separate q, k, v since they differ in size), optional q/k/v bias (Qwen2), SwiGLU MLP.
GPT-2: LayerNorm pre-norm, learned positions, fused qkv with bias, gelu_tanh MLP.

Parameter names map onto Hugging Face checkpoints one template at a time (`{i}` = layer):

    glimpse                     Llama / Qwen2                              GPT-2
    token_embed                 model.embed_tokens                         transformer.wte
    pos_embed                   -                                          transformer.wpe
    blocks.{i}.attn_norm        model.layers.{i}.input_layernorm           transformer.h.{i}.ln_1
    blocks.{i}.attn.q / k / v   model.layers.{i}.self_attn.q_proj / k_proj / v_proj
    blocks.{i}.attn.qkv         -                                          transformer.h.{i}.attn.c_attn *
    blocks.{i}.attn.o           model.layers.{i}.self_attn.o_proj          transformer.h.{i}.attn.c_proj *
    blocks.{i}.mlp_norm         model.layers.{i}.post_attention_layernorm  transformer.h.{i}.ln_2
    blocks.{i}.mlp.gate/up/down model.layers.{i}.mlp.gate_proj / up_proj / down_proj
    blocks.{i}.mlp.fc1 / fc2    -                                          transformer.h.{i}.mlp.c_fc/c_proj *
    final_norm                  model.norm                                 transformer.ln_f
    lm_head                     lm_head (= embed_tokens when tied)         lm_head (= wte)

  * GPT-2's Conv1D stores weights as [in, out]: transpose them into our nn.Linear [out, in].
    Suffixes (.weight, .bias) are the same on both sides.

Padding: `attention_mask` [B, T_total] (1 = real token) covers the cached prefix and the new
tokens.  For LEFT-padded batches pass `position_ids` from the mask (`positions_from_mask`),
otherwise every sequence's positions start at its padding, not at its first real token:

    pos = positions_from_mask(mask)                         # [B, T]
    cache = model.new_cache(B, T + n_new)
    logits = model(ids, mask, position_ids=pos, cache=cache)
    # each step: mask = cat([mask, ones(B, 1)], 1); pos = pos[:, -1:] + 1
    logits = model(next_ids, mask, position_ids=pos, cache=cache)

Padding positions attend only to themselves (they never see, and are never seen by, real
tokens), so no row of the attention is empty and nothing turns NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.models.attention import attend
from glimpse.models.cross_attention import CrossAttention
from glimpse.models.layers import ACTIVATIONS, MLP, RMSNorm

ACTS = {**ACTIVATIONS, "silu": F.silu}
# SDPA broadcasts kv heads over query-head groups itself from torch 2.5 on
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@dataclass
class DecoderConfig:
    arch: str = "llama"  # llama | gpt2
    vocab_size: int = 0
    width: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 0  # 0: = heads; fewer (dividing heads): grouped-query attention (llama only)
    # 0: llama: int(8/3 * width) rounded up to a multiple of 64 (Llama's SwiGLU sizing); gpt2: 4 * width
    mlp_hidden: int = 0
    context_length: int = 256  # max positions: gpt2's learned table; llama (RoPE) does not enforce it
    rope_theta: float = 10000.0
    qkv_bias: bool = False  # Qwen2 uses a bias on q, k, v only (gpt2 always has biases)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    act: str = ""  # "": the arch's own (llama: silu for SwiGLU; gpt2: gelu_tanh, HF's "gelu_new")
    # a cross-attention sub-layer in every block, between self-attention and the MLP, reading a memory
    # of this width (GPT-2's add_cross_attention; the encoder-decoder captioner)
    cross_attention: bool = False
    # every position attends to every other (a masked-token model such as MaskGIT's prior): the same
    # blocks, no causal mask, no KV cache
    bidirectional: bool = False

    def resolved(self) -> DecoderConfig:
        """A copy with the 0/"" defaults filled in, checked."""
        llama = self.arch == "llama"
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"decoder arch {self.arch!r} must be llama or gpt2")
        if self.vocab_size <= 0:
            raise ValueError("decoder vocab_size must be set (from the tokenizer)")
        swiglu_hidden = 64 * math.ceil(int(8 * self.width / 3) / 64)
        hidden = self.mlp_hidden or (swiglu_hidden if llama else 4 * self.width)
        cfg = replace(self, kv_heads=self.kv_heads or self.heads, mlp_hidden=hidden,
                      act=self.act or ("silu" if llama else "gelu_tanh"))
        if cfg.width % cfg.heads or cfg.heads % cfg.kv_heads:
            raise ValueError(f"width {cfg.width} / heads {cfg.heads} / kv_heads {cfg.kv_heads} do not divide")
        if llama and (cfg.width // cfg.heads) % 2:
            raise ValueError("RoPE needs an even head dimension")
        if not llama and cfg.kv_heads != cfg.heads:
            raise ValueError("gpt2 has no grouped-query attention (kv_heads must equal heads)")
        if cfg.act not in (ACTS if llama else ACTIVATIONS):
            raise ValueError(f"unknown activation {cfg.act!r} for {cfg.arch}")
        return cfg


class KVCache:
    """Preallocated keys and values per layer, `k[i]`, `v[i]`: [B, kv_heads, max_len, head_dim].

    The first `length` slots hold the processed tokens, the same number for every sequence in the
    batch (left padding keeps them aligned).  `crop` rewinds to an earlier length (chat turns,
    speculative decoding); `reorder` picks batch rows (beam search).  For inference: writes are
    in-place, not for backpropagation.
    """

    def __init__(self, layers: int, batch_size: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0
        # what cross-attention layers keep for the whole generation (the memory's keys and values per
        # layer, the memory mask of the newest token); batch-first tensors, reordered with the rest
        self.memory: dict = {}
        # A device tensor [1] while a static step decodes (a CUDA graph or a compiled program): the slot
        # one new token writes, so the write position is data, not a number baked into the step
        # (see infer/static_decode.py).
        self.slot: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k, v [B, kv, T, hd] after the cached ones; -> all of them [B, kv, length + T, hd].
        `length` itself moves on in `advance`, once every layer has written.  With `slot` set, the
        one new token goes to that slot and all `max_len` positions come back (a mask hides the rest)."""
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full ({self.length} + {k.shape[2]})")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
        self.memory = {}

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (a LongTensor [B'], repeats allowed), e.g. the surviving beams."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.memory = {key: tuple(t.index_select(0, index) for t in val) if isinstance(val, tuple)
                       else val.index_select(0, index) for key, val in self.memory.items()}


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] counting real tokens only (0 at each sequence's first real token);
    padding gets 0.  Slice the last T columns for a step that adds T tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def rope(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, 1, T, head_dim] for rotate-half RoPE, computed in fp32 (as transformers)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [B, H, T, hd]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention_mask_for(attention_mask: torch.Tensor | None, T: int, past: int, device: torch.device):
    """-> (bool mask [B|1, 1, T, past + T] with True = attend, or None; is_causal for SDPA)."""
    S = past + T
    if attention_mask is not None and attention_mask.shape[-1] != S:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {past} + {T}")
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and past == 0:
        return None, True if T > 1 else False  # SDPA's fast causal path (a plain bool, not a SymBool, in a compiled prefill)
    if not padded and T == 1:
        return None, False  # one new token sees the whole prefix
    q_pos = torch.arange(past, S, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(S, device=device)[None, :]  # [1, S]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
    if padded:
        real = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
        mask = mask & (real | (k_pos == q_pos))  # padding queries see themselves: no empty row, no NaN
    return mask, False


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.act = ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class DecoderAttention(nn.Module):
    """Causal self-attention with a KV cache; separate q, k, v (llama, GQA) or fused qkv (gpt2)."""

    def __init__(self, cfg: DecoderConfig, index: int):
        super().__init__()
        self.index, self.heads, self.kv_heads = index, cfg.heads, cfg.kv_heads
        self.head_dim = hd = cfg.width // cfg.heads
        D = cfg.width
        self.fused = cfg.arch == "gpt2"
        if self.fused:
            self.qkv = nn.Linear(D, 3 * D)
        else:
            self.q = nn.Linear(D, cfg.heads * hd, bias=cfg.qkv_bias)
            self.k = nn.Linear(D, cfg.kv_heads * hd, bias=cfg.qkv_bias)
            self.v = nn.Linear(D, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(D, D, bias=cfg.arch == "gpt2")

    def forward(self, x, rope_cs, mask, causal: bool, cache: KVCache | None) -> torch.Tensor:
        B, T, D = x.shape  # [B, T, D]
        H, KV, hd = self.heads, self.kv_heads, self.head_dim
        if self.fused:
            q, k, v = self.qkv(x).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, hd]
        else:
            q = self.q(x).view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
            k = self.k(x).view(B, T, KV, hd).transpose(1, 2)  # [B, KV, T, hd]
            v = self.v(x).view(B, T, KV, hd).transpose(1, 2)
        if rope_cs is not None:
            q, k = apply_rope(q, *rope_cs), apply_rope(k, *rope_cs)
        if cache is not None:
            k, v = cache.update(self.index, k, v)  # [B, KV, past + T, hd]
        if KV != H and not _SDPA_GQA:  # query head h reads kv head h // (H / KV), as transformers' repeat_kv
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        y = attend(self, q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=KV != H and _SDPA_GQA)
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig, index: int):
        super().__init__()
        llama = cfg.arch == "llama"
        Norm = RMSNorm if llama else nn.LayerNorm
        self.attn_norm = Norm(cfg.width, eps=cfg.norm_eps)
        self.attn = DecoderAttention(cfg, index)
        self.cross_norm = self.cross = None
        if cfg.cross_attention:
            self.cross_norm = Norm(cfg.width, eps=cfg.norm_eps)
            self.cross = CrossAttention(cfg.width, cfg.heads, bias=not llama)
        self.mlp_norm = Norm(cfg.width, eps=cfg.norm_eps)
        self.mlp = (SwiGLU if llama else MLP)(cfg.width, cfg.mlp_hidden, cfg.act)

    def forward(self, x, rope_cs, mask, causal: bool, cache: KVCache | None, memory=None,
                memory_mask=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope_cs, mask, causal, cache)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), memory, memory_mask, cache, ("cross", self.attn.index))
        return x + self.mlp(self.mlp_norm(x))


class CausalLM(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg = cfg.resolved()
        D = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Embedding(cfg.context_length, D) if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.layers))
        self.final_norm = (RMSNorm if cfg.arch == "llama" else nn.LayerNorm)(D, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_embed.weight

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 / Llama: normal(0, std) weights, zero biases, unit norms; the projections that end
        each residual branch (attn.o, mlp.down / mlp.fc2) get std / sqrt(2 * layers)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        for b in self.blocks:
            out = b.mlp.down if isinstance(b.mlp, SwiGLU) else b.mlp.fc2
            ends = (b.attn.o.weight, out.weight) + (() if b.cross is None else (b.cross.out.weight,))
            for w in ends:
                nn.init.normal_(w, std=std / math.sqrt(2 * self.cfg.layers))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, D] (no positions), to splice other features into `inputs_embeds`."""
        return self.token_embed(input_ids)

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        p = self.token_embed.weight
        cfg = self.cfg
        return KVCache(cfg.layers, batch_size, cfg.kv_heads, max_len, cfg.width // cfg.heads,
                       dtype or p.dtype, device or p.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, past + T], 1 = real token
        *,
        inputs_embeds: torch.Tensor | None = None,  # [B, T, D], instead of input_ids
        position_ids: torch.Tensor | None = None,  # [B, T]; default past .. past + T - 1
        cache: KVCache | None = None,  # read, extended by T, and advanced
        return_hidden: bool = False,  # the final-normed hidden states [B, T, D] instead of logits
        memory: torch.Tensor | None = None,  # [B, S, D] what cross-attention reads (image states)
        memory_mask: torch.Tensor | None = None,  # bool [B, 1, T, S], True = the token reads the slot
        layer_hook=None,  # (i, x, memory, memory_mask, cache) -> x before block i (Flamingo's gated blocks)
    ) -> torch.Tensor:
        """Logits [B, T, V].  Left-padded batches need `position_ids` (see the module docstring).
        `return_hidden` leaves `lm_head` to the caller, who can apply it only where logits are
        needed (the supervised positions of a loss, the last position of a prompt).

        With a cache, cross-attention keeps the memory's keys and values from the first call, and
        the memory mask of the last token: later calls (one new token each) pass neither."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        B, T, _ = x.shape
        past = 0 if cache is None else cache.length
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} sequences, the input {B}")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        if attention_mask is not None and attention_mask.ndim == 4:  # a ready bool mask [B, 1, T, S]
            mask, causal = attention_mask, False
        elif self.cfg.bidirectional:
            if cache is not None:
                raise ValueError("a bidirectional decoder has no KV cache")
            mask, causal = None if attention_mask is None else attention_mask.bool()[:, None, None, :], False
        else:
            mask, causal = attention_mask_for(attention_mask, T, past, x.device)
        rope_cs = None
        if self.pos_embed is not None:
            # a static cache's step (cache.slot) is checked by its StaticDecoder: `past` is a constant
            # there, and a check on it would specialise a compiled step to each prompt length
            if (cache is None or cache.slot is None) and past + T > self.cfg.context_length:
                raise ValueError(f"{past + T} positions exceed the context length {self.cfg.context_length}")
            x = x + self.pos_embed(position_ids)
        else:
            rope_cs = rope(position_ids, self.cfg.width // self.cfg.heads, self.cfg.rope_theta, x.dtype)
        memory_mask = _memory_mask(memory_mask, cache, T)
        for i, block in enumerate(self.blocks):
            if layer_hook is not None:
                x = layer_hook(i, x, memory, memory_mask, cache)
            x = block(x, rope_cs, mask, causal, cache, memory, memory_mask)
        if cache is not None and cache.slot is None:
            cache.advance(T)
        x = self.final_norm(x)
        return x if return_hidden else self.lm_head(x)  # [B, T, V]


def _memory_mask(memory_mask: torch.Tensor | None, cache: KVCache | None, T: int) -> torch.Tensor | None:
    """The memory mask of this call: the given one (kept in the cache for the tokens that follow:
    they read what the prompt's last token read), or the cache's for new tokens."""
    if cache is None:
        return memory_mask
    if memory_mask is not None:
        cache.memory["mask"] = memory_mask[:, :, -1:]
        return memory_mask
    last = cache.memory.get("mask")
    return None if last is None else last.expand(-1, -1, T, -1)
