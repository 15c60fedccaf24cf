"""The family interface: everything the trainer, `glimpse.load`, `glimpse eval`, `glimpse convert`,
`glimpse serve` and the demo need to know about one family of models.

A family is a subclass of `Family`, registered by name (`glimpse.families.register`).  Its class
holds what is known before a run exists (the `model:` dataclass and its checks, which Hugging Face
folders it reads); an instance is one run's view of it: the recipe, the data root, the tokenizer.
Nothing outside glimpse/families names a family: the rest of glimpse looks it up by the recipe's
`family:` or a folder's `model_type` and calls these methods.  docs/adding-a-family.md walks
through writing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from glimpse import runs
from glimpse.data.images import ImageTransform
from glimpse.errors import GlimpseError


@dataclass
class HFBuild:
    """What a family makes of a Hugging Face folder: its module (random weights), the rules that map
    the folder's tensors onto it (glimpse.hub.mapping), the tensors, and the patterns of tensors it
    may leave unused (a pooler that a mean-pooled tower never reads)."""
    model: nn.Module
    rules: list
    tensors: dict[str, torch.Tensor]
    unused: tuple[str, ...] = ()


@dataclass
class Loaded:
    """A model loaded from a Hugging Face folder, with how it reads its input."""
    family: str
    model: nn.Module
    config: dict  # the folder's config.json
    folder: Path
    tokenizer: object  # a Tokenizer, or a NoTokenizer that explains itself when text is needed
    transform: ImageTransform | None = None


# The pipeline protocol: what a pipeline can do is told by the methods it has.  The server and the command
# line ask these, never which family made the pipeline.
CHAT_METHODS = ("chat", "chat_prompt", "complete", "context_length", "tokenizer")  # /v1/chat/completions, ask, chat
EMBED_METHODS = ("embed_texts", "embed_images")  # /v1/embeddings: one of them at least
IMAGE_METHODS = ("generate_images", "image_size")  # /v1/images/generations: PIL images of image_size pixels square
RECOMMEND_METHODS = ("recommend", "recommend_users")  # /v1/recommendations


def can_chat(pipeline) -> bool:
    return all(hasattr(pipeline, m) for m in CHAT_METHODS)


def can_embed(pipeline) -> bool:
    return any(hasattr(pipeline, m) for m in EMBED_METHODS)


def can_generate_images(pipeline) -> bool:
    return all(hasattr(pipeline, m) for m in IMAGE_METHODS)


def can_recommend(pipeline) -> bool:
    return all(hasattr(pipeline, m) for m in RECOMMEND_METHODS)


def can_explain(pipeline) -> bool:
    """`glimpse explain`, `glimpse eval --explain`: an `explainer` and what it explains (`explains`: "texts" or
    "questions"; None where a subclass has no explanations, as the video LLaVA's clips)."""
    return hasattr(pipeline, "explainer") and getattr(pipeline, "explains", None) is not None


def can_explain_chat(pipeline) -> bool:
    """`POST /v1/explain`: a chat model whose answers are explained (`prompt_explainer`)."""
    return can_explain(pipeline) and hasattr(pipeline, "prompt_explainer")


def recipe_transform(recipe, vision=None) -> ImageTransform:
    """A recipe's image preprocessing: its vision tower's image size (`vision`, or the model's) and its
    data set's pixel statistics."""
    d = recipe.data
    stats = {k: tuple(v) for k, v in (("mean", d.image_mean), ("std", d.image_std)) if v is not None}
    return ImageTransform((vision or recipe.model.vision).image_size, **stats)


def vq_transform(cfg) -> ImageTransform:
    """An image tokenizer's preprocessing (a VQConfig's): pixels in [-1, 1], as diffusers' and taming's
    autoencoders take them."""
    return ImageTransform(cfg.sample_size, mean=0.5, std=0.5)


class Family:
    name: ClassVar[str]  # the recipe's `family:` value
    config: ClassVar[type]  # the dataclass that the recipe's `model:` section maps onto
    # trainer options beyond the plain loop that this family implements; the recipe check refuses them
    # for the others: "padding_groups" (a batch run as length-sorted parts), "cache_vision_features"
    train_options: ClassVar[frozenset[str]] = frozenset()
    data_formats: ClassVar[tuple[str, ...]] = ("coco", "csv", "wds")  # the data.format values it trains on
    # train_data reads WebDataset shards as a stream (glimpse.data.stream) when the recipe sets data.stream
    streams: ClassVar[bool] = False
    hf_model_types: ClassVar[tuple[str, ...]] = ()  # the config.json model_type values it loads
    hf_class_names: ClassVar[tuple[str, ...]] = ()  # diffusers folders: the config.json _class_name values it loads

    # -- before a run: the recipe ---------------------------------------------------------------
    @classmethod
    def validate(cls, recipe) -> None:
        """Choices and ranges of the recipe's `model:` section (and anything else this family needs of
        the recipe), checked before anything is built; a GlimpseError names the key."""

    # -- one run ------------------------------------------------------------------------------------
    def __init__(self, recipe, root: Path, tokenizer):
        self.recipe, self.root, self.tokenizer = recipe, root, tokenizer
        self.transform: ImageTransform | None = None  # families that read images set theirs

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def load_init(self, model: nn.Module, weights: Path) -> None:
        """`init: RUN`: the whole model from another run's weights (strict by default; a family may
        take another member's run its own way, with new heads)."""
        runs.load_weights(model, weights)

    def prepare(self, model: nn.Module, device: torch.device, progress: bool) -> None:
        """Once before the first step, with the weights training starts from (a frozen tower's features)."""

    def run_files(self) -> dict[str, str]:
        """Files the run folder keeps beside its weights (name -> text), written when training starts: what
        a loaded run reads from its own folder rather than from its data (the recommender's catalogue)."""
        return {}

    def finish(self, model: nn.Module, device: torch.device) -> None:
        """Once after the last step, before the final checkpoint (the recommender calibrates its cold
        items on the validation split here)."""

    def train_data(self):
        """(dataset, collate): items are keyed as the trainer's sampler keys them, or the dataset is a
        torch IterableDataset that orders itself (a glimpse.data.stream.ShardStream, `data.stream`); a
        collated batch holds "status" (None or a failure reason per sample) and "messages"."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, splits: list[str]) -> dict[str, float]:
        """Flat `split/metric` figures, with how many samples they were computed over (`split/n`, or
        `split/vqa_n` and the like for figures over other sets) and `split/skipped` (unreadable images)."""
        raise NotImplementedError

    def pipeline(self, model: nn.Module):
        """What `glimpse.load` returns for a run of this family."""
        raise NotImplementedError

    def to_hf(self, model: nn.Module):
        """The Hugging Face folder of a trained model (a glimpse.hub.export.HFFolder), or a GlimpseError
        saying why there is none."""
        raise GlimpseError(f"export: the {self.name} family has no Hugging Face counterpart")

    # -- Hugging Face folders ---------------------------------------------------------------------
    @classmethod
    def hf_build(cls, folder: Path, config: dict) -> HFBuild:
        raise GlimpseError(f"{folder}: the {cls.name} family loads no Hugging Face folders")

    @classmethod
    def hf_inputs(cls, folder: Path, model: nn.Module, tokenizer) -> tuple[object, ImageTransform | None]:
        """(tokenizer, image preprocessing) of a loaded folder: the folder's tokenizer as it is, and no
        images, unless the family reads its preprocessor_config.json or marks special tokens."""
        return tokenizer, None

    @classmethod
    def hf_pipeline(cls, loaded: Loaded):
        raise NotImplementedError

    @classmethod
    def hf_part(cls, folder: Path, config: dict, target: nn.Module) -> tuple[list, dict, tuple]:
        """(rules, tensors, unused) that fill `target`, a part of another model (a vision tower, a text
        tower, a language model), from this family's folder: a recipe's `init_parts`."""
        raise GlimpseError(f"{folder} ({config.get('model_type')}) holds no {type(target).__name__}")
