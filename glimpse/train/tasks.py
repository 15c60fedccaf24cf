"""What the trainer needs to know about a family: how to build its model, read its data,
compute its loss, and evaluate it.  One class per family; the loop itself is shared."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.data.chat import IGNORE
from glimpse.data.conversations import ConversationCollate, ConversationDataset, training_records, vqa_items
from glimpse.data.images import ImageTransform
from glimpse.data.lm_text import CaptionTexts, WorldTexts
from glimpse.data.pairs import PairCollate, PairDataset, TextCollate, load_pairs
from glimpse.data.tokenizer import Tokenizer
from glimpse.errors import GlimpseError
from glimpse.eval.dual import evaluate
from glimpse.eval.fusion import evaluate_fusion
from glimpse.eval.lm import evaluate_lm
from glimpse.eval.vlm import evaluate_vlm
from glimpse.infer.dual import DualEncoderPipeline
from glimpse.infer.fusion import FusionPipeline
from glimpse.infer.lm import LanguageModelPipeline
from glimpse.infer.vlm import VisionLanguagePipeline
from glimpse.models.decoder import CausalLM
from glimpse.models.dual_encoder import DualEncoder
from glimpse.models.fusion import FusionEncoder
from glimpse.models.vlm import VisionLanguageModel
from glimpse.train.feature_cache import cache_tower_features
from glimpse.train.objectives import (
    answer_loss,
    contrastive_loss,
    fusion_loss,
    itm_hard_negatives,
    lm_loss,
    lm_loss_at_targets,
    mask_tokens,
)


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
    """Language-model pretraining on the data set's text (`data.lm_text`: its captions, or its
    captions with questions answered); for the shapes world, the LM that Frozen keeps frozen."""

    transform = None  # text only

    def __init__(self, recipe, root: Path, tokenizer: Tokenizer):
        self.recipe, self.root, self.tokenizer = recipe, root, tokenizer
        self.recipe.model.vocab_size = self.recipe.model.vocab_size or tokenizer.vocab_size

    def build_model(self) -> nn.Module:
        return CausalLM(self.recipe.model)

    def train_data(self):
        d = self.recipe.data
        items = load_pairs(d, self.root, "train")
        texts = WorldTexts(items, vqa_items(d, self.root, "train")) if d.lm_text == "world" else CaptionTexts(items)
        return texts, TextCollate(self.tokenizer, self.recipe.model.context_length)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def pipeline(self, model: CausalLM) -> LanguageModelPipeline:
        return LanguageModelPipeline(model, self.tokenizer)

    def evaluate(self, model: CausalLM, splits: list[str]) -> dict[str, float]:
        return evaluate_lm(model, self.tokenizer, self.recipe.data, self.root, splits,
                           self.recipe.model.context_length, self.recipe.eval.batch_size)


def padding_groups(batch: dict, images, image_token_id: int, image_tokens: int, groups: int):
    """The batch as (input_ids, attention_mask, labels, images) parts of about `groups` equal
    shares, the samples sorted by length so each part is padded only to its own longest: the
    same samples and, summed over the parts, the same loss, with less padding computed.
    `images` (pixels or feature-cache rows) are in reading order, so each part takes its samples'."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if groups <= 1 or ids.shape[0] < 2:
        yield ids, mask, labels, images
        return
    lengths = mask.sum(1)
    per_sample = ((ids == image_token_id).sum(1) // image_tokens).tolist()  # images of each sample
    starts = [0]
    for n in per_sample:
        starts.append(starts[-1] + n)
    for rows in torch.argsort(lengths).tensor_split(min(groups, ids.shape[0])):
        T = int(lengths[rows].max())
        picked = [i for r in rows.tolist() for i in range(starts[r], starts[r + 1])]
        part_images = None if images is None else images[torch.tensor(picked, dtype=torch.long, device=images.device)]
        yield ids[rows, :T], mask[rows, :T], labels[rows, :T], part_images


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
        self.records, self.image_rows, self.feature_cache = None, None, None  # see prepare()

    def build_model(self) -> nn.Module:
        return VisionLanguageModel(self.recipe.model)

    def prepare(self, model: VisionLanguageModel, device: torch.device, progress: bool = True) -> None:
        """Before the first step, with the initial (and frozen) weights in place: the tower
        features of every training image, when the recipe asks for them to be cached."""
        if self.recipe.train.cache_vision_features:
            self.records = training_records(self.recipe.data, self.root)
            self.image_rows, self.feature_cache = cache_tower_features(
                model, self.records, self.transform, self.recipe.data.max_pixels, device,
                self.recipe.eval.batch_size, progress)

    def train_data(self):
        m = self.recipe.model
        image_tokens = VisionLanguageModel.count_image_tokens(m)
        records = self.records if self.records is not None else training_records(self.recipe.data, self.root)
        dataset = ConversationDataset(records, self.tokenizer, m.chat_template, self.transform,
                                      self.recipe.data.max_pixels, image_tokens, m.lm.context_length, self.image_rows)
        return dataset, ConversationCollate(self.tokenizer.pad_id)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        lm = model.module.lm if hasattr(model, "module") else model.lm  # DDP wraps the model
        images = batch["image_rows"] if "image_rows" in batch else batch.get("pixel_values")
        parts = list(padding_groups(batch, images, self.recipe.model.image_token_id,
                                    VisionLanguageModel.count_image_tokens(self.recipe.model),
                                    self.recipe.train.padding_groups))

        def part_loss(ids, mask, labels, ims):
            feats = {"tower_features": self.feature_cache[ims]} if "image_rows" in batch else {"pixel_values": ims}
            return lm_loss_at_targets(model(ids, mask, return_hidden=True, **feats), lm.lm_head, labels)

        if len(parts) == 1:
            return part_loss(*parts[0])
        total, n_targets = 0.0, 0
        for ids, mask, labels, ims in parts:
            n = int((labels[:, 1:] != IGNORE).sum())
            if n:  # a part whose answers were all cut off has nothing to learn from
                total, n_targets = total + part_loss(ids, mask, labels, ims) * n, n_targets + n
        return total / n_targets  # the mean over the batch's targets, as one part would give

    def pipeline(self, model: VisionLanguageModel) -> VisionLanguagePipeline:
        return VisionLanguagePipeline(model, self.tokenizer, self.transform, self.recipe.data.max_pixels)

    def evaluate(self, model: VisionLanguageModel, splits: list[str]) -> dict[str, float]:
        return evaluate_vlm(self.pipeline(model), self.recipe.data, self.root, splits, self.recipe.eval)


class FusionTask:
    """A fusion encoder (ALBEF): pretraining with MLM + ITM + ITC on captions, or fine-tuning for
    retrieval (ITM + ITC) or VQA (answer classification); `model.objective` says which."""

    def __init__(self, recipe, root: Path, tokenizer: Tokenizer):
        from glimpse.data.answers import answer_vocabulary

        self.recipe, self.root, self.tokenizer = recipe, root, tokenizer
        m = recipe.model
        if m.mask_token_id < 0:  # a [MASK] of the tokenizer's own, or one embedding row after its vocabulary
            found = next((tokenizer.hf.token_to_id(t) for t in ("[MASK]", "<mask>") if tokenizer.hf.token_to_id(t)
                          is not None), None)
            m.mask_token_id = found if found is not None else tokenizer.vocab_size
        m.text.vocab_size = m.text.vocab_size or max(tokenizer.vocab_size, m.mask_token_id + 1)
        if m.objective == "vqa" and not m.answers:
            m.answers = answer_vocabulary(vqa_items(recipe.data, root, "train"), m.max_answers)
        self.transform = image_transform(recipe)

    def build_model(self) -> nn.Module:
        return FusionEncoder(self.recipe.model)

    def train_data(self):
        from glimpse.data.answers import VQACollate, VQADataset

        m, d = self.recipe.model, self.recipe.data
        if m.objective == "vqa":
            dataset = VQADataset(vqa_items(d, self.root, "train"), m.answers, self.transform, d.max_pixels)
            return dataset, VQACollate(self.tokenizer, m.text.context_length)
        dataset = PairDataset(load_pairs(d, self.root, "train"), self.transform, d.max_pixels)
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
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], mlm_ids, mlm_labels,
                    itm_hard_negatives if m.itm_weight > 0 else None)
        return fusion_loss(out, m)[0]

    def load_init(self, model: nn.Module, path: Path) -> None:
        """Start from another fusion run (`init: RUN`): every part both models have is loaded
        strictly; heads this objective does not use are left out (a pretraining run's MLM head
        when fine-tuning for VQA), and a head the other run lacks (the VQA head) starts fresh.
        The towers and the fusion layers must come from the run.  A teacher the run lacks
        starts as a copy of the loaded model."""
        from glimpse.train import checkpoint as ckpt

        tensors = ckpt.read_weights(path)
        have = {k.split(".", 1)[0] for k in tensors}
        parts = [name for name, _ in model.named_children()]
        for part in ("vision", "text", "fusion"):
            if part not in have:
                raise GlimpseError(f"init: {path} has no {part} part; is it a fusion run?")
        fresh = [p for p in parts if p not in have]
        state = model.state_dict()
        merged = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in parts}
        merged.update({k: v for k, v in state.items() if k.split(".", 1)[0] in fresh})
        ckpt.load_tensors(model, merged, path)
        if "teacher" in fresh:
            model.reset_teacher()

    def pipeline(self, model: FusionEncoder) -> FusionPipeline:
        return FusionPipeline(model, self.tokenizer, self.transform, self.recipe.data.max_pixels,
                              self.recipe.eval.batch_size)

    def evaluate(self, model: FusionEncoder, splits: list[str]) -> dict[str, float]:
        return evaluate_fusion(self.pipeline(model), self.recipe.data, self.root, splits, self.recipe.eval)


TASKS = {"dual_encoder": DualEncoderTask, "causal_lm": CausalLMTask, "vlm": VisionLanguageTask, "fusion": FusionTask}
