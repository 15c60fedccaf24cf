"""Vision-language decoders: a vision tower, a connector and a causal LM that reads image features at the
`<image>` positions of its text.  Frozen (a visual prefix for a frozen LM) and LLaVA (a projector, then
visual instruction tuning) are this one family with a different connector, freeze list and data.
Trained with the next-token loss on the assistant's tokens; evaluated on what it generates (VQA
accuracy, captions' CIDEr-D and BLEU, few-shot VQA).

    model.py          VisionLanguageModel (VLMConfig)
    pipeline.py       what glimpse.load returns: caption, ask, chat
    evaluate.py       VQA and caption figures of a split
    hf.py             LLaVA folders in and out
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.data.chat import IGNORE
from glimpse.data.conversations import (
    ConversationCollate,
    ConversationDataset,
    stream_conversations,
    training_records,
)
from glimpse.errors import GlimpseError
from glimpse.families import checks
from glimpse.families.base import Family, HFBuild, Loaded, recipe_transform
from glimpse.families.feature_cache import cache_tower_features
from glimpse.families.registry import register
from glimpse.families.vlm import hf
from glimpse.families.vlm.evaluate import evaluate_vlm
from glimpse.families.vlm.model import VisionLanguageModel, VLMConfig
from glimpse.families.vlm.pipeline import VisionLanguagePipeline
from glimpse.hub import folder as hf_folder
from glimpse.losses import lm_loss_at_targets
from glimpse.schema import check, choice


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


@register
class VisionLanguageFamily(Family):
    name = "vlm"
    config = VLMConfig
    train_options = frozenset({"padding_groups", "cache_vision_features"})
    data_formats = ("coco", "csv", "wds", "llava")
    hf_model_types = hf.MODEL_TYPES
    streams = True  # caption shards (LLaVA's stage 1) and LLaVA-record shards (stage 2); not with a VQA mix

    @classmethod
    def validate(cls, recipe) -> None:
        m = recipe.model
        checks.check_llava(recipe)
        v = m.vision
        choice("model.connector", m.connector, ("linear", "mlp2x_gelu", "prefix"))
        choice("model.prefix_source", m.prefix_source, ("pooled", "patches"))
        choice("model.vision_feature_select", m.vision_feature_select, ("patch", "full"))
        check(m.prefix_tokens >= 1 and m.pixel_shuffle >= 1, "model.prefix_tokens/pixel_shuffle",
              (m.prefix_tokens, m.pixel_shuffle), "must be at least 1")
        grid = v.image_size // max(v.patch_size, 1)
        check(m.connector == "prefix" or grid % m.pixel_shuffle == 0, "model.pixel_shuffle", m.pixel_shuffle,
              f"must divide the {grid}x{grid} patch grid")
        d = recipe.data
        if d.stream:  # caption shards (stage 1), or shards of LLaVA records (data.format llava: stage 2)
            check(not d.vqa_mix, "data.stream", d.stream, "streams the shards alone: not with data.vqa_mix")
            check(not recipe.train.cache_vision_features, "train.cache_vision_features", True,
                  "caches the features of a set read whole: not with data.stream")
        check(not (d.source == "wds" and d.format == "llava") or d.stream, "data.format", d.format,
              "llava with data.source wds reads shards of LLaVA records as a stream: set data.stream true")
        for key in ("image_positions", "projector_norm"):  # parts of the projectors
            on = getattr(m, key)
            check(not on or m.connector != "prefix", f"model.{key}", on,
                  "is for the linear and mlp2x_gelu projectors (the prefix mapper makes its own tokens)")

    def __init__(self, recipe, root: Path, tokenizer):
        super().__init__(recipe, root, tokenizer)
        m = recipe.model
        m.lm.vocab_size = m.lm.vocab_size or tokenizer.vocab_size
        if tokenizer.ids.get("image") is None:
            raise GlimpseError(f"the tokenizer {tokenizer.path} has no <image> token")
        m.image_token_id = tokenizer.ids["image"]
        self.transform = recipe_transform(recipe)
        self.records, self.image_rows, self.feature_cache = None, None, None  # see prepare()

    def build_model(self) -> nn.Module:
        return VisionLanguageModel(self.recipe.model)

    def prepare(self, model: VisionLanguageModel, device: torch.device, progress: bool = True) -> None:
        """Before the first step, with the initial (and frozen) weights in place: the tower
        features of every training image, when the recipe asks for them to be cached."""
        if self.recipe.train.cache_vision_features:
            self.records = training_records(self.recipe.data, self.root)
            c = model.cfg
            self.image_rows, self.feature_cache = cache_tower_features(
                model, [img for r in self.records for img in r["images"]], self.transform,
                self.recipe.data.max_pixels, device, self.recipe.eval.batch_size, progress,
                settings=(c.vision_feature_layer, c.vision_feature_select, c.connector, c.prefix_source))

    def train_data(self):
        m = self.recipe.model
        image_tokens = VisionLanguageModel.count_image_tokens(m)
        if self.recipe.data.stream:
            return stream_conversations(self.recipe.data, self.root, self.tokenizer, m.chat_template, self.transform,
                                        image_tokens, m.lm.context_length, self.recipe.train.seed), \
                ConversationCollate(self.tokenizer.pad_id)
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

    def to_hf(self, model: VisionLanguageModel):
        return hf.to_hf(model, self.tokenizer, self.transform)

    @classmethod
    def hf_build(cls, folder: Path, config: dict) -> HFBuild:
        return hf.build(folder, config)

    @classmethod
    def hf_inputs(cls, folder: Path, model: VisionLanguageModel, tokenizer):
        if tokenizer:
            tokenizer.ids["image"] = model.cfg.image_token_id
        return tokenizer, hf_folder.image_transform(folder, model.cfg.vision.image_size)

    @classmethod
    def hf_pipeline(cls, loaded: Loaded) -> VisionLanguagePipeline:
        return VisionLanguagePipeline(loaded.model, loaded.tokenizer, loaded.transform)

    @classmethod
    def hf_part(cls, folder: Path, config: dict, target: nn.Module):
        return hf.part(folder, config, target)


__all__ = ["VisionLanguageFamily", "VisionLanguageModel", "VLMConfig", "VisionLanguagePipeline"]
