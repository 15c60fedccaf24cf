"""VisionEncoderDecoderModel folders (a ViT encoder, a GPT-2 decoder with `add_cross_attention`) <->
glimpse's EncoderDecoderCaptioner, in and out.

    glimpse                        VisionEncoderDecoderModel folder
    vision.*                       encoder.*                  (ViTModel, see glimpse/hub/towers.py)
    proj                           enc_to_dec_proj            (only when the widths differ)
    decoder.*                      decoder.transformer.*      (GPT-2, see glimpse/hub/decoder.py)
    decoder.blocks.{i}.cross_norm  decoder.transformer.h.{i}.ln_cross_attn
    decoder.blocks.{i}.cross.q     decoder.transformer.h.{i}.crossattention.q_attn   (Conv1D, [in, out])
    decoder.blocks.{i}.cross.kv    decoder.transformer.h.{i}.crossattention.c_attn   (k and v, from the encoder)
    decoder.blocks.{i}.cross.out   decoder.transformer.h.{i}.crossattention.c_proj

The decoder's `lm_head` is tied to `wte` and absent from the file.  Old GPT-2 files keep the causal-mask
buffers (`attn.bias`, `attn.masked_bias`, and the same under `crossattention`); nothing reads them.
ViTModel's pooler is not part of captioning: a loaded one is left unused, and an exported folder
carries a zero pooler (transformers builds ViTModel with one, so the file must have it).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from glimpse.errors import GlimpseError
from glimpse.families.base import HFBuild
from glimpse.families.encoder_decoder.model import EncoderDecoderCaptioner, EncoderDecoderConfig
from glimpse.hub import folder as hf
from glimpse.hub.decoder import GPT2_UNUSED, decoder_config, decoder_rules, hf_decoder_config
from glimpse.hub.export import HFFolder, special_tokens, token_ids
from glimpse.hub.mapping import TRANSPOSE, expand, params, rule
from glimpse.hub.towers import VIT_UNUSED, hf_vit_config, vit_config, vit_rules

MODEL_TYPES = ("vision-encoder-decoder",)

CROSS_UNUSED = (r"decoder\.transformer\.h\.\d+\.crossattention\.(masked_)?bias", r"decoder\.lm_head\.weight")


def captioner_config(c: dict, where: str) -> EncoderDecoderConfig:
    enc, dec = c.get("encoder") or {}, c.get("decoder") or {}
    if enc.get("model_type") != "vit":
        raise GlimpseError(f"{where}: the encoder is {enc.get('model_type')!r}; glimpse reads ViT encoders")
    if dec.get("model_type") != "gpt2":
        raise GlimpseError(f"{where}: the decoder is {dec.get('model_type')!r}; glimpse reads GPT-2 decoders")
    if not dec.get("add_cross_attention"):
        raise GlimpseError(f"{where}: the GPT-2 decoder has no cross-attention (add_cross_attention is not set)")
    if dec.get("cross_attention_hidden_size") not in (None, dec.get("n_embd", 768)):
        raise GlimpseError(f"{where}: cross_attention_hidden_size differing from the decoder's width is not supported")
    start = c.get("decoder_start_token_id", dec.get("decoder_start_token_id", dec.get("bos_token_id")))
    if start is None:
        raise GlimpseError(f"{where}: config.json names no decoder_start_token_id (nor a decoder bos_token_id)")
    decoder = replace(decoder_config(dec, where + " (decoder)"), cross_attention=True)
    return EncoderDecoderConfig(vision=vit_config(enc, where + " (encoder)"), decoder=decoder,
                                decoder_start_token_id=int(start))


def _cross_rules() -> list:
    h = "transformer.h.{i}."
    rules = params([rule("blocks.{i}.cross_norm.{p}", h + "ln_cross_attn.{p}")])
    for ours, theirs in (("q", "q_attn"), ("kv", "c_attn"), ("out", "c_proj")):
        rules += [rule(f"blocks.{{i}}.cross.{ours}.weight", h + f"crossattention.{theirs}.weight", *TRANSPOSE),
                  rule(f"blocks.{{i}}.cross.{ours}.bias", h + f"crossattention.{theirs}.bias")]
    return rules


def captioner_rules(cfg: EncoderDecoderConfig) -> list:
    dec = replace(cfg.decoder, cross_attention=True).resolved()
    rules = vit_rules(cfg.vision, "encoder.")
    if cfg.vision.width != dec.width:
        rules += expand(params([rule("proj.{p}", "enc_to_dec_proj.{p}")]), 1)
    rules += decoder_rules(dec, "decoder.", "decoder.", lm_head="decoder.lm_head.weight")
    rules += expand(_cross_rules(), dec.layers, "decoder.", "decoder.")
    return rules


def build(folder: Path, c: dict) -> HFBuild:
    cfg = captioner_config(c, str(folder))
    unused = (*VIT_UNUSED, *(r"decoder\." + u for u in GPT2_UNUSED), *CROSS_UNUSED)
    return HFBuild(EncoderDecoderCaptioner(cfg), captioner_rules(cfg), hf.read_safetensors(folder), unused)


def to_hf(model: EncoderDecoderCaptioner, tok, transform) -> HFFolder:
    """A VisionEncoderDecoderModel folder that transformers loads with no missing or unexpected keys."""
    cfg = model.cfg
    dec = model.decoder.cfg
    if dec.arch != "gpt2":
        raise GlimpseError("export: VisionEncoderDecoderModel's decoders with cross-attention are GPT-2 here; "
                           f"this decoder is {dec.arch}")
    ids = token_ids(tok)
    start = cfg.decoder_start_token_id
    decoder = {**hf_decoder_config(dec), "add_cross_attention": True, "is_decoder": True, **ids,
               "architectures": ["GPT2LMHeadModel"]}
    encoder = {**hf_vit_config(cfg.vision), "architectures": ["ViTModel"]}
    config = {"architectures": ["VisionEncoderDecoderModel"], "model_type": "vision-encoder-decoder",
              "is_encoder_decoder": True, "tie_word_embeddings": False, "encoder": encoder, "decoder": decoder,
              "decoder_start_token_id": start, "pad_token_id": ids["pad_token_id"],
              "eos_token_id": ids["eos_token_id"]}
    state = dict(model.state_dict())
    # ViTModel's pooler (tanh over the class token) is not part of captioning: zeros, so the file is complete
    w = cfg.vision.width
    state["_pooler.weight"], state["_pooler.bias"] = torch.zeros(w, w), torch.zeros(w)
    rules = captioner_rules(cfg) + params([rule("_pooler.{p}", "encoder.pooler.dense.{p}")])
    return HFFolder(config, state, rules, json.loads(Path(tok.path).read_text()), special_tokens(tok),
                    dec.context_length, generation_config={**ids, "decoder_start_token_id": start},
                    transform=transform, files={})
