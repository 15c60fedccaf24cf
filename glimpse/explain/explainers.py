"""Explainers of the models that are glimpse parts: the dual encoder (CLIP, SigLIP) and the
vision-language decoder (LLaVA, Frozen).  The fusion encoder's lives with its family
(glimpse/families/fusion/explain.py).  See glimpse.explain.core for what an explainer is."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glimpse.explain import relevance as rel
from glimpse.explain.core import Relevance
from glimpse.explain.towers import grads_of, patch_columns, text_relevance, vision_layers, vision_relevance
from glimpse.models.attention import record_attention
from glimpse.models.dual_encoder import DualEncoder
from glimpse.models.vlm import VisionLanguageModel


def _grid(vision) -> tuple[int, int]:
    side = vision.cfg.image_size // vision.cfg.patch_size
    return side, side


class DualEncoderExplainer:
    """The cosine similarity of one image and one text: which patches and which words it rests on."""

    def __init__(self, model: DualEncoder, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 tokens: list[str], text: str):
        self.model, self.pixels, self.ids, self.mask = model, pixels, input_ids, attention_mask
        self.tokens, self.grid_shape = tokens, _grid(model.vision)
        self.target = f"similarity to {text!r}"
        with torch.no_grad():
            self.text_embed = F.normalize(model.get_text_features(input_ids, attention_mask).float(), dim=-1)
            self.base_score = float(self.score(pixels)[0])

    def differentiable_score(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.get_image_features(pixels).float(), dim=-1) @ self.text_embed[0]

    @torch.no_grad()
    def score(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.differentiable_score(pixels)

    def attention(self, method: str) -> Relevance:
        m = self.model
        need_grads = method in rel.GRADIENT_METHODS
        with record_attention() as rec, torch.set_grad_enabled(need_grads):
            image = F.normalize(m.get_image_features(self.pixels).float(), dim=-1)
            text = F.normalize(m.get_text_features(self.ids, self.mask).float(), dim=-1)
            similarity = (image * text).sum()
        vmods = vision_layers(m.vision) + ([m.vision.head] if m.vision.head is not None else [])
        tmods = [b.attn for b in m.text.blocks]
        maps = rec.maps_of(vmods + tmods)
        grads = grads_of(similarity, maps) if need_grads else [None] * len(maps)
        nv = len(m.vision.blocks)
        head = (maps[nv], grads[nv]) if m.vision.head is not None else (None, None)
        grid = vision_relevance(m.vision, method, maps[:nv], grads[:nv] if need_grads else None, *head)
        words = text_relevance(m.text, method, maps[-len(tmods):], grads[-len(tmods):] if need_grads else None,
                               self.mask)
        return Relevance(grid[0].view(self.grid_shape), words[0, :len(self.tokens)].tolist())


class VisionLanguageExplainer:
    """A generated answer (its tokens' log-probability given the prompt is the score; the gradient methods
    explain each token's margin to the runner-up, `_answer_margin`) of a LLaVA-style model: each
    answer token's relevance is traced through the language model's attention to the image tokens, and
    (rollout, chefer) on through the vision tower to the patches (Chefer's rules, as lvlm-interpret
    applies them, without its hard-coded 576 image tokens)."""

    def __init__(self, model: VisionLanguageModel, pixels: torch.Tensor, prompt_ids: list[int], answer_ids: list[int],
                 answer_words: list[str], prompt_words: list[str], answer: str):
        if not answer_ids:
            raise ValueError("there is no answer to explain (the model answered with nothing)")
        self.model, self.pixels = model, pixels
        device = pixels.device
        self.ids = torch.tensor([prompt_ids + answer_ids], device=device)  # the answer, teacher-forced
        self.answer_ids = torch.tensor(answer_ids, device=device)
        self.positions = torch.arange(len(answer_ids), device=device) + len(prompt_ids) - 1  # the rows that predict them
        slots = (self.ids[0] == model.cfg.image_token_id).nonzero()[:, 0]
        if len(slots) != model.image_tokens:
            raise ValueError(f"explanations take one image per prompt, not {len(slots) // model.image_tokens}")
        self.slots, self.answer_words = slots, answer_words
        self.tokens = prompt_words  # the question's tokens (image tokens left out)
        self.text_rows = torch.tensor([i for i, t in enumerate(prompt_ids) if t != model.cfg.image_token_id],
                                      device=device)
        self.grid_shape = _grid(model.vision)
        self.answer, self.target = answer, f"answer {answer!r}"
        self.base_score = float(self.score(pixels)[0])

    def _answer_logprob(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, n answer tokens] log-probabilities of the answer's tokens."""
        lp = logits[:, self.positions].float().log_softmax(-1)
        return lp.gather(-1, self.answer_ids[None, :, None].expand(lp.shape[0], -1, 1))[..., 0]

    def _answer_margin(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, n answer tokens] each answer token's logit less the best other token's: what the gradient
        methods explain.  A confident answer's log-probability saturates near 0 and its gradients vanish
        (answers here are mostly right at log-probability above -0.01); the margin to the runner-up does not
        (Chefer's relevance pointed at the named object 0.67 of the time with it, 0.53 with the
        log-probability, on the same 60 scenes; docs/results.md)."""
        lg = logits[:, self.positions].float()
        index = self.answer_ids[None, :, None].expand(lg.shape[0], -1, 1)
        return lg.gather(-1, index)[..., 0] - lg.scatter(-1, index, float("-inf")).max(-1).values

    def differentiable_score(self, pixels: torch.Tensor) -> torch.Tensor:
        ids = self.ids.expand(len(pixels), -1)
        return self._answer_logprob(self.model(ids, pixel_values=pixels)).sum(-1)

    @torch.no_grad()
    def score(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.differentiable_score(pixels)

    def _to_patches(self, token_relevance: torch.Tensor, vit_R: torch.Tensor | None) -> torch.Tensor:
        """Image-token relevance [n_tokens] -> patch relevance [n_patches]; through the tower's relevance
        `vit_R` [N, N] (its token rows and columns), or straight onto the patches each token holds."""
        m, v = self.model, self.model.vision
        patches = v.n_patches
        if m.cfg.connector == "prefix":  # prefix tokens are not places: the tower's pooled row, scaled
            row = vit_R[0] if (vit_R is not None and v.class_token is not None) else None
            if row is None:
                return token_relevance.sum().expand(patches) / patches
            return token_relevance.sum() * row[patch_columns(v)]
        cls = int(v.class_token is not None)
        full = m.cfg.vision_feature_select == "full" and cls
        per_token = token_relevance[1:] if full else token_relevance  # the class token's share is not a place
        f = m.cfg.pixel_shuffle
        side = int(round(patches**0.5))
        g = side // f
        # token (i, j) of the g x g shuffled grid holds patches (i*f + a, j*f + b)
        grid = per_token.view(g, g, 1, 1).expand(g, g, f, f).permute(0, 2, 1, 3).reshape(patches) / (f * f)
        if vit_R is None:
            return grid
        rows = torch.zeros(vit_R.shape[0], device=grid.device, dtype=grid.dtype)
        rows[cls:] = grid
        if full:
            rows[0] = token_relevance[0]
        return (rows @ vit_R)[patch_columns(v)]

    def attention(self, method: str) -> Relevance:
        m = self.model
        need_grads = method in rel.GRADIENT_METHODS
        with record_attention() as rec, torch.set_grad_enabled(need_grads):
            logits = m(self.ids, pixel_values=self.pixels)
            target = self._answer_margin(logits)[0]  # [n answer tokens]
        lm_mods = [b.attn for b in m.lm.blocks]
        tower = m.cfg.connector != "prefix" or m.cfg.prefix_source != "pooled"
        vmods = vision_layers(m.vision, m.cfg.vision_feature_layer if tower else None)
        maps = rec.maps_of(lm_mods + vmods)
        n_lm = len(lm_mods)
        words, text = [], torch.zeros(len(self.text_rows), device=self.pixels.device)
        for j, word in enumerate(self.answer_words):
            grads = grads_of(target[j], maps, retain_graph=True) if need_grads else [None] * len(maps)
            R_lm = rel.self_relevance(method, maps[:n_lm], grads[:n_lm] if need_grads else None)[0]  # [L, L]
            row = R_lm[self.positions[j]]
            vit_R = None
            if method in ("rollout", "chefer"):  # on through the tower
                vit_R = rel.self_relevance(method, maps[n_lm:], grads[n_lm:] if need_grads else None)[0]
            words.append((word, self._to_patches(row[self.slots], vit_R).view(self.grid_shape)))
            if method == "chefer":  # the predicting position's own identity is not what it read
                row = row - (torch.arange(len(row), device=row.device) == self.positions[j]).float()
            text = text + row[self.text_rows]
        grid = torch.stack([g / g.max() if g.max() > 0 else g for _, g in words]).sum(0)
        return Relevance(grid, text.tolist(), words)
