"""Vision-language decoder: image tower -> connector -> the `<image>` positions of a causal LM.

Frozen and LLaVA are this one class with a different connector, freeze policy and data
(DESIGN.md).  The text carries one `<image>` token per image *feature*: the processor expands
each image's single placeholder to `image_tokens` copies (as transformers' LLaVA processor
does), and the model swaps the copies for the features in order.  A count that does not
match is an error, never a silent misalignment.

Feature choice follows transformers' LLaVA: `vision_feature_layer` counts hidden states from
the end (-1: the last block's output, -2: the one before; the tower's post-norm is not
applied), and `vision_feature_select` "patch" drops the class token (HF "default") while
"full" keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from glimpse.models.connectors import PrefixMapper, Projector, pixel_shuffle
from glimpse.models.decoder import CausalLM, DecoderConfig, KVCache
from glimpse.models.vision import VisionConfig, VisionTransformer


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: DecoderConfig = field(default_factory=DecoderConfig)
    connector: str = "mlp2x_gelu"  # linear | mlp2x_gelu | prefix
    prefix_tokens: int = 4  # prefix connector: tokens per image
    prefix_source: str = "pooled"  # prefix connector: from the pooled feature | groups of patch tokens
    vision_feature_layer: int = -1
    vision_feature_select: str = "patch"  # patch | full
    pixel_shuffle: int = 1  # fold f x f patches into one token (projector connectors)
    image_positions: bool = False  # projector connectors: add a learned embedding per image-token position
    projector_norm: bool = False  # projector connectors: LayerNorm the features first (InternVL, Qwen2-VL)
    image_token_id: int = -1  # the tokenizer's <image>; set from the tokenizer when the model is built
    chat_template: str = "compact"  # a glimpse.data.chat template name or a Jinja source


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        if cfg.image_token_id < 0:
            raise ValueError("image_token_id must be set (the tokenizer's <image> id)")
        if cfg.vision_feature_select not in ("patch", "full"):
            raise ValueError(f"vision_feature_select {cfg.vision_feature_select!r} must be patch or full")
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.lm = CausalLM(cfg.lm)
        d_lm = self.lm.cfg.width
        width = self.feature_width(cfg)
        if cfg.connector == "prefix":
            self.connector = PrefixMapper(width, d_lm, cfg.prefix_tokens, cfg.prefix_source)
        else:
            self.connector = Projector(cfg.connector, width * cfg.pixel_shuffle**2, d_lm,
                                       self.image_tokens if cfg.image_positions else 0, cfg.projector_norm)

    @staticmethod
    def feature_width(cfg: VLMConfig) -> int:
        """The width of a tower feature, what the connector reads per token (before pixel shuffle)."""
        return cfg.vision.width

    def feature_towers(self) -> list[nn.Module]:
        """The towers whose weights decide `tower_features` (what a feature cache must recognise)."""
        return [self.vision]

    @property
    def image_tokens(self) -> int:
        """How many `<image>` tokens stand for one image in the text."""
        return self.count_image_tokens(self.cfg)

    @staticmethod
    def count_image_tokens(cfg: VLMConfig) -> int:
        if cfg.connector == "prefix":
            return cfg.prefix_tokens
        v = cfg.vision
        n = (v.image_size // v.patch_size) ** 2 + int(cfg.vision_feature_select == "full" and v.class_token)
        return n // cfg.pixel_shuffle**2

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the vision tower hands the connector: [N, T, Dv] patch features of the chosen layer
        (or [N, Dv] pooled, for the pooled prefix mapper).  A frozen tower's are cacheable."""
        if self.cfg.connector == "prefix" and self.cfg.prefix_source == "pooled":
            return self.vision(pixel_values)
        return self.patch_features(self.vision, pixel_values)

    def patch_features(self, tower: VisionTransformer, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, T, Dv]: `tower`'s features of the chosen layer, its class token dropped
        when only patches are kept."""
        x = tower.forward_features(pixel_values, layer=self.cfg.vision_feature_layer)
        if self.cfg.vision_feature_select == "patch" and tower.class_token is not None:
            x = x[:, 1:]
        return x

    def project(self, tower_features: torch.Tensor) -> torch.Tensor:
        """Tower features -> [N_images, image_tokens, lm width]."""
        if self.cfg.connector == "prefix":
            return self.connector(tower_features)
        return self.connector(pixel_shuffle(tower_features, self.cfg.pixel_shuffle))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N_images, 3, H, W] -> [N_images, image_tokens, lm width]."""
        return self.project(self.tower_features(pixel_values))

    def merge(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the `<image>` positions replaced, in reading order, by
        the image features [N_images, image_tokens, D] (images in the order they appear)."""
        embeds = self.lm.embed(input_ids)
        slots = input_ids == self.cfg.image_token_id  # [B, T]
        n_slots = int(slots.sum())
        n_feats = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            n_img = 0 if image_features is None else image_features.shape[0]
            raise ValueError(f"the text holds {n_slots} <image> tokens but {n_img} images give {n_feats} "
                             f"features ({self.image_tokens} per image)")
        if n_feats:
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), image_features.to(embeds.dtype).reshape(-1))
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False,
                tower_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (or hidden states, see CausalLM); `pixel_values` holds every image of
        the batch in reading order, or `tower_features` their precomputed `tower_features`."""
        if tower_features is not None:
            feats = self.project(tower_features)
        else:
            feats = None if pixel_values is None else self.get_image_features(pixel_values)
        return self.lm(inputs_embeds=self.merge(input_ids, feats), attention_mask=attention_mask,
                       position_ids=position_ids, cache=cache, return_hidden=return_hidden)
