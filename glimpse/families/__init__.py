"""Families of models, one folder each, registered by name: the recipe's `family:` and a Hugging Face
folder's `model_type` find theirs here.

    dual_encoder   CLIP, SigLIP: contrastive image and text towers
    causal_lm      Llama, Qwen2, GPT-2: a language model pretrained on a data set's text
    vlm            LLaVA, Frozen: a vision tower read by a causal LM at <image> positions
    fusion         ALBEF: text attends to the image through fusion layers; ITC + ITM + MLM, or VQA
    encoder_decoder  ViT + GPT-2 captioners (VisionEncoderDecoder): cross-attention in every decoder block
    flamingo       a frozen LM reading images through gated cross-attention blocks; interleaved prompts
    vq             image tokenizers: a VQ-VAE (diffusers' VQModel layout), images to code grids and back
    text_to_image  DALL-E style: a MaskGIT or autoregressive prior over VQ codes, read from CLIP text states
    video_clip     CLIP4Clip: the image tower per frame, pooled over time (meanP, seqTransf); text-video retrieval
    video_llava    LLaVA-NeXT-Video: frames through the tower, pooled, with a temporal position each, read by an LM
    recommender    a two-tower recommender (glimpse towers for items, SASRec for users); BPR-MF and VBPR baselines

A new family is a subclass of `Family` decorated with `@register` (docs/adding-a-family.md).
"""

from glimpse.families.base import Family, HFBuild, Loaded, recipe_transform
from glimpse.families.registry import (
    all_families,
    get,
    hf_pipeline,
    init_from_hf,
    init_part_from_hf,
    load_hf,
    names,
    register,
)

# the built-in families register themselves on import
from glimpse.families import causal_lm, dual_encoder, encoder_decoder, flamingo, fusion, recommender, text_to_image, video_clip, video_llava, vlm, vq  # noqa: E402,F401  isort: skip

__all__ = ["Family", "HFBuild", "Loaded", "all_families", "get", "hf_pipeline", "recipe_transform",
           "init_from_hf", "init_part_from_hf", "load_hf", "names", "register"]
