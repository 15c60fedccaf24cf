"""Flamingo: a frozen language model that reads images through gated cross-attention blocks inserted
every n layers, with a Perceiver resampler on a frozen vision tower (OpenFlamingo; IDEFICS v1 folders).
Prompts interleave images and text, `<image>Output: ...<|endofchunk|>`, and each text token reads only
the latest image before it: the design by which Flamingo learns from solved examples in its prompt.
On the shapes world, `shapes-flamingo` learns it from binding episodes whose examples are mostly in the
LM's own text form ("red dakim"), the query an image (`model.episode_text_share`; docs/results.md,
session 16).

    model.py      FlamingoModel (FlamingoConfig)
    data.py       interleaved sequences from the shapes world: captions and binding episodes
    evaluate.py   few-shot binding accuracy by k (and its shuffled-image control), k-shot captions
    pipeline.py   what glimpse.load returns: caption, ask, chat with several images in place
    hf.py         IDEFICS v1 folders in; OpenFlamingo checkpoints' names
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.errors import GlimpseError
from glimpse.families import checks
from glimpse.families.base import Family, HFBuild, Loaded, recipe_transform
from glimpse.families.feature_cache import cache_tower_features
from glimpse.families.flamingo import hf
from glimpse.families.flamingo.data import (
    END_OF_CHUNK,
    InterleavedCollate,
    InterleavedDataset,
    read_scenes,
    stream_documents,
)
from glimpse.families.flamingo.evaluate import evaluate_flamingo
from glimpse.families.flamingo.model import FlamingoConfig, FlamingoModel
from glimpse.families.flamingo.pipeline import FlamingoPipeline
from glimpse.families.registry import register
from glimpse.hub import folder as hf_folder
from glimpse.losses import lm_loss_at_targets
from glimpse.models.gated_xattn import GATES, STYLES
from glimpse.schema import check, choice


def add_end_of_chunk(tokenizer) -> int:
    """The tokenizer's <|endofchunk|> id, added after its vocabulary when it has none (the same id every
    time: a run's saved tokenizer.json gets it back on loading)."""
    vocab = tokenizer.hf.get_vocab()
    if END_OF_CHUNK not in vocab:
        tokenizer.hf.add_special_tokens([END_OF_CHUNK])
        vocab = tokenizer.hf.get_vocab()
    tokenizer.ids["endofchunk"] = vocab[END_OF_CHUNK]
    return vocab[END_OF_CHUNK]


