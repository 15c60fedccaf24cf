"""LLaVA-style folders (`LlavaForConditionalGeneration`, `LlavaNextVideoForConditionalGeneration`): their
config.json as a VLMConfig, and the tensor map between them and glimpse's VisionLanguageModel.

    glimpse                 LLaVA folder
    vision.*                vision_tower.*             (a CLIP or SigLIP vision tower, see towers.py)
    connector.linear_1/2    multi_modal_projector.linear_1/2
    lm.*                    language_model.model.*     (a Llama-family LM, see decoder.py)
    lm.lm_head              language_model.lm_head     (absent when tied)

Files written by other transformers versions name the same tensors `model.vision_tower.*`,
`vision_tower.vision_model.*`, `model.language_model.*`, `model.multi_modal_projector.*` and
`lm_head.*`; `normalize` maps them all onto the names above first.
"""

from __future__ import annotations

from glimpse.data.chat import TEMPLATES
from glimpse.errors import GlimpseError
from glimpse.hub.decoder import decoder_config, decoder_rules
from glimpse.hub.mapping import expand, params, rule
from glimpse.hub.towers import vision_config, vision_rules
from glimpse.models.vlm import VLMConfig

_RENAMES = (("model.vision_tower.", "vision_tower."), ("vision_tower.vision_model.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))


# Where the files' tensors sit as modules of transformers' LlavaForConditionalGeneration (5.x, whose
# loader maps the file names above onto them): what PEFT adapters name (glimpse.hub.peft)
MODULE_PREFIXES = (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                   ("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"))


def normalize(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for old, new in _RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out


# Put before a glimpse template on export: transformers' processors (and vLLM) send message contents
# as lists of parts; this turns them into glimpse's text with one <image> per image, parts joined by
# newlines (glimpse.data.messages.split_content), and leaves string contents alone.
PARTS_PREFIX = (
    "{%- set ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.msgs = ns.msgs + [m] -%}"
    "{%- else -%}{%- set acc = namespace(t=[]) -%}"
    "{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{%- set acc.t = acc.t + ['<image>'] -%}"
    "{%- elif p['type'] == 'text' -%}{%- set acc.t = acc.t + [p['text']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': acc.t | join('\n')}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.msgs -%}"
)


def llava_config(c: dict, where: str, chat_template: str | None) -> VLMConfig:
    vc = c.get("vision_config") or {}
    vc = {"model_type": "clip_vision_model", **vc}
    vision, kind = vision_config(vc, where)
    lm = decoder_config(c.get("text_config") or {}, where)
    if lm.arch != "llama":
        raise GlimpseError(f"{where}: LLaVA's language model must be Llama-family")
    layer = c.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise GlimpseError(f"{where}: vision_feature_layer {layer!r}: only one layer is supported")
    strategy = c.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise GlimpseError(f"{where}: vision_feature_select_strategy {strategy!r} is not supported")
    if strategy == "default" and not vision.class_token:
        raise GlimpseError(f"{where}: strategy 'default' drops the first token, but this {kind} tower has no "
                           "class token (glimpse would keep every patch): use 'full'")
    if not c.get("multimodal_projector_bias", True) or c.get("projector_hidden_act", "gelu") != "gelu":
        raise GlimpseError(f"{where}: only the gelu projector with biases (mlp2x_gelu) is supported")
    token = c.get("image_token_index", c.get("image_token_id"))
    if token is None:
        raise GlimpseError(f"{where}: config.json names no image_token_index")
    # a glimpse export carries a built-in template's source: give it its name back ("plain" means
    # a role-less captioner to the pipeline)
    if chat_template and chat_template.startswith(PARTS_PREFIX):
        chat_template = chat_template[len(PARTS_PREFIX):]
    name = next((n for n, src in TEMPLATES.items() if src == chat_template), chat_template)
    return VLMConfig(vision=vision, lm=lm, connector="mlp2x_gelu", vision_feature_layer=layer,
                     vision_feature_select="patch" if strategy == "default" else "full", image_token_id=token,
                     chat_template=name or "compact")


def llava_rules(cfg: VLMConfig) -> list:
    lm = cfg.lm.resolved()
    rules = vision_rules(cfg.vision, "vision_tower.")
    rules += expand(params([rule("connector.linear_1.{p}", "multi_modal_projector.linear_1.{p}"),
                            rule("connector.linear_2.{p}", "multi_modal_projector.linear_2.{p}")]), 1)
    rules += decoder_rules(lm, "language_model.", "lm.", lm_head="language_model.lm_head.weight")
    return rules


def llava_unused(cfg: VLMConfig) -> tuple[str, ...]:
    # a tied head saved anyway; the vision head of a SigLIP tower LLaVA never reads is mapped, not dropped
    return (r"language_model\.lm_head\.weight",) if cfg.lm.tie_embeddings else ()


