"""Checks of the parts' settings that several families share (a vision tower, a text tower, a
causal decoder), with errors that name the recipe key."""

from __future__ import annotations

import dataclasses

from glimpse.data.chat import TEMPLATES
from glimpse.errors import GlimpseError
from glimpse.models.layers import ACTIVATIONS
from glimpse.schema import check, choice


def check_patches(v, key: str = "model.vision") -> None:
    """A ViT's patches tile its images."""
    check(v.patch_size >= 1 and v.image_size % v.patch_size == 0, f"{key}.patch_size", v.patch_size,
          f"must divide image_size {v.image_size}")


def check_vision_grid(v, key: str = "model.vision") -> None:
    """A ViT's patches tile its images and its heads split its width."""
    check_patches(v, key)
    check(v.width % v.heads == 0, f"{key}.width", v.width, f"is not divisible by {v.heads} heads")


def check_towers(m) -> None:
    """The image and text towers of a model with `vision` and `text` sections."""
    choice("model.vision.pool", m.vision.pool, ("cls", "mean", "map"))
    check(m.vision.pool != "cls" or m.vision.class_token, "model.vision.pool", "cls", "needs model.vision.class_token")
    for tower in ("vision", "text"):
        t = getattr(m, tower)
        choice(f"model.{tower}.act", t.act, tuple(ACTIVATIONS))
        for k in ("width", "layers", "heads"):
            check(getattr(t, k) >= 1, f"model.{tower}.{k}", getattr(t, k), "must be at least 1")
        check(t.width % t.heads == 0, f"model.{tower}.width", t.width, f"is not divisible by {t.heads} heads")
    check_patches(m.vision)
    check(m.text.context_length >= 3, "model.text.context_length", m.text.context_length, "must be at least 3")


def check_decoder(m, key: str = "model") -> None:
    """A causal decoder's settings; its vocabulary comes from the tokenizer later."""
    try:
        dataclasses.replace(m, vocab_size=m.vocab_size or 1).resolved()
    except ValueError as e:
        raise GlimpseError(f"recipe section {key}: {e}") from None
    check(m.layers >= 1, f"{key}.layers", m.layers, "must be at least 1")
    check(m.context_length >= 3, f"{key}.context_length", m.context_length, "must be at least 3")


def check_vq(v, key: str) -> None:
    """The VQ-VAE settings a recipe may get wrong, each named."""
    check(len(v.block_out_channels) >= 1, f"{key}.block_out_channels", v.block_out_channels, "must name a block")
    for c in v.block_out_channels:
        check(c >= 1 and c % v.norm_num_groups == 0, f"{key}.block_out_channels", v.block_out_channels,
              f"every width must be a positive multiple of norm_num_groups ({v.norm_num_groups})")
    check(v.num_vq_embeddings >= 2, f"{key}.num_vq_embeddings", v.num_vq_embeddings, "must be at least 2")
    check(v.latent_channels >= 1, f"{key}.latent_channels", v.latent_channels, "must be at least 1")
    check(v.vq_embed_dim >= 0, f"{key}.vq_embed_dim", v.vq_embed_dim, "must be 0 (latent_channels) or more")
    check(v.sample_size % v.downsample == 0, f"{key}.sample_size", v.sample_size,
          f"must be a multiple of the downsampling factor {v.downsample}")
    check(v.codebook_groups >= 1 and v.embed_dim % v.codebook_groups == 0, f"{key}.codebook_groups",
          v.codebook_groups, f"must be at least 1 and divide the code width ({v.embed_dim})")


def check_llava(recipe) -> None:
    """What every LLaVA-style recipe (a VLMConfig's tower, LM, feature layer and chat template) must hold."""
    m = recipe.model
    check_decoder(m.lm, "model.lm")
    v = m.vision
    check_vision_grid(v)
    check(-v.layers <= m.vision_feature_layer < v.layers, "model.vision_feature_layer", m.vision_feature_layer,
          f"is not a layer of a {v.layers}-layer tower")
    check(m.chat_template in TEMPLATES or "{" in m.chat_template, "model.chat_template", m.chat_template,
          f"is neither a Jinja template nor one of {', '.join(TEMPLATES)}")
    check(not recipe.train.cache_vision_features or "vision" in recipe.freeze, "train.cache_vision_features",
          True, "needs the vision tower in the freeze list (a training tower changes its features)")
