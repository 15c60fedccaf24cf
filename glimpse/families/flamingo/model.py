"""Flamingo: a frozen vision tower and a frozen causal LM, joined by a Perceiver resampler and gated
cross-attention blocks inserted before some LM layers (OpenFlamingo, IDEFICS v1).

    pixels [B, N, 3, H, W] -> vision tower -> tokens [B, N, T, Dv] -> resampler -> media [B, N, L, Dv]
    memory = media flattened to [B, N * L, Dv]; each text token reads only the L slots of the
    latest <image> before it (none before the first image, none for a padded image slot)

The text keeps one `<image>` token per image (it is not replaced by features: it marks where each
image begins).  The memory has the vision width: the blocks' `attn.kv` reads it directly.

Where the blocks go: before LM layer i when `i % xattn_every == xattn_offset`; OpenFlamingo puts
them where (i + 1) % n == 0 (offset n - 1), IDEFICS where i % n == 0 (offset 0).  `xattn` is keyed
by that LM layer.

Which vision tokens: OpenFlamingo reads open_clip's patch tokens (no class token;
`vision_feature_select` "patch"), with `ln_post` applied in the open_clip versions that apply it
to the tokens (`vision_feature_norm`); IDEFICS reads every token of the last layer, class token
included, without the post-norm ("full", no norm).

Generation (glimpse.infer.generate): the model has `embed`, `lm_head`, `new_cache` and takes the
engine's calls, `model(inputs_embeds=, attention_mask, position_ids, cache, return_hidden, memory=,
memory_mask=)` at the prefill and `model(tokens, mask, position_ids=, cache=)` per step;
`generation_memory` turns prompts and their images into the engine's per-prompt `memory` and
`memory_mask`.  The blocks' keys and values are computed once, into the cache, and generated tokens
read the image the prompt's last token reads (OpenFlamingo's cached media, IDEFICS' last mask row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from glimpse.models.cross_attention import latest_image_mask, media_index_of
from glimpse.models.decoder import CausalLM, DecoderConfig, KVCache
from glimpse.models.gated_xattn import GATES, STYLES, GatedCrossAttentionBlock
from glimpse.models.perceiver import PerceiverResampler
from glimpse.models.vision import VisionConfig, VisionTransformer


@dataclass
class FlamingoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: DecoderConfig = field(default_factory=DecoderConfig)
    style: str = "openflamingo"  # openflamingo | idefics: the resampler's and the blocks' layout
    # which vision tokens the resampler reads (see the module docstring)
    vision_feature_layer: int = -1  # counted from the end, as VLMConfig's; the post-norm is not applied
    vision_feature_select: str = "patch"  # patch (no class token: OpenFlamingo) | full (IDEFICS)
    vision_feature_norm: bool = False  # apply the tower's post-norm (open_clip's ln_post on the tokens)
    use_resampler: bool = True  # False (IDEFICS' use_resampler): the blocks read the vision tokens
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_head_dim: int = 64
    resampler_latents: int = 64
    resampler_ff_mult: int = 4
    resampler_qk_norm: bool = False  # IDEFICS' qk_layer_norms_perceiver
    xattn_every: int = 1  # a gated block every n LM layers (OpenFlamingo 1, 2 or 4; IDEFICS' interval)
    xattn_offset: int = -1  # before layer i when i % n == offset; -1: the style's (OF n - 1, IDEFICS 0)
    xattn_heads: int = 0  # 0: the LM's (OpenFlamingo's released models use 8 heads of 64)
    xattn_head_dim: int = 0  # 0: LM width // xattn heads
    xattn_ff_hidden: int = 0  # 0: openflamingo 4 x LM width, idefics the LM's mlp_hidden
    gate: str = "float"  # float (one tanh gate per block and branch) | vector (one per channel)
    qk_norm: bool = False  # IDEFICS' qk_layer_norms: RMSNorm over each head's queries and keys
    image_token_id: int = -1  # the tokenizer's <image>; set from the tokenizer when the model is built
    # tokens added after the LM's vocabulary (<|endofchunk|>): rows of their own in the embedding and the
    # head (tied), which learn while the LM stays frozen (OpenFlamingo's new tokens, IDEFICS' decoupled
    # embeddings)
    extra_tokens: int = 0
    # the interleaved training data (glimpse.families.flamingo.data) and the binding evaluation
    max_images: int = 4  # images in a caption sequence
    max_shots: int = 8  # solved examples before a binding episode's query (k drawn from 0 .. max_shots)
    episode_colours: int = 3  # colours (and made-up words) in a binding episode
    episode_share: float = 0.5  # the share of training sequences that are binding episodes
    # the chance that a training episode's example is shown in text ("red dakim", the form the LM learned
    # in context) instead of an image: the query's word is then found by the LM's induction heads only if
    # the blocks write the query image's colour as the LM represents the colour's word
    episode_text_share: float = 0.0
    end_of_chunk_token_id: int = -1  # <|endofchunk|>: ends each interleaved example, stops generation
    # keys of earlier versions, at the defaults runs saved then hold (episode distillation: sessions 14-16,
    # off by default, removed after it never helped; docs/results.md)
    RETIRED: ClassVar[dict] = {"episode_distill": 0.0, "episode_distill_layer": 1}


def xattn_layers(cfg: FlamingoConfig) -> list[int]:
    """The LM layers with a gated block before them."""
    n = cfg.xattn_every
    offset = cfg.xattn_offset if cfg.xattn_offset >= 0 else (n - 1 if cfg.style == "openflamingo" else 0)
    if n < 1 or offset >= n:
        raise ValueError(f"xattn_every {n} / xattn_offset {cfg.xattn_offset}: need every >= 1 and "
                         "offset < every")
    return [i for i in range(cfg.lm.layers) if i % n == offset]


class FlamingoModel(nn.Module):
    def __init__(self, cfg: FlamingoConfig):
        super().__init__()
        if cfg.image_token_id < 0:
            raise ValueError("image_token_id must be set (the tokenizer's <image> id)")
        if cfg.style not in STYLES:
            raise ValueError(f"style {cfg.style!r} must be one of {', '.join(STYLES)}")
        if cfg.gate not in GATES:
            raise ValueError(f"gate {cfg.gate!r} must be one of {', '.join(GATES)}")
        if cfg.vision_feature_select not in ("patch", "full"):
            raise ValueError(f"vision_feature_select {cfg.vision_feature_select!r} must be patch or full")
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        dv = cfg.vision.width
        self.resampler = None
        if cfg.use_resampler:
            self.resampler = PerceiverResampler(dv, cfg.resampler_depth, cfg.resampler_heads,
                                                cfg.resampler_head_dim, cfg.resampler_latents,
                                                cfg.resampler_ff_mult, cfg.style, cfg.resampler_qk_norm)
        self.lm = CausalLM(cfg.lm)
        lm = self.lm.cfg
        heads = cfg.xattn_heads or lm.heads
        head_dim = cfg.xattn_head_dim or lm.width // heads
        ff = cfg.xattn_ff_hidden or (lm.mlp_hidden if cfg.style == "idefics" else 4 * lm.width)
        self.xattn = nn.ModuleDict({
            str(i): GatedCrossAttentionBlock(lm.width, dv, heads, head_dim, ff, cfg.style, cfg.gate,
                                             cfg.qk_norm, lm.norm_eps, lm.act)
            for i in xattn_layers(cfg)})
        self.extra_embed = nn.Parameter(torch.randn(cfg.extra_tokens, lm.width) * 0.02) if cfg.extra_tokens else None
        self._head = _ExtendedHead(self.lm.lm_head, self.extra_embed) if cfg.extra_tokens else None
        self._init_blocks()

    def _init_blocks(self, std: float = 0.02) -> None:
        """New parts start small (normal(0, std) projections, unit norms); the gates stay at 0, so
        the untrained model is its LM."""
        for m in [*self.xattn.modules(), *(self.resampler.modules() if self.resampler is not None else ())]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.resampler is not None:
            nn.init.normal_(self.resampler.latents, std=1.0)

    # ---- images -> memory ------------------------------------------------------------------------

    @property
    def tokens_per_image(self) -> int:
        """Memory slots per image: the resampler's latents, or the vision tokens it would read."""
        if self.resampler is not None:
            return self.resampler.n_latents
        v = self.cfg.vision
        cls = self.cfg.vision_feature_select == "full" and v.class_token
        return (v.image_size // v.patch_size) ** 2 + int(cls)

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[..., 3, H, W] -> the vision tokens the resampler reads [..., T, Dv] (a frozen tower's are
        cacheable)."""
        lead = pixel_values.shape[:-3]
        x = self.vision.forward_features(pixel_values.reshape(-1, *pixel_values.shape[-3:]),
                                         layer=self.cfg.vision_feature_layer)
        if self.cfg.vision_feature_norm:
            x = self.vision.post_norm(x)
        if self.cfg.vision_feature_select == "patch" and self.vision.class_token is not None:
            x = x[:, 1:]
        return x.reshape(*lead, *x.shape[1:])

    def get_media(self, pixel_values: torch.Tensor | None = None,
                  image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, N, 3, H, W] (or their `tower_features` [B, N, T, Dv]) -> media [B, N, L, Dv]."""
        feats = self.tower_features(pixel_values) if image_features is None else image_features
        return feats if self.resampler is None else self.resampler(feats)

    def memory_mask(self, input_ids: torch.Tensor, images: int, image_valid: torch.Tensor | None = None):
        """bool [B, 1, T, images * tokens_per_image]: each token reads the slots of the latest
        `<image>` before (or at) it; none before the first image or for a padded image."""
        counts = (input_ids == self.cfg.image_token_id).sum(-1)
        if bool((counts > images).any()):
            raise ValueError(f"a row holds {int(counts.max())} <image> tokens but only {images} images "
                             "were given")
        index = media_index_of(input_ids, self.cfg.image_token_id, image_valid)
        return latest_image_mask(index, images, self.tokens_per_image)

    # ---- the engine's surface (glimpse.infer.generate) ---------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.extra_embed is None:
            return self.lm.embed(input_ids)
        V = self.lm.cfg.vocab_size
        base = self.lm.embed(input_ids.clamp_max(V - 1))
        extra = self.extra_embed[(input_ids - V).clamp(0, self.extra_embed.shape[0] - 1)].to(base.dtype)
        return torch.where((input_ids >= V)[..., None], extra, base)

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.lm_head if self._head is None else self._head

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        return self.lm.new_cache(batch_size, max_len, dtype, device)

    def generation_memory(self, prompts: list, images: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What `generate(model, prompts, cfg, memory=, memory_mask=)` takes: per prompt (token ids,
        a list or [T_i] tensor) and its images ([N_i, 3, H, W] in reading order, or None) the memory
        [N_i * L, Dv] and the mask [T_i, N_i * L]."""
        memory, masks = [], []
        p = next(self.parameters())
        for ids, px in zip(prompts, images):
            ids = torch.as_tensor(ids, device=p.device)[None]
            n = 0 if px is None else px.shape[0]
            if n:
                mem = self.get_media(px[None].to(p.device)).flatten(1, 2)[0]
            else:
                mem = torch.zeros(0, self.cfg.vision.width, dtype=p.dtype, device=p.device)
            memory.append(mem)
            masks.append(self.memory_mask(ids, n)[0, 0])
        return memory, masks

    # ---- forward ------------------------------------------------------------------------------------

    def _hook(self, i: int, x: torch.Tensor, memory, memory_mask, cache) -> torch.Tensor:
        block = self.xattn[str(i)] if str(i) in self.xattn else None
        return x if block is None else block(x, memory, memory_mask, cache, ("xattn", i))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, *, image_features: torch.Tensor | None = None,
                image_valid: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False,
                inputs_embeds: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (or the final hidden states, see CausalLM).

        pixel_values [B, N, 3, H, W] (or `image_features`, their tower_features [B, N, T, Dv]): each
        row's images in reading order, N the most any row has; `image_valid` [B, N] False marks the
        padding slots of rows with fewer.  The memory mask comes from `input_ids`' <image> tokens.
        Or, as the generation engine calls it, `memory` [B, S, Dv] and `memory_mask` [B, 1, T, S]
        ready-made; or neither, on steps after a cached prefill (the cache holds both)."""
        if pixel_values is not None or image_features is not None:
            if memory is not None:
                raise ValueError("pass images or a ready memory, not both")
            media = self.get_media(pixel_values, image_features)  # [B, N, L, Dv]
            memory = media.flatten(1, 2)
            if memory_mask is None:
                if input_ids is None:
                    raise ValueError("with inputs_embeds, pass the memory_mask too (no <image> ids to read)")
                memory_mask = self.memory_mask(input_ids, media.shape[1], image_valid)
        elif input_ids is not None and memory is None and cache is None:
            # text without images: refuse <image> tokens that have none (not on cached steps: no host
            # sync there, which a CUDA-graph step could not take)
            self.memory_mask(input_ids, 0)
        if self._head is None:
            return self.lm(input_ids, attention_mask, inputs_embeds=inputs_embeds, position_ids=position_ids,
                           cache=cache, return_hidden=return_hidden, memory=memory, memory_mask=memory_mask,
                           layer_hook=self._hook)
        if inputs_embeds is None:  # the extra tokens' rows are this model's, not the LM's
            inputs_embeds = self.embed(input_ids)
        hidden = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, return_hidden=True, memory=memory, memory_mask=memory_mask,
                         layer_hook=self._hook)
        return hidden if return_hidden else self._head(hidden)


class _ExtendedHead(nn.Module):
    """The LM's head with the extra tokens' rows (tied to their embeddings) after its vocabulary."""

    def __init__(self, head: nn.Linear, extra: nn.Parameter):
        super().__init__()
        self.head, self.extra = [head], [extra]  # lists: not submodules, so no second copy in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.head[0](x), x @ self.extra[0].to(x.dtype).t()], -1)
