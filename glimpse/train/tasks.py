"""What the trainer needs to know about a family: how to build its model, read its data,
compute its loss, and evaluate it.  One class per family; the loop itself is shared."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.data.images import ImageTransform
from glimpse.data.pairs import CaptionTexts, PairCollate, PairDataset, TextCollate, load_pairs
from glimpse.data.tokenizer import Tokenizer
from glimpse.eval.dual import evaluate
from glimpse.eval.lm import evaluate_lm
from glimpse.infer.dual import DualEncoderPipeline
from glimpse.infer.lm import LanguageModelPipeline
from glimpse.models.decoder import CausalLM
from glimpse.models.dual_encoder import DualEncoder
from glimpse.train.objectives import contrastive_loss, lm_loss


class DualEncoderTask:
    def __init__(self, recipe, root: Path, tokenizer: Tokenizer):
        self.recipe, self.root, self.tokenizer = recipe, root, tokenizer
        self.recipe.model.text.vocab_size = self.recipe.model.text.vocab_size or tokenizer.vocab_size
        d = recipe.data
        stats = {k: tuple(v) for k, v in (("mean", d.image_mean), ("std", d.image_std)) if v is not None}
        self.transform = ImageTransform(recipe.model.vision.image_size, **stats)

    def build_model(self) -> nn.Module:
        return DualEncoder(self.recipe.model)

    def train_data(self):
        items = load_pairs(self.recipe.data, self.root, "train")
        dataset = PairDataset(items, self.transform, self.recipe.data.max_pixels)
        return dataset, PairCollate(self.tokenizer, self.recipe.model.text.context_length)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        return contrastive_loss(out, self.recipe.model.loss)

    def pipeline(self, model: DualEncoder) -> DualEncoderPipeline:
        return DualEncoderPipeline(model, self.tokenizer, self.transform, self.recipe.data.max_pixels,
                                   self.recipe.eval.templates, self.recipe.eval.prompt_ensemble)

    def evaluate(self, model: DualEncoder, splits: list[str]) -> dict[str, float]:
        e = self.recipe.eval
        return evaluate(self.pipeline(model), self.recipe.data, self.root, splits, e.templates, e.batch_size)


class CausalLMTask:
    """Language-model pretraining on the captions of the data set (for the shapes world: the
    LM that the Frozen recipe later keeps frozen)."""

    transform = None  # text only

    def __init__(self, recipe, root: Path, tokenizer: Tokenizer):
        self.recipe, self.root, self.tokenizer = recipe, root, tokenizer
        self.recipe.model.vocab_size = self.recipe.model.vocab_size or tokenizer.vocab_size

    def build_model(self) -> nn.Module:
        return CausalLM(self.recipe.model)

    def train_data(self):
        items = load_pairs(self.recipe.data, self.root, "train")
        return CaptionTexts(items), TextCollate(self.tokenizer, self.recipe.model.context_length)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def pipeline(self, model: CausalLM) -> LanguageModelPipeline:
        return LanguageModelPipeline(model, self.tokenizer)

    def evaluate(self, model: CausalLM, splits: list[str]) -> dict[str, float]:
        return evaluate_lm(model, self.tokenizer, self.recipe.data, self.root, splits,
                           self.recipe.model.context_length, self.recipe.eval.batch_size)


TASKS = {"dual_encoder": DualEncoderTask, "causal_lm": CausalLMTask}
