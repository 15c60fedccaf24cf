"""What the trainer needs to know about a family: how to build its model, read its data,
compute its loss, and evaluate it.  One class per family; the loop itself is shared."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.data.conversations import ConversationCollate, ConversationDataset, training_records
from glimpse.data.images import ImageTransform
from glimpse.data.pairs import CaptionTexts, PairCollate, PairDataset, TextCollate, load_pairs
from glimpse.data.tokenizer import Tokenizer
from glimpse.errors import GlimpseError
from glimpse.eval.dual import evaluate
from glimpse.eval.lm import evaluate_lm
from glimpse.eval.vlm import evaluate_vlm
from glimpse.infer.dual import DualEncoderPipeline
from glimpse.infer.lm import LanguageModelPipeline
from glimpse.infer.vlm import VisionLanguagePipeline
from glimpse.models.decoder import CausalLM
from glimpse.models.dual_encoder import DualEncoder
from glimpse.models.vlm import VisionLanguageModel
from glimpse.train.objectives import contrastive_loss, lm_loss, lm_loss_at_targets


def image_transform(recipe) -> ImageTransform:
    d = recipe.data
    stats = {k: tuple(v) for k, v in (("mean", d.image_mean), ("std", d.image_std)) if v is not None}
    return ImageTransform(recipe.model.vision.image_size, **stats)


class DualEncoderTask:
    def __init__(self, recipe, root: Path, tokenizer: Tokenizer):
        self.recipe, self.root, self.tokenizer = recipe, root, tokenizer
        self.recipe.model.text.vocab_size = self.recipe.model.text.vocab_size or tokenizer.vocab_size
        self.transform = image_transform(recipe)

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


class VisionLanguageTask:
    """A vision-language decoder (Frozen, LLaVA): next-token loss on the assistant's tokens of
    image conversations; evaluated on what it generates (VQA, captions)."""

    def __init__(self, recipe, root: Path, tokenizer: Tokenizer):
        self.recipe, self.root, self.tokenizer = recipe, root, tokenizer
        m = recipe.model
        m.lm.vocab_size = m.lm.vocab_size or tokenizer.vocab_size
        if tokenizer.ids.get("image") is None:
            raise GlimpseError(f"the tokenizer {tokenizer.path} has no <image> token")
        m.image_token_id = tokenizer.ids["image"]
        self.transform = image_transform(recipe)

    def build_model(self) -> nn.Module:
        return VisionLanguageModel(self.recipe.model)

    def train_data(self):
        m = self.recipe.model
        image_tokens = VisionLanguageModel.count_image_tokens(m)
        dataset = ConversationDataset(training_records(self.recipe.data, self.root), self.tokenizer, m.chat_template,
                                      self.transform, self.recipe.data.max_pixels, image_tokens, m.lm.context_length)
        return dataset, ConversationCollate(self.tokenizer.pad_id)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        hidden = model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), return_hidden=True)
        lm = model.module.lm if hasattr(model, "module") else model.lm  # DDP wraps the model
        return lm_loss_at_targets(hidden, lm.lm_head, batch["labels"])

    def pipeline(self, model: VisionLanguageModel) -> VisionLanguagePipeline:
        return VisionLanguagePipeline(model, self.tokenizer, self.transform, self.recipe.data.max_pixels)

    def evaluate(self, model: VisionLanguageModel, splits: list[str]) -> dict[str, float]:
        return evaluate_vlm(self.pipeline(model), self.recipe.data, self.root, splits, self.recipe.eval)


TASKS = {"dual_encoder": DualEncoderTask, "causal_lm": CausalLMTask, "vlm": VisionLanguageTask}
