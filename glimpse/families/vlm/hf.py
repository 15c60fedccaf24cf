"""LLaVA (`LlavaForConditionalGeneration`) folders <-> glimpse's VisionLanguageModel, in and out.  The
tensor map (vision_tower / multi_modal_projector / language_model, and the names other transformers
versions use) is glimpse/hub/llava.py, shared with the video LLaVA's LLaVA-NeXT-Video folders.

`vision_feature_layer` and `vision_feature_select_strategy` map onto VLMConfig's
`vision_feature_layer` and `vision_feature_select` ("default" drops the class token: "patch")."""

from __future__ import annotations

import json
from pathlib import Path

from glimpse.data.chat import TEMPLATES
from glimpse.errors import GlimpseError
from glimpse.families.base import HFBuild
from glimpse.families.vlm.model import VisionLanguageModel, VLMConfig
from glimpse.hub import folder as hf
from glimpse.hub.decoder import hf_decoder_config, lm_part
from glimpse.hub.export import HFFolder, special_tokens, token_ids, token_names
from glimpse.hub.llava import (
    MODULE_PREFIXES,
    PARTS_PREFIX,
    llava_config,
    llava_rules,
    llava_unused,
    normalize,
)
from glimpse.hub.towers import hf_vision_config, vision_part
from glimpse.models.decoder import CausalLM
from glimpse.models.vision import VisionTransformer

MODEL_TYPES = ("llava",)
def hf_llava_config(cfg: VLMConfig) -> dict:
    """A LlavaForConditionalGeneration config.json, or an error naming what HF's LLaVA cannot compute."""
    if cfg.connector != "mlp2x_gelu" or cfg.pixel_shuffle != 1 or cfg.image_positions or cfg.projector_norm:
        extras = [name for name, on in (("learned image positions", cfg.image_positions),
                                        ("a projector norm", cfg.projector_norm)) if on]
        raise GlimpseError(f"export: LLaVA has an mlp2x_gelu projector on the patch tokens; this model's connector "
                           f"is {cfg.connector!r} with pixel_shuffle {cfg.pixel_shuffle}"
                           f"{''.join(' and ' + e for e in extras)}, which it cannot express")
    vision = hf_vision_config(cfg.vision, for_llava=True)
    if cfg.vision_feature_select == "patch" and not cfg.vision.class_token:
        strategy = "full"  # glimpse keeps every patch of a tower without a class token: HF's "full"
    else:
        strategy = "default" if cfg.vision_feature_select == "patch" else "full"
    lm = cfg.lm.resolved()
    text = hf_decoder_config(lm)
    if lm.arch != "llama":
        raise GlimpseError("export: LLaVA's language model must be Llama-family, not GPT-2")
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "vision_config": vision, "text_config": text, "image_token_index": cfg.image_token_id,
            "image_seq_length": VisionLanguageModel.count_image_tokens(cfg),
            "vision_feature_layer": cfg.vision_feature_layer, "vision_feature_select_strategy": strategy,
            "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
            "tie_word_embeddings": lm.tie_embeddings}


def build(folder: Path, c: dict) -> HFBuild:
    """The VisionLanguageModel (random weights), rules, tensors and unused patterns of a LLaVA folder."""
    cfg = llava_config(c, str(folder), hf.chat_template(folder))
    return HFBuild(VisionLanguageModel(cfg), llava_rules(cfg), normalize(hf.read_safetensors(folder)), llava_unused(cfg))


def part(folder: Path, c: dict, target) -> tuple[list, dict, tuple]:
    """The vision tower or the language model of a LLaVA folder, for a recipe's init_parts."""
    where = str(folder)
    sd = normalize(hf.read_safetensors(folder))
    if isinstance(target, VisionTransformer):
        vc = {"model_type": "clip_vision_model", **(c.get("vision_config") or {})}
        return vision_part(vc, sd, "vision_tower.", target, where)
    if isinstance(target, CausalLM):
        lm = {k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")}
        return lm_part(c.get("text_config") or {}, lm, target, where)
    raise GlimpseError(f"{where} (llava) holds no {type(target).__name__}")


def to_hf(model: VisionLanguageModel, tok, transform) -> HFFolder:
    """A LlavaForConditionalGeneration folder, with the processor files vLLM and transformers read."""
    config, rules = hf_llava_config(model.cfg), llava_rules(model.cfg)
    ids = token_ids(tok)
    config.update(ids)
    config["text_config"].update(ids)
    names = token_names(tok)
    specials = {**special_tokens(tok), "image_token": names.get("image")}
    t = model.cfg.chat_template
    v = model.cfg.vision
    processor = {"processor_class": "LlavaProcessor", "patch_size": v.patch_size, "image_token": names["image"],
                 "vision_feature_select_strategy": config["vision_feature_select_strategy"],
                 "num_additional_image_tokens": int(v.class_token)}
    return HFFolder(config, dict(model.state_dict()), rules, json.loads(Path(tok.path).read_text()), specials,
                    model.cfg.lm.context_length, tokenizer_config={"extra_special_tokens": {"image_token": names["image"]}},
                    chat_template=PARTS_PREFIX + TEMPLATES.get(t, t), generation_config=ids, transform=transform,
                    files={"processor_config.json": processor}, module_prefixes=MODULE_PREFIXES)
