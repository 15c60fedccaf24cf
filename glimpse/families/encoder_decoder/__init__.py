"""Encoder-decoder captioners: a ViT encoder and a causal decoder joined by cross-attention in every
decoder block (transformers' VisionEncoderDecoderModel, ViT + GPT-2).  Trained by teacher forcing on
captions; evaluated on greedy captions (CIDEr-D, BLEU, exact match, and a control with the captions
shuffled across images).

    model.py      EncoderDecoderCaptioner (EncoderDecoderConfig), shift_tokens_right
    pipeline.py   what glimpse.load returns: caption (and chat, which captions the last image)
    evaluate.py   the caption figures of a split
    hf.py         VisionEncoderDecoderModel folders (ViT + GPT-2) in and out
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.data.pairs import PairCollate, PairDataset, load_pairs, stream_pairs
from glimpse.errors import GlimpseError
from glimpse.families import checks
from glimpse.families.base import Family, HFBuild, Loaded, recipe_transform
from glimpse.families.encoder_decoder import hf
from glimpse.families.encoder_decoder.evaluate import evaluate_captioner
from glimpse.families.encoder_decoder.model import (
    IGNORE,
    EncoderDecoderCaptioner,
    EncoderDecoderConfig,
    shift_tokens_right,
)
from glimpse.families.encoder_decoder.pipeline import CaptionerPipeline
from glimpse.families.registry import register
from glimpse.hub import folder as hf_folder
from glimpse.losses import seq2seq_loss


class CaptionCollate(PairCollate):
    """Images and their captions as teacher-forcing pairs: labels are caption + eos (padding ignored),
    the decoder's input is the labels shifted right behind the start token."""

    def __init__(self, tokenizer, context_length: int, start_id: int):
        super().__init__(tokenizer, context_length)
        self.start_id = start_id

    def __call__(self, samples: list[dict]) -> dict:
        batch = super().__call__(samples)
        if "input_ids" in batch:  # bos + caption + eos rows: the bos is the start token's place
            ids, mask = batch.pop("input_ids"), batch.pop("attention_mask")
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
            batch["labels"] = labels
            batch["decoder_input_ids"] = shift_tokens_right(labels, self.tokenizer.pad_id, self.start_id)
        return batch


@register
class EncoderDecoderFamily(Family):
    name = "encoder_decoder"
    streams = True
    config = EncoderDecoderConfig
    hf_model_types = hf.MODEL_TYPES

    @classmethod
    def validate(cls, recipe) -> None:
        m = recipe.model
        checks.check_vision_grid(m.vision)
        checks.check_decoder(m.decoder, "model.decoder")

    def __init__(self, recipe, root: Path, tokenizer):
        super().__init__(recipe, root, tokenizer)
        m = recipe.model
        m.decoder.vocab_size = m.decoder.vocab_size or tokenizer.vocab_size
        m.decoder.cross_attention = True
        if m.decoder_start_token_id < 0:
            if tokenizer.ids.get("bos") is None:
                raise GlimpseError(f"the tokenizer {tokenizer.path} has no bos token to start captions with")
            m.decoder_start_token_id = tokenizer.ids["bos"]
        self.transform = recipe_transform(recipe)

    def build_model(self) -> nn.Module:
        return EncoderDecoderCaptioner(self.recipe.model)

    def train_data(self):
        m, d = self.recipe.model, self.recipe.data
        if d.stream:
            dataset = stream_pairs(d, self.root, self.transform, self.recipe.train.seed)
        else:
            dataset = PairDataset(load_pairs(d, self.root, "train"), self.transform, d.max_pixels)
        # + 1: the bos the collate drops from each row makes room for the eos
        return dataset, CaptionCollate(self.tokenizer, m.decoder.context_length + 1, m.decoder_start_token_id)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        inner = model.module if hasattr(model, "module") else model  # DDP wraps the model
        hidden = model(batch["pixel_values"], batch["decoder_input_ids"], return_hidden=True)
        return seq2seq_loss(hidden, inner.decoder.lm_head, batch["labels"])

    def pipeline(self, model: EncoderDecoderCaptioner) -> CaptionerPipeline:
        return CaptionerPipeline(model, self.tokenizer, self.transform, self.recipe.data.max_pixels)

    def evaluate(self, model: EncoderDecoderCaptioner, splits: list[str]) -> dict[str, float]:
        return evaluate_captioner(self.pipeline(model), self.recipe.data, self.root, splits, self.recipe.eval)

    def to_hf(self, model: EncoderDecoderCaptioner):
        return hf.to_hf(model, self.tokenizer, self.transform)

    @classmethod
    def hf_build(cls, folder: Path, config: dict) -> HFBuild:
        return hf.build(folder, config)

    @classmethod
    def hf_inputs(cls, folder: Path, model: EncoderDecoderCaptioner, tokenizer):
        return tokenizer, hf_folder.image_transform(folder, model.cfg.vision.image_size)

    @classmethod
    def hf_pipeline(cls, loaded: Loaded) -> CaptionerPipeline:
        return CaptionerPipeline(loaded.model, loaded.tokenizer, loaded.transform)


__all__ = ["EncoderDecoderFamily", "EncoderDecoderCaptioner", "EncoderDecoderConfig", "CaptionerPipeline"]
