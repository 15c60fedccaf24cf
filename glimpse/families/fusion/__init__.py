"""Fusion encoders (ALBEF): an image tower, a text tower and fusion layers in which the text attends to
the image.  Pretraining with ITC + ITM (hard negatives) + MLM on captions, or fine-tuning for
retrieval (ITM + ITC) or VQA (answer classification); `model.objective` says which.

    model.py      FusionEncoder (FusionConfig)
    pipeline.py   what glimpse.load returns: embed, match, search (ITC proposes, ITM re-ranks), ask
    evaluate.py   retrieval (ITC and re-ranked) and VQA figures of a split
    answers.py    VQA as classification: the answer vocabulary and soft-scored samples
No Hugging Face class computes this model: export refuses it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from glimpse import runs
from glimpse.data.conversations import vqa_items
from glimpse.data.formats import ImageText
from glimpse.data.pairs import PairCollate, PairDataset, load_pairs, stream_pairs
from glimpse.data.world import read_scenes
from glimpse.distributed import all_reduce_int
from glimpse.errors import GlimpseError
from glimpse.families import checks
from glimpse.families.base import Family, recipe_transform
from glimpse.families.fusion.answers import VQACollate, VQADataset, answer_vocabulary
from glimpse.families.fusion.evaluate import evaluate_fusion
from glimpse.families.fusion.model import OBJECTIVES, FusionConfig, FusionEncoder
from glimpse.families.fusion.pipeline import FusionPipeline
from glimpse.families.registry import register
from glimpse.losses import (
    answer_loss,
    itc_loss,
    itm_hard_negatives,
    itm_loss,
    known_matches,
    mask_tokens,
    mlm_loss,
)
from glimpse.models.fusion import FUSIONS
from glimpse.schema import check, choice


def fusion_loss(out: dict[str, torch.Tensor], cfg: FusionConfig,
                matches: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L = mlm_weight * L_MLM + itm_weight * L_ITM + itc_weight * L_ITC over what `out` holds (`matches`:
    the batch's known true pairs, glimpse.losses.known_matches); returns the total and the parts
    (detached, for logs and tests)."""
    alpha = cfg.distill_alpha if "teacher_image_embeds" in out else 0.0
    parts = {"itc": itc_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"],
                             out.get("teacher_image_embeds"), out.get("teacher_text_embeds"), alpha, matches)}
    weights = {"itc": cfg.itc_weight}
    if "itm_logits" in out:
        parts["itm"] = itm_loss(out["itm_logits"], all_reduce_int(out["image_embeds"].shape[0], out["itm_logits"].device))
        weights["itm"] = cfg.itm_weight
    if "mlm_logits" in out:
        parts["mlm"] = mlm_loss(out["mlm_logits"], out["mlm_targets"], out.get("teacher_mlm_logits"), alpha)
        weights["mlm"] = cfg.mlm_weight
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


