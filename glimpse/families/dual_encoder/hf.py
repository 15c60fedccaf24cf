"""CLIP and SigLIP folders <-> the dual encoder; single-tower folders (CLIPVisionModel, CLIPTextModel,
SiglipVisionModel, SiglipTextModel, BertModel and sentence-transformers' BERT encoders) as one-tower
encoders.  The towers' own maps are glimpse.hub.towers; here are the projections and temperature:

    glimpse dual encoder            CLIPModel / SiglipModel
    vision.*, text.*                vision_model.*, text_model.*       (glimpse/hub/towers.py)
    visual_projection               visual_projection                  (SigLIP: none, the pooled output)
    text_projection                 text_projection                    (SigLIP: text_model.head, with bias)
    logit_scale, logit_bias         logit_scale, logit_bias            (SigLIP: shape [1])

Export writes a CLIPModel folder.  transformers' CLIP text model pools with a legacy rule when the
eos id is 2 (the highest token id instead of the eos): glimpse's own tokenizers put the eos at 2,
so the export swaps ids 2 and V-1 in the tokenizer and the embedding table together, which
changes no output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glimpse.errors import GlimpseError
from glimpse.families.base import HFBuild
from glimpse.families.dual_encoder.model import DualEncoder, DualEncoderConfig, ImageEncoder, TextEncoder
from glimpse.hub import folder as hf
from glimpse.hub.export import HFFolder, special_tokens
from glimpse.hub.mapping import SCALAR, params, rule
from glimpse.hub.parts import BERT_UNUSED, TOWER_UNUSED, prefix_of, strip
from glimpse.hub.towers import (
    hf_text_config,
    hf_vision_config,
    text_config,
    text_part,
    text_rules,
    vision_config,
    vision_part,
    vision_rules,
)
from glimpse.models.text import TextTransformer
from glimpse.models.vision import VisionTransformer

DUAL_TYPES = ("clip", "siglip")
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
TEXT_TYPES = ("clip_text_model", "siglip_text_model", "bert")
MODEL_TYPES = DUAL_TYPES + VISION_TYPES + TEXT_TYPES


def dual_config(c: dict, where: str) -> DualEncoderConfig:
    """A glimpse DualEncoderConfig from a CLIPModel / SiglipModel config.json."""
    vision, vkind = vision_config({**c.get("vision_config", {}), "model_type": c["model_type"] + "_vision_model"},
                                  where)
    text, _ = text_config({**c.get("text_config", {}), "model_type": c["model_type"] + "_text_model"}, where)
    if vkind == "siglip":
        if vision.pool != "map":
            raise GlimpseError(f"{where}: a SigLIP model without its vision head has no image features")
        proj = c.get("text_config", {}).get("projection_size") or text.width
        return DualEncoderConfig(vision=vision, text=text, embed_dim=proj, loss="siglip", projection_bias=True,
                                 vision_projection=False)
    return DualEncoderConfig(vision=vision, text=text, embed_dim=c.get("projection_dim", 512), loss="clip")


def dual_rules(cfg: DualEncoderConfig) -> list:
    text_kind = "siglip" if cfg.loss == "siglip" else "clip"
    rules = vision_rules(cfg.vision, "vision_model.") + text_rules(cfg.text, text_kind, "text_model.")
    if cfg.loss == "siglip":
        rules += params([rule("text_projection.{p}", "text_model.head.{p}")])
        rules += [rule("logit_scale", "logit_scale", *SCALAR), rule("logit_bias", "logit_bias", *SCALAR)]
    else:
        rules += [rule("visual_projection.weight", "visual_projection.weight"),
                  rule("text_projection.weight", "text_projection.weight"), rule("logit_scale", "logit_scale")]
    return rules


def hf_dual_config(cfg: DualEncoderConfig) -> dict:
    """A CLIPModel config.json for a glimpse dual encoder, or an error saying why it cannot be one."""
    if cfg.loss != "clip" or not cfg.vision_projection or cfg.projection_bias:
        raise GlimpseError("export: only CLIP-style dual encoders (InfoNCE, bias-free projections) export to a "
                           "CLIP folder")
    vision = hf_vision_config(cfg.vision)
    if vision["model_type"] != "clip_vision_model":
        raise GlimpseError("export: a CLIP folder needs a CLIP-shaped vision tower (class token, pre-norm, cls pool)")
    text = hf_text_config(cfg.text)
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
            "logit_scale_init_value": 2.6592, "vision_config": vision, "text_config": text}


def build(folder: Path, c: dict) -> HFBuild:
    """The module (random weights), rules, tensors and unused patterns of a dual or one-tower folder."""
    where, mt = str(folder), c.get("model_type", "")
    if mt in DUAL_TYPES:
        cfg = dual_config(c, where)
        return HFBuild(DualEncoder(cfg), dual_rules(cfg), hf.read_safetensors(folder), TOWER_UNUSED)
    sd = hf.read_safetensors(folder)
    if mt in VISION_TYPES:
        vcfg, _ = vision_config(c, where)
        proj = "visual_projection.weight" in sd
        model = ImageEncoder(vcfg, c.get("projection_dim", 512) if proj else 0)
        rules = vision_rules(vcfg, prefix_of(sd, "vision_model."))
        if proj:
            rules.append(rule("visual_projection.weight", "visual_projection.weight"))
        return HFBuild(model, rules, sd, TOWER_UNUSED)
    tcfg, tkind = text_config(c, where, hf.sentence_pooling(folder))
    if tkind == "bert":
        return HFBuild(TextEncoder(tcfg), text_rules(tcfg, "bert", ""), strip(sd, "bert."), BERT_UNUSED)
    prefix = prefix_of(sd, "text_model.")
    rules = text_rules(tcfg, tkind, prefix)
    if tkind == "siglip":
        model = TextEncoder(tcfg, c.get("projection_size") or tcfg.width, projection_bias=True)
        rules += [rule("text_projection.weight", prefix + "head.weight"),
                  rule("text_projection.bias", prefix + "head.bias")]
    elif "text_projection.weight" in sd:
        model = TextEncoder(tcfg, c.get("projection_dim", 512))
        rules.append(rule("text_projection.weight", "text_projection.weight"))
    else:
        model = TextEncoder(tcfg)
    return HFBuild(model, rules, sd, TOWER_UNUSED)


def part(folder: Path, c: dict, target) -> tuple[list, dict, tuple]:
    """A vision or text tower of a dual or one-tower folder, for a recipe's init_parts."""
    where, mt = str(folder), c.get("model_type", "")
    sd = hf.read_safetensors(folder)
    if isinstance(target, VisionTransformer) and mt not in TEXT_TYPES:
        vc = c if mt in VISION_TYPES else {**c.get("vision_config", {}), "model_type": mt + "_vision_model"}
        return vision_part(vc, sd, prefix_of(sd, "vision_model."), target, where)
    if isinstance(target, TextTransformer) and mt not in VISION_TYPES:
        if mt == "bert":
            sd = {k: v for k, v in strip(sd, "bert.").items() if not k.startswith(("pooler.", "cls."))}
            return text_part(c, sd, "", target, where)
        prefix = prefix_of(sd, "text_model.")
        tc = c if mt in TEXT_TYPES else {**c.get("text_config", {}), "model_type": mt + "_text_model"}
        sd = {k: v for k, v in sd.items() if k.startswith(prefix)
              and not k.startswith((prefix + "head.", "text_projection.", "visual_projection.", "logit_"))}
        return text_part(tc, sd, prefix, target, where)
    part = {VisionTransformer: "vision tower", TextTransformer: "text tower"}.get(type(target), type(target).__name__)
    raise GlimpseError(f"{where} ({mt}) has no {part}")


