"""Contrastive dual encoders (CLIP, SigLIP): an image tower and a text tower trained with InfoNCE or the
sigmoid loss; evaluated by retrieval R@K both ways and zero-shot classification.

    model.py      DualEncoder (and one-tower ImageEncoder / TextEncoder for Hugging Face folders)
    pipeline.py   what glimpse.load returns: embed_images, embed_texts, classify
    evaluate.py   retrieval and zero-shot figures of a split
    hf.py         CLIP / SigLIP / BERT folders in, CLIPModel folders out
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.data.images import ImageTransform
from glimpse.data.pairs import PairCollate, PairDataset, load_pairs, stream_pairs
from glimpse.families import checks
from glimpse.families.base import Family, HFBuild, Loaded, recipe_transform
from glimpse.families.dual_encoder import hf
from glimpse.families.dual_encoder.evaluate import evaluate
from glimpse.families.dual_encoder.model import DualEncoder, DualEncoderConfig, ImageEncoder
from glimpse.families.dual_encoder.pipeline import DualEncoderPipeline
from glimpse.families.registry import register
from glimpse.hub import folder as hf_folder
from glimpse.losses import contrastive_loss
from glimpse.schema import check, choice


@register
class DualEncoderFamily(Family):
    name = "dual_encoder"
    config = DualEncoderConfig
    hf_model_types = hf.MODEL_TYPES
    streams = True

    @classmethod
    def validate(cls, recipe) -> None:
        m = recipe.model
        choice("model.loss", m.loss, ("clip", "siglip"))
        choice("model.text.pool", m.text.pool, ("eos", "cls", "mean", "last"))
        choice("model.text.norm", m.text.norm, ("pre", "post"))
        checks.check_towers(m)
        check(m.embed_dim >= 1, "model.embed_dim", m.embed_dim, "must be at least 1")
        d = recipe.data
        check(not m.hard_negatives or (d.source == "shapes" and not d.stream), "model.hard_negatives",
              m.hard_negatives, "swaps the shapes world's attribute words: it needs data.source shapes, not a stream")

    def __init__(self, recipe, root: Path, tokenizer):
        super().__init__(recipe, root, tokenizer)
        self.recipe.model.text.vocab_size = self.recipe.model.text.vocab_size or tokenizer.vocab_size
        self.transform = recipe_transform(recipe)

    def build_model(self) -> nn.Module:
        return DualEncoder(self.recipe.model)

    def train_data(self):
        d = self.recipe.data
        if d.stream:
            dataset = stream_pairs(d, self.root, self.transform, self.recipe.train.seed)
        else:
            dataset = PairDataset(load_pairs(d, self.root, "train"), self.transform, d.max_pixels,
                                  negatives=self.recipe.model.hard_negatives)
        return dataset, PairCollate(self.tokenizer, self.recipe.model.text.context_length)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        negatives = ()
        if self.recipe.model.hard_negatives:  # always a tensor, maybe of 0 rows: every process gathers them
            ids = batch.get("negative_ids", batch["input_ids"][:0])
            negatives = (ids, batch.get("negative_mask", batch["attention_mask"][:0]))
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], *negatives)
        return contrastive_loss(out, self.recipe.model.loss)

    def pipeline(self, model: DualEncoder) -> DualEncoderPipeline:
        return DualEncoderPipeline(model, self.tokenizer, self.transform, self.recipe.data.max_pixels,
                                   self.recipe.eval.templates, self.recipe.eval.prompt_ensemble)

    def evaluate(self, model: DualEncoder, splits: list[str]) -> dict[str, float]:
        e = self.recipe.eval
        return evaluate(self.pipeline(model), self.recipe.data, self.root, splits, e.templates, e.batch_size)

    def to_hf(self, model: DualEncoder):
        return hf.to_hf(model, self.tokenizer, self.transform)

    @classmethod
    def hf_build(cls, folder: Path, config: dict) -> HFBuild:
        return hf.build(folder, config)

    @classmethod
    def hf_inputs(cls, folder: Path, model: nn.Module, tokenizer):
        vision = getattr(model, "vision", None)  # a text-only encoder reads no images
        return tokenizer, hf_folder.image_transform(folder, vision.cfg.image_size) if vision is not None else None

    @classmethod
    def hf_pipeline(cls, loaded: Loaded) -> DualEncoderPipeline:
        return DualEncoderPipeline(loaded.model, loaded.tokenizer, loaded.transform or ImageTransform(224))

    @classmethod
    def hf_part(cls, folder: Path, config: dict, target: nn.Module):
        return hf.part(folder, config, target)


__all__ = ["DualEncoderFamily", "DualEncoder", "DualEncoderConfig", "DualEncoderPipeline", "ImageEncoder"]
