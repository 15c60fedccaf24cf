"""Fusion encoder (ALBEF): an image tower, a text tower, and fusion layers in which the text
attends to the image; heads for image-text matching (ITM), masked language modelling (MLM),
contrastive alignment (ITC) and VQA answer classification.

Ports the structure of ALBEF (Li et al., 2021, salesforce/ALBEF `models/model_pretrain.py`): the
ITC space comes from the unimodal towers, so retrieval can propose candidates cheaply; ITM and
MLM read the fused [CLS] / token states.  The first text token (<bos>) plays BERT's [CLS].

The fusion operator (`fusion`, one of glimpse.models.fusion.FUSIONS) is configurable, so that what
cross-attention buys can be measured.

Which heads exist follows `objective`: pretrain (MLM + ITM + ITC), retrieval (ITM + ITC), vqa
(an answer classifier), so a fine-tuned run holds only what it uses.  With `distill`, an
exponential-moving-average copy of the model (ALBEF's momentum model) provides soft targets.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.models.fusion import FUSIONS, AnswerHead, ContrastiveHead, Fusion, MLMHead, pad_tokens
from glimpse.models.layers import clip_init, init_weights
from glimpse.models.text import TextConfig, TextTransformer
from glimpse.models.vision import VisionConfig, VisionTransformer

OBJECTIVES = ("pretrain", "retrieval", "vqa")


@dataclass
class FusionConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    # bidirectional, [CLS]-pooled: MLM must read both sides of a masked word
    text: TextConfig = field(default_factory=lambda: TextConfig(causal=False, pool="cls"))
    fusion: str = "cross_attention"  # cross_attention | concat | weighted_sum | product
    fusion_layers: int = 2
    embed_dim: int = 128  # the ITC space
    init_temperature: float = 0.07
    objective: str = "pretrain"  # pretrain (MLM + ITM + ITC) | retrieval (ITM + ITC) | vqa (answer classes)
    # L = mlm_weight * L_MLM + itm_weight (alpha) * L_ITM + itc_weight (beta) * L_ITC
    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    itc_weight: float = 1.0
    mlm_probability: float = 0.15
    # shapes world, pretrain/retrieval: each training image's one-object phrases ("a small red circle") join its
    # captions, so matching also learns phrases that name one object (what region-phrase data gives real data)
    phrase_captions: bool = False
    phrase_repeat: int = 1  # each phrase joins the captions this many times (3 did worse: docs/results.md)
    # pretrain/retrieval: another image in the batch that a text also describes (a phrase naming an object
    # both hold; the same caption) is a positive of ITC's targets and never drawn as an ITM negative
    known_matches: bool = False
    # momentum distillation (ALBEF): an EMA teacher's predictions mixed into the targets
    distill: bool = False
    momentum: float = 0.995
    distill_alpha: float = 0.4
    mask_token_id: int = -1  # -1: set from the tokenizer ([MASK]/<mask>, or one row after its vocabulary)
    answers: list[str] = field(default_factory=list)  # vqa: the answer classes; empty: the training split's
    max_answers: int = 0  # vqa: keep the most frequent answers only (0: all)
    rerank_k: int = 16  # retrieval evaluation: ITM re-ranks the top k of ITC


# parts the EMA teacher copies, per objective (what its soft targets need)
TEACHER_PARTS = {"pretrain": ("vision", "text", "fusion", "itc", "mlm_head"), "retrieval": ("vision", "text", "itc")}


class FusionEncoder(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        if cfg.fusion not in FUSIONS:
            raise ValueError(f"fusion {cfg.fusion!r} must be one of {', '.join(FUSIONS)}")
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"objective {cfg.objective!r} must be one of {', '.join(OBJECTIVES)}")
        self.cfg = cfg
        t = cfg.text
        self.vision = VisionTransformer(cfg.vision)
        self.text = TextTransformer(t)
        self.fusion = Fusion(cfg.fusion, cfg.vision.width, t, cfg.fusion_layers)
        init_weights(self.fusion)
        clip_init(self.fusion.blocks, t.width)
        if cfg.objective in ("pretrain", "retrieval"):
            self.itc = ContrastiveHead(cfg.vision.width, t.width, cfg.embed_dim, cfg.init_temperature)
            self.itm_head = nn.Linear(t.width, 2)
            init_weights(self.itc)
            init_weights(self.itm_head)
        if cfg.objective == "pretrain":
            self.mlm_head = MLMHead(t.width, t.vocab_size, t.act, t.eps)
            init_weights(self.mlm_head)
            self.mlm_head.decoder.weight = self.text.token_embed.weight  # tied: one matrix reads and writes words
        if cfg.objective == "vqa":
            if not cfg.answers:
                raise ValueError("a vqa fusion model needs its answer list (model.answers)")
            self.vqa_head = AnswerHead(t.width, len(cfg.answers), t.eps)
            init_weights(self.vqa_head)
        self.teacher = None
        if cfg.distill and cfg.objective in TEACHER_PARTS:
            self.reset_teacher()

    def reset_teacher(self) -> None:
        """The EMA teacher starts as a copy of the student; it never gets gradients.  The parts
        are copied together, so the teacher's MLM decoder stays tied to its own embedding."""
        parts = nn.ModuleDict({p: getattr(self, p) for p in TEACHER_PARTS[self.cfg.objective]})
        self.teacher = copy.deepcopy(parts).requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.cfg.momentum
        for name, t in self.teacher.items():
            for ps, pt in zip(getattr(self, name).parameters(), t.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    # -- unimodal features -------------------------------------------------------------------
    @staticmethod
    def encode_image(vision: VisionTransformer, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(all image tokens [B, N, Dv], the pooled feature [B, Dv]) from one tower pass."""
        x = vision.forward_features(pixel_values)
        pool = vision.cfg.pool
        pooled = x[:, 0] if pool == "cls" else vision.head(x) if pool == "map" else x.mean(dim=1)
        return x, pooled

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.itc.vision_proj(self.encode_image(self.vision, pixel_values)[1])  # [B, E]

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.itc.text_proj(self.text.forward_features(input_ids, attention_mask)[:, 0])  # [B, E]

    def fuse(self, text: torch.Tensor, text_mask: torch.Tensor, patches: torch.Tensor,
             pooled: torch.Tensor) -> torch.Tensor:
        return self.fusion(text, text_mask, patches, pooled)  # [B, T, D]

    def itm_logits(self, text, text_mask, patches, pooled) -> torch.Tensor:
        """[B, 2] (no match, match) of aligned rows of text states and image features."""
        return self.itm_head(self.fuse(text, text_mask, patches, pooled)[:, 0])

    def answer_logits(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        patches, pooled = self.encode_image(self.vision, pixel_values)
        text = self.text.forward_features(input_ids, attention_mask)
        return self.vqa_head(self.fuse(text, attention_mask, patches, pooled)[:, 0])  # [B, A]

    # -- training forward ----------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mlm_input_ids: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                hard_negatives: Callable | None = None) -> dict[str, torch.Tensor]:
        """Everything the losses need, in one forward (so DDP sees one pass).

        vqa: {"answer_logits"}.  pretrain / retrieval: normalised ITC embeddings and the scale;
        with `hard_negatives` (a function of this dict that returns, for each local text, a
        negative image's (patches, pooled) and, for each local image, a negative text's (states,
        mask): glimpse.losses.itm_hard_negatives), "itm_logits" [3b, 2] for b positive
        pairs then b text-with-wrong-image and b image-with-wrong-text pairs; with mlm_input_ids
        and mlm_labels, "mlm_logits" [n, V] at the n masked positions and "mlm_targets" [n].
        With distillation, the teacher's "teacher_image_embeds", "teacher_text_embeds" and
        "teacher_mlm_logits" too.
        """
        if self.cfg.objective == "vqa":
            return {"answer_logits": self.answer_logits(pixel_values, input_ids, attention_mask)}
        patches, pooled = self.encode_image(self.vision, pixel_values)
        text = self.text.forward_features(input_ids, attention_mask)
        out = {"image_embeds": F.normalize(self.itc.vision_proj(pooled), dim=-1),
               "text_embeds": F.normalize(self.itc.text_proj(text[:, 0]), dim=-1),
               "logit_scale": self.itc.scale(),
               "patches": patches, "pooled": pooled, "text_states": text, "text_mask": attention_mask,
               "input_ids": input_ids}
        if hard_negatives is not None:
            neg_patches, neg_pooled, neg_text, neg_mask = hard_negatives(out)
            T = max(text.shape[1], neg_text.shape[1])
            texts = torch.cat([pad_tokens(text, T), pad_tokens(text, T), pad_tokens(neg_text, T)])
            masks = torch.cat([pad_tokens(attention_mask, T), pad_tokens(attention_mask, T), pad_tokens(neg_mask, T)])
            out["itm_logits"] = self.itm_logits(texts, masks, torch.cat([patches, neg_patches, patches]),
                                                torch.cat([pooled, neg_pooled, pooled]))
        if mlm_input_ids is not None and self.cfg.objective == "pretrain":
            keep = mlm_labels != -100
            masked_text = self.text.forward_features(mlm_input_ids, attention_mask)
            fused = self.fuse(masked_text, attention_mask, patches, pooled)
            out["mlm_logits"], out["mlm_targets"] = self.mlm_head(fused[keep]), mlm_labels[keep]
        if self.teacher is not None:
            out.update(self._teacher_outputs(pixel_values, input_ids, attention_mask, mlm_input_ids, mlm_labels))
        return out

    @torch.no_grad()
    def _teacher_outputs(self, pixel_values, input_ids, attention_mask, mlm_input_ids, mlm_labels) -> dict:
        if self.training:
            self.momentum_update()  # ALBEF updates the teacher at every forward, before it predicts
        t = self.teacher
        patches, pooled = self.encode_image(t["vision"], pixel_values)
        text = t["text"].forward_features(input_ids, attention_mask)
        out = {"teacher_image_embeds": F.normalize(t["itc"].vision_proj(pooled), dim=-1),
               "teacher_text_embeds": F.normalize(t["itc"].text_proj(text[:, 0]), dim=-1)}
        if mlm_input_ids is not None and "mlm_head" in t:
            keep = mlm_labels != -100
            fused = t["fusion"](t["text"].forward_features(mlm_input_ids, attention_mask), attention_mask,
                                patches, pooled)
            out["teacher_mlm_logits"] = t["mlm_head"](fused[keep])
        return out