def _swap_ids(tok: dict, a: int, b: int) -> dict:
    """tokenizer.json with token ids a and b exchanged (vocabulary, added tokens, post-processor)."""
    swap = {a: b, b: a}
    vocab = tok["model"].get("vocab")
    if not isinstance(vocab, dict):
        raise GlimpseError("export: cannot renumber this tokenizer's vocabulary (not a BPE / word-level vocab)")
    tok["model"]["vocab"] = {t: swap.get(i, i) for t, i in vocab.items()}
    for t in tok.get("added_tokens") or []:
        t["id"] = swap.get(t["id"], t["id"])
    post = tok.get("post_processor") or {}
    for st in (post.get("special_tokens") or {}).values():
        st["ids"] = [swap.get(i, i) for i in st.get("ids", [])]
    return tok


def to_hf(model: DualEncoder, tok, transform) -> HFFolder:
    """A CLIPModel folder of a CLIP-shaped dual encoder."""
    config, rules = hf_dual_config(model.cfg), dual_rules(model.cfg)
    sd = dict(model.state_dict())
    tok_json = json.loads(Path(tok.path).read_text())
    eos, V = tok.ids["eos"], model.cfg.text.vocab_size
    if eos is None:
        raise GlimpseError("export: CLIP pools the eos token, and this tokenizer has none")
    if eos == 2:  # transformers' legacy CLIP pooling (see the module docstring)
        swap = torch.arange(V)
        swap[2], swap[V - 1] = V - 1, 2
        sd["text.token_embed.weight"] = sd["text.token_embed.weight"][swap]
        tok_json, eos = _swap_ids(tok_json, 2, V - 1), V - 1
    config["text_config"].update(eos_token_id=eos, bos_token_id=tok.ids["bos"], pad_token_id=tok.pad_id)
    return HFFolder(config, sd, rules, tok_json, special_tokens(tok), model.cfg.text.context_length,
                    transform=transform)
