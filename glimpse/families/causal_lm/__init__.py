"""Causal language models (Llama, Qwen2 and GPT-2 blocks): next-token pretraining on a data set's
text (its captions, or captions with questions answered); for the shapes world, the LM that Frozen
keeps frozen and LLaVA starts from.  Evaluated by loss and perplexity on a split's captions.

    pipeline.py   what glimpse.load returns: generate, perplexity
    evaluate.py   loss and perplexity of a split's captions
    hf.py         Llama / Mistral / Qwen2 / GPT-2 folders in and out
The model is a part (glimpse.models.decoder.CausalLM): the vision-language families hold one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.data.conversations import vqa_items
from glimpse.data.lm_text import CaptionTexts, WorldTexts
from glimpse.data.pairs import TextCollate, load_pairs
from glimpse.data.world import world_info
from glimpse.errors import GlimpseError
from glimpse.families import checks
from glimpse.families.base import Family, HFBuild, Loaded
from glimpse.families.causal_lm import hf
from glimpse.families.causal_lm.evaluate import evaluate_lm
from glimpse.families.causal_lm.pipeline import LanguageModelPipeline
from glimpse.families.registry import register
from glimpse.losses import lm_loss
from glimpse.models.decoder import CausalLM, DecoderConfig


@register
class CausalLMFamily(Family):
    name = "causal_lm"
    config = DecoderConfig
    hf_model_types = hf.MODEL_TYPES

    @classmethod
    def validate(cls, recipe) -> None:
        checks.check_decoder(recipe.model)

    def __init__(self, recipe, root: Path, tokenizer):
        super().__init__(recipe, root, tokenizer)
        self.recipe.model.vocab_size = self.recipe.model.vocab_size or tokenizer.vocab_size

    def build_model(self) -> nn.Module:
        return CausalLM(self.recipe.model)

    def train_data(self):
        d = self.recipe.data
        items = load_pairs(d, self.root, "train")
        if d.lm_text == "captions":
            texts = CaptionTexts(items)
        else:
            binding = d.lm_text == "world_binding"
            if binding and d.source != "shapes":
                raise GlimpseError("data.lm_text world_binding names the shapes world's colours (data.source: shapes)")
            texts = WorldTexts(items, vqa_items(d, self.root, "train"), binding_share=d.binding_share if binding else 0.0,
                               colours=world_info(self.root)["colours"] if binding else ())
        return texts, TextCollate(self.tokenizer, self.recipe.model.context_length)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def pipeline(self, model: CausalLM) -> LanguageModelPipeline:
        return LanguageModelPipeline(model, self.tokenizer)

    def evaluate(self, model: CausalLM, splits: list[str]) -> dict[str, float]:
        return evaluate_lm(model, self.tokenizer, self.recipe.data, self.root, splits,
                           self.recipe.model.context_length, self.recipe.eval.batch_size)

    def to_hf(self, model: CausalLM):
        return hf.to_hf(model, self.tokenizer)

    @classmethod
    def hf_build(cls, folder: Path, config: dict) -> HFBuild:
        return hf.build(folder, config)

    @classmethod
    def hf_pipeline(cls, loaded: Loaded) -> LanguageModelPipeline:
        return LanguageModelPipeline(loaded.model, loaded.tokenizer)

    @classmethod
    def hf_part(cls, folder: Path, config: dict, target: nn.Module):
        return hf.part(folder, config, target)


__all__ = ["CausalLMFamily", "LanguageModelPipeline"]
