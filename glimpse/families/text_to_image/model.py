"""Text-to-image in the DALL-E style: a prior over an image tokenizer's codes, reading a frozen CLIP.

    clip     a dual encoder (glimpse/models/dual_encoder.py), frozen: its text tower's per-token
             states (and pooled embedding) are what the prior reads; its image tower re-ranks and judges
    vq       the image tokenizer (glimpse/models/vq.py), frozen: codes in, images out
    prior    a GPT-2-style transformer with cross-attention to the text in every block, either
             `maskgit`: bidirectional, predicts masked codes, samples by iterative unmasking (MaskGIT, Muse);
             `autoregressive`: causal, one code after another with a KV cache (DALL-E, Parti) -- the baseline
             of the same size.  Its vocabulary is the K codes and one more: the mask (maskgit) or the start (AR).
             It reads and writes an image's codes flat, `vq.tokens_per_image` of them: row by row, and with
             codebook groups (product quantisation) a position's G codes side by side, group g's ids offset
             by g * K (`prior_ids`), each place's logits confined to its group's codes.

The text memory the prior reads is [null, pooled, token states...]: the learned null slot is always
readable, so a row whose text is dropped (classifier-free guidance's unconditional branch, trained by
dropping the text `cond_drop` of the time) reads only it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from glimpse.models.decoder import CausalLM, DecoderConfig
from glimpse.models.dual_encoder import DualEncoder, DualEncoderConfig
from glimpse.models.vq import VQConfig, VQModel

PRIORS = ("maskgit", "autoregressive")
PHRASE_MODES = ("conjunction", "leave_one_out")  # composed guidance (sampling.py)


def _prior_default() -> DecoderConfig:
    return DecoderConfig(arch="gpt2", width=128, layers=4, heads=4, context_length=65, cross_attention=True)


@dataclass
class TextToImageConfig:
    clip: DualEncoderConfig = field(default_factory=DualEncoderConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    prior: DecoderConfig = field(default_factory=_prior_default)
    kind: str = "maskgit"  # maskgit | autoregressive
    cond_drop: float = 0.1  # the share of training rows whose text is dropped (classifier-free guidance)
    caption_drop: float = 0.0  # the share of captions replaced by a partial description of the scene (data.py)
    # sampling defaults (glimpse generate, the pipeline, evaluation)
    steps: int = 12  # maskgit's unmasking steps
    guidance: float = 3.0  # classifier-free guidance scale (1: none)
    phrase_guidance: float = 0.0  # composed guidance: the weight of each object phrase's own term (0: off)
    # conjunction: w (c_i - u), phrase i alone (Composable Diffusion); leave_one_out: w (c - c_-i), the
    # prompt against itself without phrase i
    phrase_mode: str = "conjunction"
    temperature: float = 1.0
    choice_temperature: float = 4.5  # maskgit: noise on which codes stay masked, annealed to 0 (MaskGIT's 4.5)
    candidates: int = 1  # images generated per prompt, of which CLIP keeps the best (best-of-N re-ranking)
    rerank: int = 8  # evaluation: the best of this many per prompt is scored too
    rerank_prompts: int = 300  # evaluation: the re-ranked figures over the first this many prompts (0: all)

    @property
    def codes(self) -> int:
        """The prior's code vocabulary: every codebook's K codes, group g's ids offset by g * K (with codebook
        groups, a code of one codebook and the same id in another are different symbols)."""
        return self.vq.num_vq_embeddings * self.vq.codebook_groups

    @property
    def special_id(self) -> int:
        """The mask (maskgit) or start (autoregressive) token: the id after the codes."""
        return self.codes


class TextToImage(nn.Module):
    def __init__(self, cfg: TextToImageConfig):
        super().__init__()
        if cfg.kind not in PRIORS:
            raise ValueError(f"prior kind {cfg.kind!r} must be one of {', '.join(PRIORS)}")
        if cfg.phrase_mode not in PHRASE_MODES:
            raise ValueError(f"phrase_mode {cfg.phrase_mode!r} must be one of {', '.join(PHRASE_MODES)}")
        self.cfg = cfg
        self.clip = DualEncoder(cfg.clip)
        self.vq = VQModel(cfg.vq)
        self.prior = CausalLM(cfg.prior)
        D = self.prior.cfg.width
        self.text_proj = nn.Linear(cfg.clip.text.width, D)
        self.pooled_proj = nn.Linear(cfg.clip.embed_dim, D)
        self.null_memory = nn.Parameter(torch.randn(1, 1, D) * 0.02)

    def text_memory(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory [B, 2 + T, D], memory_mask bool [B, 1, 1, 2 + T]) of tokenised prompts; rows where
        `keep` is False read only the null slot (the unconditional branch)."""
        clip = self.clip
        with torch.set_grad_enabled(torch.is_grad_enabled() and clip.text.token_embed.weight.requires_grad):
            states = clip.text.forward_features(input_ids, attention_mask)
            pooled = clip.text_projection(clip.text.pool(states, input_ids, attention_mask))
        B = input_ids.shape[0]
        memory = torch.cat([self.null_memory.expand(B, -1, -1), self.pooled_proj(pooled)[:, None],
                            self.text_proj(states)], dim=1)
        text = torch.cat([attention_mask.new_ones(B, 1), attention_mask], dim=1).bool()
        if keep is not None:
            text = text & keep[:, None].bool()
        mask = torch.cat([text.new_ones(B, 1), text], dim=1)
        return memory, mask[:, None, None, :]

    def forward(self, inputs: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """Logits over the codes [B, T, K] at every position of `inputs` [B, T] (the code at place t's)."""
        return self.code_logits(self.prior(inputs, memory=memory, memory_mask=memory_mask)[..., : self.cfg.codes])

    def code_logits(self, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits [B, T, codes] for places start .. start + T - 1, each confined to its own group's codes
        (a large negative number elsewhere, not -inf, so that guidance's differences stay finite)."""
        G, K = self.cfg.vq.codebook_groups, self.cfg.vq.num_vq_embeddings
        if G == 1:
            return logits
        places = torch.arange(start, start + logits.shape[-2], device=logits.device)
        other = (torch.arange(G * K, device=logits.device) // K)[None, :] != (places % G)[:, None]
        return logits.masked_fill(other, -1e9)

    def prior_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """The tokenizer's flat codes [B, N] (ids 0..K-1 in every group) as the prior's (offset by group)."""
        return codes + self._offsets(codes)

    def vq_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """The prior's codes [B, N] as the tokenizer's."""
        return codes - self._offsets(codes)

    def _offsets(self, codes: torch.Tensor) -> torch.Tensor:
        G, K = self.cfg.vq.codebook_groups, self.cfg.vq.num_vq_embeddings
        return torch.arange(codes.shape[-1], device=codes.device) % G * K
