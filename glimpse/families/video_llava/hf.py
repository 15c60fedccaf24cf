"""LLaVA-NeXT-Video folders (`LlavaNextVideoForConditionalGeneration`) -> glimpse's VideoLanguageModel.

The tensors are LLaVA's (glimpse/hub/llava.py); what a video adds is in config.json:
`spatial_pool_mode` ("average" or "max"; "conv", a learned pool, is refused) and `spatial_pool_stride`
are the pooler before the projector, and `video_token_index` is the slot a clip's tokens fill.
LLaVA-NeXT-Video has no frame positions (`frame_positions: false`), and reads any number of frames;
glimpse's model reads `num_frames` (8, the model card's example; set it when loading otherwise).
Images (LLaVA-NeXT's any-resolution tiles and `image_newline`) are not read: this is a video model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from glimpse.errors import GlimpseError
from glimpse.families.base import HFBuild
from glimpse.families.video_llava.model import VideoLanguageModel, VideoLLaVAConfig
from glimpse.hub import folder as hf
from glimpse.hub.llava import llava_config, llava_rules, llava_unused, normalize

MODEL_TYPES = ("llava_next_video",)
FRAMES = 8


def video_llava_config(c: dict, where: str, chat_template: str | None, num_frames: int = FRAMES) -> VideoLLaVAConfig:
    mode, stride = c.get("spatial_pool_mode", "average"), c.get("spatial_pool_stride", 2)
    if mode not in ("average", "max"):
        raise GlimpseError(f"{where}: spatial_pool_mode {mode!r} is not supported (average or max)")
    if not isinstance(stride, int) or stride < 1:
        raise GlimpseError(f"{where}: spatial_pool_stride {stride!r} must be a positive integer")
    token = c.get("video_token_index", c.get("video_token_id"))
    if token is None:
        raise GlimpseError(f"{where}: config.json names no video_token_index")
    base = llava_config(c, where, chat_template)
    if base.vision_feature_select != "patch":
        raise GlimpseError(f"{where}: a video model pools the patch grid: vision_feature_select_strategy must be "
                           "'default' (a tower with a class token)")
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    cfg = VideoLLaVAConfig(**{**fields, "image_token_id": token}, num_frames=num_frames, spatial_pool=mode,
                           spatial_pool_stride=stride, frame_positions=False)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    if grid < stride:
        raise GlimpseError(f"{where}: a {grid}x{grid} patch grid cannot be pooled with stride {stride}")
    return cfg


def build(folder: Path, c: dict) -> HFBuild:
    """The VideoLanguageModel (random weights), rules, tensors and unused patterns of a LLaVA-NeXT-Video folder."""
    cfg = video_llava_config(c, str(folder), hf.chat_template(folder))
    unused = (*llava_unused(cfg), r"(model\.)?image_newline")  # LLaVA-NeXT's row separator for images
    return HFBuild(VideoLanguageModel(cfg), llava_rules(cfg), normalize(hf.read_safetensors(folder)), unused)