@register
class FusionFamily(Family):
    name = "fusion"
    streams = True  # image-text pretraining; not the answer-classification objective (vqa)
    config = FusionConfig

    @classmethod
    def validate(cls, recipe) -> None:
        m = recipe.model
        choice("model.fusion", m.fusion, FUSIONS)
        choice("model.objective", m.objective, OBJECTIVES)
        check(not m.text.causal, "model.text.causal", m.text.causal, "must be false: MLM and fusion read both sides")
        checks.check_towers(m)
        for k in ("fusion_layers", "embed_dim", "rerank_k", "phrase_repeat"):
            check(getattr(m, k) >= 1, f"model.{k}", getattr(m, k), "must be at least 1")
        for k in ("mlm_weight", "itm_weight", "itc_weight", "max_answers"):
            check(getattr(m, k) >= 0, f"model.{k}", getattr(m, k), "must not be negative")
        check(0 < m.mlm_probability < 1, "model.mlm_probability", m.mlm_probability, "must be within (0, 1)")
        check(not m.phrase_captions or (recipe.data.source == "shapes" and recipe.data.format == "coco"),
              "model.phrase_captions", m.phrase_captions, "needs the shapes world in its coco format (its scenes)")
        check(not m.known_matches or not recipe.data.stream, "model.known_matches", m.known_matches,
              "needs every caption of an image, which a stream (data.stream) does not give")
        check(not recipe.data.stream or m.objective != "vqa", "data.stream", recipe.data.stream,
              "streams image-caption pairs: not for model.objective vqa (questions)")
        check(0 < m.init_temperature <= 1, "model.init_temperature", m.init_temperature, "must be within (0, 1]")
        check(0 <= m.momentum < 1, "model.momentum", m.momentum, "must be within [0, 1)")
        check(0 <= m.distill_alpha <= 1, "model.distill_alpha", m.distill_alpha, "must be within [0, 1]")
        check(m.objective == "vqa" or m.itc_weight + m.itm_weight + (m.mlm_weight if m.objective == "pretrain" else 0) > 0,
              "model.*_weight", (m.mlm_weight, m.itm_weight, m.itc_weight), "are all zero: nothing to learn")

    def __init__(self, recipe, root: Path, tokenizer):
        super().__init__(recipe, root, tokenizer)
        m = recipe.model
        if m.mask_token_id < 0:  # a [MASK] of the tokenizer's own, or one embedding row after its vocabulary
            found = next((tokenizer.hf.token_to_id(t) for t in ("[MASK]", "<mask>") if tokenizer.hf.token_to_id(t)
                          is not None), None)
            m.mask_token_id = found if found is not None else tokenizer.vocab_size
        m.text.vocab_size = m.text.vocab_size or max(tokenizer.vocab_size, m.mask_token_id + 1)
        if m.objective == "vqa" and not m.answers:
            m.answers = answer_vocabulary(vqa_items(recipe.data, root, "train"), m.max_answers)
        self.transform = recipe_transform(recipe)

    def build_model(self) -> nn.Module:
        return FusionEncoder(self.recipe.model)

    def train_data(self):
        m, d = self.recipe.model, self.recipe.data
        if m.objective == "vqa":
            dataset = VQADataset(vqa_items(d, self.root, "train"), m.answers, self.transform, d.max_pixels)
            return dataset, VQACollate(self.tokenizer, m.text.context_length)
        if d.stream:  # phrase_captions needs the shapes world's scenes, which a stream (source wds) has not
            stream = stream_pairs(d, self.root, self.transform, self.recipe.train.seed)
            return stream, PairCollate(self.tokenizer, m.text.context_length)
        items = load_pairs(d, self.root, "train")
        if m.phrase_captions:
            scenes = {Path(w.path).name: w.scene for w in read_scenes(self.root, "train")}
            items = [ImageText(it.image, it.captions + [f"a {o['size']} {o['colour']} {o['shape']}"
                                                         for o in scenes[Path(it.image).name]] * m.phrase_repeat,
                               it.image_id)
                     for it in items]
        dataset = PairDataset(items, self.transform, d.max_pixels, descriptions=m.known_matches)
        return dataset, PairCollate(self.tokenizer, m.text.context_length)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        m = self.recipe.model
        if m.objective == "vqa":
            out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            return answer_loss(out["answer_logits"], batch["answer_scores"])
        mlm_ids = mlm_labels = None
        if m.objective == "pretrain" and m.mlm_weight > 0:
            specials = [i for i in (*self.tokenizer.ids.values(), m.mask_token_id) if i is not None]
            mlm_ids, mlm_labels = mask_tokens(batch["input_ids"], batch["attention_mask"], m.mask_token_id,
                                              self.tokenizer.vocab_size, specials, m.mlm_probability)
        matches = None
        if m.known_matches and "text_keys" in batch:
            matches = known_matches(batch["text_keys"], batch["image_keys"])
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], mlm_ids, mlm_labels,
                    partial(itm_hard_negatives, matches=matches) if m.itm_weight > 0 else None)
        return fusion_loss(out, m, matches)[0]

    def load_init(self, model: nn.Module, path: Path) -> None:
        """Start from another fusion run (`init: RUN`): every part both models have is loaded
        strictly; heads this objective does not use are left out (a pretraining run's MLM head
        when fine-tuning for VQA), and a head the other run lacks (the VQA head) starts fresh.
        The towers and the fusion layers must come from the run.  A teacher the run lacks
        starts as a copy of the loaded model."""
        tensors = runs.read_weights(path)
        have = {k.split(".", 1)[0] for k in tensors}
        parts = [name for name, _ in model.named_children()]
        for part in ("vision", "text", "fusion"):
            if part not in have:
                raise GlimpseError(f"init: {path} has no {part} part; is it a fusion run?")
        fresh = [p for p in parts if p not in have]
        state = model.state_dict()
        merged = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in parts}
        merged.update({k: v for k, v in state.items() if k.split(".", 1)[0] in fresh})
        runs.load_tensors(model, merged, path)
        if "teacher" in fresh:
            model.reset_teacher()

    def pipeline(self, model: FusionEncoder) -> FusionPipeline:
        return FusionPipeline(model, self.tokenizer, self.transform, self.recipe.data.max_pixels,
                              self.recipe.eval.batch_size)

    def evaluate(self, model: FusionEncoder, splits: list[str]) -> dict[str, float]:
        return evaluate_fusion(self.pipeline(model), self.recipe.data, self.root, splits, self.recipe.eval)


__all__ = ["FusionFamily", "FusionEncoder", "FusionConfig", "FusionPipeline", "fusion_loss"]