@register
class FlamingoFamily(Family):
    name = "flamingo"
    config = FlamingoConfig
    hf_model_types = hf.MODEL_TYPES
    train_options = frozenset({"cache_vision_features"})
    streams = True  # interleaved documents (MMC4 / OBELICS in shards); evaluation and episodes need the world

    @classmethod
    def validate(cls, recipe) -> None:
        m = recipe.model
        checks.check_vision_grid(m.vision)
        checks.check_decoder(m.lm, "model.lm")
        choice("model.style", m.style, STYLES)
        choice("model.gate", m.gate, GATES)
        choice("model.vision_feature_select", m.vision_feature_select, ("patch", "full"))
        check(m.xattn_every >= 1, "model.xattn_every", m.xattn_every, "must be at least 1")
        check(-1 <= m.xattn_offset < m.xattn_every, "model.xattn_offset", m.xattn_offset,
              "must be -1 (the style's) or a layer index below xattn_every")
        for key in ("resampler_depth", "resampler_heads", "resampler_head_dim", "resampler_latents", "max_images"):
            check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be at least 1")
        check(m.episode_colours >= 2, "model.episode_colours", m.episode_colours, "must be at least 2")
        check(0.0 <= m.episode_share <= 1.0, "model.episode_share", m.episode_share, "must be between 0 and 1")
        check(0.0 <= m.episode_text_share <= 1.0, "model.episode_text_share", m.episode_text_share,
              "must be between 0 and 1")
        check(m.max_shots >= 0, "model.max_shots", m.max_shots, "must be at least 0")
        check(not recipe.train.cache_vision_features or "vision" in recipe.freeze, "train.cache_vision_features",
              True, "needs the vision tower in the freeze list (a training tower changes its features)")
        d, e = recipe.data, recipe.eval
        choice("data.source", d.source, ("shapes", "wds"))
        if d.source == "wds":
            check(d.stream, "data.source", "wds", "interleaved documents are read as a stream: set data.stream true")
            check(not recipe.train.cache_vision_features, "train.cache_vision_features", True,
                  "caches the features of a set read whole: not with data.stream")
            check(not e.splits and not e.during_train, "eval.splits/during_train", [*e.splits, *e.during_train],
                  "Flamingo evaluates on the shapes world's episodes: set eval.splits=[] and eval.during_train=[]")

    def __init__(self, recipe, root: Path, tokenizer):
        super().__init__(recipe, root, tokenizer)
        m = recipe.model
        if tokenizer.ids.get("image") is None:
            raise GlimpseError(f"the tokenizer {tokenizer.path} has no <image> token")
        base = tokenizer.vocab_size
        m.end_of_chunk_token_id = add_end_of_chunk(tokenizer)
        m.lm.vocab_size = m.lm.vocab_size or base
        m.extra_tokens = tokenizer.vocab_size - m.lm.vocab_size
        m.image_token_id = tokenizer.ids["image"]
        self.transform = recipe_transform(recipe)
        self.image_rows, self.feature_cache = None, None  # see prepare()

    def prepare(self, model: FlamingoModel, device: torch.device, progress: bool = True) -> None:
        """With `train.cache_vision_features`: the frozen tower's features of every training image, once."""
        if self.recipe.train.cache_vision_features:
            c = model.cfg
            scenes = read_scenes(self.recipe.data, self.root, "train")
            self.image_rows, self.feature_cache = cache_tower_features(
                model, [s.image for s in scenes], self.transform, self.recipe.data.max_pixels, device,
                self.recipe.eval.batch_size, progress,
                settings=(c.vision_feature_layer, c.vision_feature_select, c.vision_feature_norm))

    def build_model(self) -> nn.Module:
        return FlamingoModel(self.recipe.model)

    def train_data(self):
        m, d = self.recipe.model, self.recipe.data
        if d.stream:
            return stream_documents(d, self.root, self.tokenizer, self.transform, m.max_images, m.lm.context_length,
                                    self.recipe.train.seed), InterleavedCollate(self.tokenizer.pad_id)
        dataset = InterleavedDataset(read_scenes(d, self.root, "train"), self.tokenizer, self.transform, d.max_pixels,
                                     max_images=m.max_images, max_shots=m.max_shots, colours=m.episode_colours,
                                     episode_share=m.episode_share, text_share=m.episode_text_share, context_length=m.lm.context_length,
                                     seed=self.recipe.train.seed, image_rows=self.image_rows)
        return dataset, InterleavedCollate(self.tokenizer.pad_id)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        inner = model.module if hasattr(model, "module") else model  # DDP wraps the model
        if "image_rows" in batch:  # the frozen tower's features, cached (prepare)
            images = {"image_features": self.feature_cache[batch["image_rows"]]}
        else:
            images = {"pixel_values": batch["pixel_values"]}
        hidden = model(batch["input_ids"], batch["attention_mask"], image_valid=batch["image_valid"],
                       return_hidden=True, **images)
        return lm_loss_at_targets(hidden, inner.lm_head, batch["labels"])

    def pipeline(self, model: FlamingoModel) -> FlamingoPipeline:
        return FlamingoPipeline(model, self.tokenizer, self.transform, self.recipe.data.max_pixels)

    def evaluate(self, model: FlamingoModel, splits: list[str]) -> dict[str, float]:
        r = self.recipe
        model.eval()
        return evaluate_flamingo(model, self.tokenizer, self.transform, r.data, self.root, splits, r.eval, r.model)

    @classmethod
    def hf_build(cls, folder: Path, config: dict) -> HFBuild:
        return hf.build(folder, config)

    @classmethod
    def hf_inputs(cls, folder: Path, model: FlamingoModel, tokenizer):
        if tokenizer:
            tokenizer.ids["image"] = model.cfg.image_token_id
        return tokenizer, hf_folder.image_transform(folder, model.cfg.vision.image_size)

    @classmethod
    def hf_pipeline(cls, loaded: Loaded) -> FlamingoPipeline:
        return FlamingoPipeline(loaded.model, loaded.tokenizer, loaded.transform)


__all__ = ["FlamingoFamily", "FlamingoModel", "FlamingoConfig", "FlamingoPipeline"]
