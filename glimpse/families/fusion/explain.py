"""Explaining a fusion encoder's decisions: the image-text match (ITM's log P(match)) and the answer
(log-probability of the answer class), through the image tower, the text tower and the fusion layers'
self- and cross-attention (see glimpse.explain for what an explainer is).

- raw: the last fusion layer's cross-attention from the [CLS] text state to the image tokens.
- gradcam: LAVIS's `compute_gradcam` for BLIP's ITM: that cross-attention map times its positive
  gradient, averaged over heads, then over the text's tokens.
- chefer: Chefer et al.'s bi-modal rules: relevance through the image tower (R_ii), the text tower and each
  fusion layer's self-attention (R_tt, R_ti, rules 6-7), and each cross-attention (R_ti += R̄_ttᵀ Ā R̄_ii,
  rule 10); the [CLS] row of R_ti over the image patches.
- rollout: the same rules with head-averaged attention in place of the gradient-weighted Ā (rollout's
  gradient-free view carried across the modalities).
"""

from __future__ import annotations

import torch

from glimpse.errors import GlimpseError
from glimpse.explain import relevance as rel
from glimpse.explain.core import Relevance
from glimpse.explain.towers import grads_of, patch_columns
from glimpse.models.attention import record_attention


class FusionExplainer:
    def __init__(self, model, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 tokens: list[str], text: str, answer: str | None = None):
        self.model, self.pixels, self.ids, self.mask, self.tokens = model, pixels, input_ids, attention_mask, tokens
        side = model.cfg.vision.image_size // model.cfg.vision.patch_size
        self.grid_shape = (side, side)
        self.vqa = hasattr(model, "vqa_head")
        with torch.no_grad():
            self.text_states = model.text.forward_features(input_ids, attention_mask)
            if self.vqa:
                answers = model.cfg.answers
                if answer is None:
                    answer = answers[int(self._logits(pixels)[0].argmax())]
                elif answer not in answers:
                    raise GlimpseError(f"{answer!r} is not one of this model's {len(answers)} answers")
                self.answer_index = answers.index(answer)
            self.answer = answer
            self.target = f"answer {answer!r}" if self.vqa else f"match with {text!r}"
            self.base_score = float(self.score(pixels)[0])

    def _logits(self, pixels: torch.Tensor, text_states: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        B = len(pixels)
        patches, pooled = m.encode_image(m.vision, pixels)
        text = (self.text_states if text_states is None else text_states).expand(B, -1, -1)
        fused = m.fuse(text, self.mask.expand(B, -1), patches, pooled)[:, 0]
        return (m.vqa_head if self.vqa else m.itm_head)(fused).float()

    def _target(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.log_softmax(-1)[:, self.answer_index if self.vqa else 1]

    def differentiable_score(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._target(self._logits(pixels))

    @torch.no_grad()
    def score(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.differentiable_score(pixels)

    def attention(self, method: str) -> Relevance:
        m = self.model
        if m.cfg.fusion != "cross_attention":
            raise GlimpseError(f"attention explanations of a fusion model need fusion: cross_attention (this one "
                               f"fuses by {m.cfg.fusion}); --method occlusion explains any model")
        need_grads = method in rel.GRADIENT_METHODS
        with record_attention() as rec, torch.set_grad_enabled(need_grads):
            text = m.text.forward_features(self.ids, self.mask)
            target = self._target(self._logits(self.pixels, text))[0]
        vmods = [b.attn for b in m.vision.blocks]
        tmods = [b.attn for b in m.text.blocks]
        blocks = m.fusion.blocks
        mods = vmods + tmods + [b.attn for b in blocks] + [b.cross for b in blocks]
        maps = rec.maps_of(mods)
        grads = grads_of(target, maps) if need_grads else [None] * len(maps)
        nv, nt, nf = len(vmods), len(tmods), len(blocks)
        self_maps, cross_maps = maps[nv + nt:nv + nt + nf], maps[nv + nt + nf:]
        self_grads, cross_grads = grads[nv + nt:nv + nt + nf], grads[nv + nt + nf:]
        cols = patch_columns(m.vision)
        real = self.mask[0].bool()
        if method == "raw":
            return Relevance(cross_maps[-1].mean(1)[0, 0, cols].view(self.grid_shape), [])
        if method == "gradcam":
            cam = rel.weighted_heads(cross_maps[-1], cross_grads[-1])[0]  # [T, N]
            return Relevance(cam[real].mean(0)[cols].view(self.grid_shape), [])
        # chefer, or rollout as the same rules without gradients
        if method == "rollout":
            grads = [torch.ones_like(a) for a in maps]  # weighted_heads(A, 1) = mean_h A
            self_grads, cross_grads = grads[nv + nt:nv + nt + nf], grads[nv + nt + nf:]
        R_ii = rel.chefer_self(maps[:nv], grads[:nv])[0]
        R_tt = rel.chefer_self(maps[nv:nv + nt], grads[nv:nv + nt])[0]
        R_ti = R_tt.new_zeros(1, R_tt.shape[-1], R_ii.shape[-1])
        for a, g, c, cg in zip(self_maps, self_grads, cross_maps, cross_grads):
            R_tt, R_ti = rel.chefer_self([a], [g], R_tt, R_ti)
            R_ti = rel.chefer_cross(R_tt, R_ti, R_ii, c, cg)
        row = R_tt[0, 0].clone()
        row[0] = 0  # the [CLS] token's own identity is not what it read (Chefer's generate_ours)
        tokens = (row * real).tolist()
        return Relevance(R_ti[0, 0, cols].view(self.grid_shape), tokens)
