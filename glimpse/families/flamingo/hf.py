"""IDEFICS v1 folders (`IdeficsForVisionText2Text`) and OpenFlamingo checkpoints -> FlamingoModel.

IDEFICS, tensor names as transformers writes them:

    glimpse                 IDEFICS folder
    vision.*                model.vision_model.*            (CLIP-like: class token, pre_layrnorm; towers.py)
    resampler.*             model.perceiver_resampler.*     (see glimpse/models/perceiver.py)
    lm.*                    model.layers.*, model.norm      (Llama-like; hub/decoder.py)
    lm.token_embed          model.embed_tokens.weight + model.embed_tokens.additional_embedding.weight
    lm.lm_head              lm_head.weight + lm_head.additional_fc.weight (absent when tied)
    xattn.{j * n}.*         model.gated_cross_attn_layers.{j}.*   (see glimpse/models/gated_xattn.py)

IDEFICS keeps its added tokens (`<fake_token_around_image>`, `<image>`) in separate tables after the
base vocabulary (decoupled, so they can train while the rest is frozen); they compute exactly one
table of vocab_size + additional_vocab_size rows, which is what glimpse loads.  IDEFICS' vision
tokens are the last layer's, class token included, without post_layernorm (it only norms the
pooled token, which IDEFICS does not read).  Its `image_attention_mask` is the processor's: a one-hot
of the latest image per token; glimpse computes the same from the `<image>` ids (the processor's
reset after an EOS token is not reproduced: glimpse's mask follows the images only).

OpenFlamingo saves only what it trains (`filter_state_dict_to_trainable`): `perceiver.*`, the gated
blocks as `lang_encoder.<decoder layers>.{i}.gated_cross_attn_layer.*` (i = the LM layer it runs
before) and the embeddings; the frozen LM and CLIP come from their own checkpoints.
`from_openflamingo` maps the resampler and the blocks (the names in `openflamingo_rules`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from glimpse.errors import GlimpseError
from glimpse.families.base import HFBuild
from glimpse.families.flamingo.model import FlamingoConfig, FlamingoModel, xattn_layers
from glimpse.hub import folder as hf
from glimpse.hub.decoder import decoder_config, decoder_rules
from glimpse.hub.mapping import Rule, expand, from_hf, params, rule
from glimpse.hub.parts import TOWER_UNUSED
from glimpse.hub.towers import vision_config, vision_rules

MODEL_TYPES = ("idefics",)

# IdeficsVisionConfig's and IdeficsPerceiverConfig's defaults, for configs that leave keys out
_VISION_DEFAULTS = dict(embed_dim=768, image_size=224, intermediate_size=5120, patch_size=14,
                        num_hidden_layers=32, num_attention_heads=16, num_channels=3, hidden_act="gelu",
                        layer_norm_eps=1e-5)
_PERCEIVER_DEFAULTS = dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                           resampler_head_dim=96, qk_layer_norms_perceiver=False)
# buffers older files saved (vision position ids, rotary frequencies); nothing reads them
IDEFICS_UNUSED = (*TOWER_UNUSED,
                  r"model\.(layers|gated_cross_attn_layers)\.\d+\.(self_attn|cross_attn)\.rotary_emb\..*")


def _at(rules: list[Rule], pairs: list[tuple[int, int]], ours_prefix: str, hf_prefix: str) -> list[Rule]:
    """Rules with `{i}` expanded per (our index, their index) pair: the gated blocks are keyed by LM layer
    here, by block number in IDEFICS."""
    return [Rule(tuple(ours_prefix.format(i=o) + k for k in r.ours),
                 tuple(hf_prefix.format(i=h) + k for k in r.hf), r.to_ours, r.to_hf)
            for o, h in pairs for r in rules]


# ---- IDEFICS -----------------------------------------------------------------------------------------

def image_token_id(folder: Path, c: dict) -> int:
    """`<image>`: from the folder's tokenizer.json, else config.json's `image_token_id`, else IDEFICS'
    layout (the last of the additional tokens, after `<fake_token_around_image>`)."""
    tok = folder / hf.TOKENIZER
    if tok.is_file():
        for t in hf.read_json(tok).get("added_tokens", []):
            if t.get("content") == "<image>":
                return int(t["id"])
    if c.get("image_token_id") is not None:
        return int(c["image_token_id"])
    if c.get("additional_vocab_size", 0) >= 1:
        return c["vocab_size"] + c["additional_vocab_size"] - 1
    raise GlimpseError(f"{folder}: no <image> token (no tokenizer.json naming it, no image_token_id, "
                       "no additional vocabulary)")


def idefics_config(c: dict, where: str, image_token: int) -> FlamingoConfig:
    vc = {**_VISION_DEFAULTS, **(c.get("vision_config") or {})}
    vc = {**vc, "hidden_size": vc["embed_dim"], "model_type": "clip_vision_model"}
    vision, _ = vision_config(vc, where)
    extra = c.get("additional_vocab_size", 0)
    lm = decoder_config({**c, "model_type": "llama", "vocab_size": c["vocab_size"] + extra}, where)
    pc = {**_PERCEIVER_DEFAULTS, **(c.get("perceiver_config") or {})}
    layers, every = c["num_hidden_layers"], c.get("cross_layer_interval", 1)
    if every < 1 or layers % every:
        # transformers builds layers // interval blocks but runs one at every i % interval == 0
        raise GlimpseError(f"{where}: cross_layer_interval {every} does not divide num_hidden_layers "
                           f"{layers} (transformers' IDEFICS cannot run such a model either)")
    alpha = c.get("alpha_type", "float")
    if alpha not in ("float", "vector"):
        raise GlimpseError(f"{where}: alpha_type {alpha!r} must be float or vector")
    return FlamingoConfig(
        vision=vision, lm=lm, style="idefics", vision_feature_layer=-1, vision_feature_select="full",
        vision_feature_norm=False, use_resampler=bool(c.get("use_resampler", False)),
        resampler_depth=pc["resampler_depth"], resampler_heads=pc["resampler_n_heads"],
        resampler_head_dim=pc["resampler_head_dim"], resampler_latents=pc["resampler_n_latents"],
        resampler_ff_mult=4, resampler_qk_norm=bool(pc["qk_layer_norms_perceiver"]),
        xattn_every=every, xattn_offset=0, xattn_heads=lm.heads, xattn_head_dim=lm.width // lm.heads,
        xattn_ff_hidden=lm.mlp_hidden, gate=alpha, qk_norm=bool(c.get("qk_layer_norms", False)),
        image_token_id=image_token)


_IDEFICS_RESAMPLER = [
    rule("latents", "latents"),
    *params([rule("layers.{i}.attn.media_norm.{p}", "blocks.{i}.0.context_layer_norm.{p}"),
             rule("layers.{i}.attn.latents_norm.{p}", "blocks.{i}.0.latents_layer_norm.{p}"),
             rule("layers.{i}.ff.norm.{p}", "blocks.{i}.1.ln.{p}"),
             rule("norm.{p}", "layer_norm.{p}")]),
    rule("layers.{i}.attn.q.weight", "blocks.{i}.0.q_proj.weight"),
    rule("layers.{i}.attn.kv.weight", ("blocks.{i}.0.k_proj.weight", "blocks.{i}.0.v_proj.weight")),
    rule("layers.{i}.attn.out.weight", "blocks.{i}.0.output_proj.weight"),
    rule("layers.{i}.ff.fc1.weight", "blocks.{i}.1.fc.weight"),
    rule("layers.{i}.ff.fc2.weight", "blocks.{i}.1.c_proj.weight"),
]
_IDEFICS_RESAMPLER_QK = params([rule("layers.{i}.attn.q_norm.{p}", "blocks.{i}.0.q_layer_norm.{p}"),
                                rule("layers.{i}.attn.k_norm.{p}", "blocks.{i}.0.k_layer_norm.{p}")])

# alpha_type "vector" stores [1, 1, D]; "float" [1] (both reshapes are the identity on [1])
_GATE = (lambda t: t.reshape(-1), lambda t: t.reshape(1, 1, -1) if t.numel() > 1 else t)
_IDEFICS_BLOCK = [
    rule("attn_gate", "alpha_cross_attn", *_GATE),
    rule("ff_gate", "alpha_dense", *_GATE),
    rule("attn_norm.weight", "input_layernorm.weight"),
    rule("attn.q.weight", "cross_attn.q_proj.weight"),
    rule("attn.kv.weight", ("cross_attn.k_proj.weight", "cross_attn.v_proj.weight")),
    rule("attn.out.weight", "cross_attn.o_proj.weight"),
    rule("ff_norm.weight", "post_attention_layernorm.weight"),
    rule("ff.gate.weight", "mlp.gate_proj.weight"),
    rule("ff.up.weight", "mlp.up_proj.weight"),
    rule("ff.down.weight", "mlp.down_proj.weight"),
]
_IDEFICS_BLOCK_QK = [rule("attn.q_norm.weight", "cross_attn.q_layer_norm.weight"),
                     rule("attn.k_norm.weight", "cross_attn.k_layer_norm.weight")]


def idefics_rules(cfg: FlamingoConfig, additional_vocab: bool) -> list[Rule]:
    """`additional_vocab`: the folder has the decoupled tables (additional_vocab_size > 0)."""
    lm = cfg.lm.resolved()
    rules = vision_rules(cfg.vision, "model.vision_model.", "vision.")
    if cfg.use_resampler:
        rs = _IDEFICS_RESAMPLER + (_IDEFICS_RESAMPLER_QK if cfg.resampler_qk_norm else [])
        rules += expand(rs, cfg.resampler_depth, "resampler.", "model.perceiver_resampler.")
    # the LM's rules with the decoupled tables in place of the plain embedding and head
    tables = ("lm.token_embed.weight", "lm.lm_head.weight")
    rules += [r for r in decoder_rules(lm, "", "lm.") if r.ours[0] not in tables]
    more = ("model.embed_tokens.additional_embedding.weight",) if additional_vocab else ()
    rules.append(rule("lm.token_embed.weight", ("model.embed_tokens.weight", *more)))
    if not lm.tie_embeddings:
        rules.append(rule("lm.lm_head.weight", ("lm_head.weight", *(("lm_head.additional_fc.weight",)
                                                                   if additional_vocab else ()))))
    block = _IDEFICS_BLOCK + (_IDEFICS_BLOCK_QK if cfg.qk_norm else [])
    rules += _at(block, [(layer, j) for j, layer in enumerate(xattn_layers(cfg))], "xattn.{i}.",
                 "model.gated_cross_attn_layers.{i}.")
    return rules


def idefics_unused(cfg: FlamingoConfig) -> tuple[str, ...]:
    # a tied head saved anyway
    return IDEFICS_UNUSED + ((r"lm_head\.(additional_fc\.)?weight",) if cfg.lm.tie_embeddings else ())


def build(folder: Path, c: dict) -> HFBuild:
    """The FlamingoModel (random weights), rules, tensors and unused patterns of an IDEFICS v1 folder."""
    where = str(folder)
    if c.get("model_type") != "idefics":
        raise GlimpseError(f"{where}: model_type {c.get('model_type')!r} is not idefics")
    cfg = idefics_config(c, where, image_token_id(folder, c))
    rules = idefics_rules(cfg, c.get("additional_vocab_size", 0) > 0)
    return HFBuild(FlamingoModel(cfg), rules, hf.read_safetensors(folder), idefics_unused(cfg))


# ---- OpenFlamingo --------------------------------------------------------------------------------------

_OF_RESAMPLER = [
    rule("latents", "latents"),
    *params([rule("layers.{i}.attn.media_norm.{p}", "layers.{i}.0.norm_media.{p}"),
             rule("layers.{i}.attn.latents_norm.{p}", "layers.{i}.0.norm_latents.{p}"),
             rule("layers.{i}.ff.norm.{p}", "layers.{i}.1.0.{p}"),
             rule("norm.{p}", "norm.{p}")]),
    rule("layers.{i}.attn.q.weight", "layers.{i}.0.to_q.weight"),
    rule("layers.{i}.attn.kv.weight", "layers.{i}.0.to_kv.weight"),
    rule("layers.{i}.attn.out.weight", "layers.{i}.0.to_out.weight"),
    rule("layers.{i}.ff.fc1.weight", "layers.{i}.1.1.weight"),
    rule("layers.{i}.ff.fc2.weight", "layers.{i}.1.3.weight"),
]
_OF_BLOCK = [
    rule("attn_gate", "attn_gate"),
    rule("ff_gate", "ff_gate"),
    *params([rule("attn_norm.{p}", "attn.norm.{p}"), rule("ff_norm.{p}", "ff.0.{p}")]),
    rule("attn.q.weight", "attn.to_q.weight"),
    rule("attn.kv.weight", "attn.to_kv.weight"),
    rule("attn.out.weight", "attn.to_out.weight"),
    rule("ff.fc1.weight", "ff.1.weight"),
    rule("ff.fc2.weight", "ff.3.weight"),
]


LLAMA_BLOCKS = "lang_encoder.model.layers.{i}.gated_cross_attn_layer."


def openflamingo_rules(cfg: FlamingoConfig, block_prefix: str = LLAMA_BLOCKS) -> list[Rule]:
    """Rules for an OpenFlamingo checkpoint's resampler and gated blocks.  `block_prefix` names block i
    (the LM layer it runs before): `lang_encoder.<decoder layers attr>.{i}.gated_cross_attn_layer.`
    (model.layers for Llama, transformer.blocks for MPT), or `lang_encoder.gated_cross_attn_layers.{i}.`."""
    if cfg.style != "openflamingo" or cfg.gate != "float" or cfg.qk_norm or cfg.resampler_qk_norm:
        raise GlimpseError("an OpenFlamingo checkpoint needs style openflamingo, float gates and no q/k "
                           "norms")
    rules = []
    if cfg.use_resampler:
        rules = expand(_OF_RESAMPLER, cfg.resampler_depth, "resampler.", "perceiver.")
    return rules + _at(_OF_BLOCK, [(i, i) for i in xattn_layers(cfg)], "xattn.{i}.", block_prefix)


_OF_BLOCK_KEY = re.compile(r"lang_encoder\.(.+)\.\d+\.gated_cross_attn_layer\.")


def from_openflamingo(sd: dict[str, torch.Tensor], model: FlamingoModel) -> dict[str, torch.Tensor]:
    """The resampler's and gated blocks' tensors of an OpenFlamingo state dict, under FlamingoModel's
    names (load them with `model.load_state_dict(..., strict=False)`).  Strict for those parts: a
    `perceiver.*` or block tensor no rule takes, or one missing, is an error.  The rest (embeddings,
    the frozen LM's and vision tower's tensors, the duplicate `gated_cross_attn_layers` and
    `old_decoder_blocks` names of a full state dict) is left to those parts' loaders."""
    layers_attr = next((m.group(1) for k in sd if (m := _OF_BLOCK_KEY.match(k))), None)
    if layers_attr is not None:
        prefix = f"lang_encoder.{layers_attr}." + "{i}.gated_cross_attn_layer."
        blocks = re.escape(f"lang_encoder.{layers_attr}.") + r"\d+\.gated_cross_attn_layer\..*"
        mine = re.compile(r"perceiver\..*|" + blocks)
    else:
        prefix = "lang_encoder.gated_cross_attn_layers.{i}."
        mine = re.compile(r"perceiver\..*|lang_encoder\.gated_cross_attn_layers\..*")
    rules = openflamingo_rules(model.cfg, prefix)
    expected = model.state_dict()
    ours = {k: v for k, v in sd.items() if mine.fullmatch(k)}
    return from_hf(ours, rules, expected, "OpenFlamingo checkpoint")
