"""CLIP, SigLIP and BERT <-> glimpse's ViT and text towers.

    glimpse (vision.)               CLIP / SigLIP vision_model.
    patch_embed                     embeddings.patch_embedding        (SigLIP: with a bias)
    class_token                     embeddings.class_embedding        (CLIP; [D] -> [1, 1, D])
    pos_embed                       embeddings.position_embedding     ([T, D] -> [1, T, D])
    pre_norm                        pre_layrnorm                      (CLIP)
    blocks.{i}.ln1 / ln2            encoder.layers.{i}.layer_norm1 / layer_norm2
    blocks.{i}.attn.qkv             encoder.layers.{i}.self_attn.q_proj + k_proj + v_proj (concatenated)
    blocks.{i}.attn.out             encoder.layers.{i}.self_attn.out_proj
    blocks.{i}.mlp.fc1 / fc2        encoder.layers.{i}.mlp.fc1 / fc2
    post_norm                       post_layernorm
    head.probe / ln / mlp           head.probe / layernorm / mlp      (SigLIP attention pooling)
    head.q + head.kv                head.attention.in_proj            (split in two)
    head.out                        head.attention.out_proj

    glimpse (text.)                 CLIP / SigLIP text_model.          BERT
    token_embed                     embeddings.token_embedding         embeddings.word_embeddings
    pos_embed                       embeddings.position_embedding      embeddings.position_embeddings
    type_embed                      -                                  embeddings.token_type_embeddings
    embed_norm                      -                                  embeddings.LayerNorm
    blocks.{i}.attn.qkv             encoder.layers.{i}.self_attn.q/k/v encoder.layer.{i}.attention.self.query/key/value
    blocks.{i}.attn.out             encoder.layers.{i}.self_attn.out_proj  encoder.layer.{i}.attention.output.dense
    blocks.{i}.ln1                  encoder.layers.{i}.layer_norm1     encoder.layer.{i}.attention.output.LayerNorm
    blocks.{i}.mlp.fc1              encoder.layers.{i}.mlp.fc1         encoder.layer.{i}.intermediate.dense
    blocks.{i}.mlp.fc2              encoder.layers.{i}.mlp.fc2         encoder.layer.{i}.output.dense
    blocks.{i}.ln2                  encoder.layers.{i}.layer_norm2     encoder.layer.{i}.output.LayerNorm
    final_norm                      final_layer_norm                   -

The projections and temperature of CLIPModel / SiglipModel belong to the map of the family that
loads those folders (its hf.py, under glimpse/families).
"""

from __future__ import annotations

from glimpse.errors import GlimpseError
from glimpse.hub.mapping import TOKEN, UNSQUEEZE, expand, params, rule
from glimpse.hub.parts import BERT_UNUSED, TOWER_UNUSED, same_config
from glimpse.models.text import TextConfig
from glimpse.models.vision import VisionConfig

# Hugging Face hidden_act <-> glimpse act
ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def act_of(hf_act: str, where: str) -> str:
    if hf_act not in ACTS:
        raise GlimpseError(f"{where}: activation {hf_act!r} is not supported (known: {', '.join(ACTS)})")
    return ACTS[hf_act]


def mlp_ratio(intermediate: int, width: int) -> float:
    """A ratio whose int(width * ratio) is exactly `intermediate` (glimpse sizes MLPs by ratio)."""
    return (intermediate + 0.5) / width


def _encoder_rules() -> list:
    return params([
        rule("blocks.{i}.ln1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
        rule("blocks.{i}.attn.qkv.{p}", ("encoder.layers.{i}.self_attn.q_proj.{p}", "encoder.layers.{i}.self_attn.k_proj.{p}",
                                         "encoder.layers.{i}.self_attn.v_proj.{p}")),
        rule("blocks.{i}.attn.out.{p}", "encoder.layers.{i}.self_attn.out_proj.{p}"),
        rule("blocks.{i}.ln2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
        rule("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
        rule("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ])


# ---- vision -----------------------------------------------------------------------------------------

def vision_config(c: dict, where: str) -> tuple[VisionConfig, str]:
    """(glimpse VisionConfig, "clip" | "siglip") from a clip_vision_model / siglip_vision_model config."""
    kind = "siglip" if "siglip" in c.get("model_type", "") else "clip"
    siglip = kind == "siglip"
    if c.get("num_channels", 3) != 3:
        raise GlimpseError(f"{where}: only 3-channel images are supported")
    use_head = siglip and c.get("vision_use_head", True)
    cfg = VisionConfig(
        image_size=c.get("image_size", 224), patch_size=c.get("patch_size", 16 if siglip else 32),
        width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
        mlp_ratio=mlp_ratio(c["intermediate_size"], c["hidden_size"]),
        act=act_of(c.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"), where),
        class_token=not siglip, pre_norm=not siglip, pool="map" if use_head else ("mean" if siglip else "cls"),
        patch_bias=siglip, eps=c.get("layer_norm_eps", 1e-6 if siglip else 1e-5))
    return cfg, kind


def vision_rules(cfg: VisionConfig, hf_prefix: str, ours_prefix: str = "vision.") -> list:
    rules = [rule("patch_embed.weight", "embeddings.patch_embedding.weight"),
             rule("pos_embed", "embeddings.position_embedding.weight", *UNSQUEEZE)]
    if cfg.patch_bias:
        rules.append(rule("patch_embed.bias", "embeddings.patch_embedding.bias"))
    if cfg.class_token:
        rules.append(rule("class_token", "embeddings.class_embedding", *TOKEN))
    if cfg.pre_norm:
        rules += params([rule("pre_norm.{p}", "pre_layrnorm.{p}")])
    rules += _encoder_rules() + params([rule("post_norm.{p}", "post_layernorm.{p}")])
    if cfg.pool == "map":
        rules += [rule("head.probe", "head.probe")] + params([
            rule(("head.q.{p}", "head.kv.{p}"), "head.attention.in_proj_{p}"),
            rule("head.out.{p}", "head.attention.out_proj.{p}"),
            rule("head.ln.{p}", "head.layernorm.{p}"),
            rule("head.mlp.fc1.{p}", "head.mlp.fc1.{p}"),
            rule("head.mlp.fc2.{p}", "head.mlp.fc2.{p}"),
        ])
    return expand(rules, cfg.layers, ours_prefix, hf_prefix)


def hf_vision_config(cfg: VisionConfig, for_llava: bool = False) -> dict:
    """The Hugging Face config of a glimpse vision tower, or an error saying why there is none."""
    where = "export"
    if cfg.act not in HF_ACTS:
        raise GlimpseError(f"{where}: vision activation {cfg.act!r} has no Hugging Face equivalent")
    base = dict(hidden_size=cfg.width, intermediate_size=int(cfg.width * cfg.mlp_ratio), num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
                hidden_act=HF_ACTS[cfg.act], layer_norm_eps=cfg.eps, attention_dropout=0.0)
    if cfg.class_token and cfg.pre_norm and not cfg.patch_bias and (cfg.pool == "cls" or for_llava):
        return {**base, "model_type": "clip_vision_model"}
    if not cfg.class_token and not cfg.pre_norm and cfg.patch_bias and (cfg.pool == "map" or for_llava):
        return {**base, "model_type": "siglip_vision_model", "vision_use_head": cfg.pool == "map"}
    raise GlimpseError(
        f"{where}: this vision tower (class_token={cfg.class_token}, pre_norm={cfg.pre_norm}, "
        f"patch_bias={cfg.patch_bias}, pool={cfg.pool}) is neither CLIP's (class token, pre-norm, no patch bias"
        f"{', cls pooling' if not for_llava else ''}) nor SigLIP's (no class token, no pre-norm, patch bias"
        f"{', map pooling' if not for_llava else ''}), so no Hugging Face model computes it exactly")


# ViT (google/vit-*, the encoder of VisionEncoderDecoder captioners): class token, no pre-norm, a patch
# bias, post-norm over every token; its pooler (tanh dense over the class token) is read by nothing here.
#
#     glimpse (vision.)       ViTModel
#     patch_embed             embeddings.patch_embeddings.projection
#     class_token / pos_embed embeddings.cls_token / embeddings.position_embeddings   ([1, 1, D] / [1, T, D])
#     blocks.{i}.ln1 / ln2    encoder.layer.{i}.layernorm_before / layernorm_after
#     blocks.{i}.attn.qkv     encoder.layer.{i}.attention.attention.query + key + value
#     blocks.{i}.attn.out     encoder.layer.{i}.attention.output.dense
#     blocks.{i}.mlp.fc1/fc2  encoder.layer.{i}.intermediate.dense / output.dense
#     post_norm               layernorm

VIT_UNUSED = (r"(.*\.)?pooler\.dense\.(weight|bias)",)


def vit_config(c: dict, where: str) -> VisionConfig:
    if c.get("num_channels", 3) != 3:
        raise GlimpseError(f"{where}: only 3-channel images are supported")
    if not c.get("qkv_bias", True):
        raise GlimpseError(f"{where}: a ViT without q/k/v biases is not supported")
    return VisionConfig(image_size=c.get("image_size", 224), patch_size=c.get("patch_size", 16),
                        width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                        mlp_ratio=mlp_ratio(c["intermediate_size"], c["hidden_size"]),
                        act=act_of(c.get("hidden_act", "gelu"), where), class_token=True, pre_norm=False, pool="cls",
                        patch_bias=True, eps=c.get("layer_norm_eps", 1e-12))


def vit_rules(cfg: VisionConfig, hf_prefix: str, ours_prefix: str = "vision.") -> list:
    L = "encoder.layer.{i}."
    rules = [rule("class_token", "embeddings.cls_token"), rule("pos_embed", "embeddings.position_embeddings")]
    rules += params([
        rule("patch_embed.{p}", "embeddings.patch_embeddings.projection.{p}"),
        rule("blocks.{i}.ln1.{p}", L + "layernorm_before.{p}"),
        rule("blocks.{i}.attn.qkv.{p}", (L + "attention.attention.query.{p}", L + "attention.attention.key.{p}",
                                         L + "attention.attention.value.{p}")),
        rule("blocks.{i}.attn.out.{p}", L + "attention.output.dense.{p}"),
        rule("blocks.{i}.ln2.{p}", L + "layernorm_after.{p}"),
        rule("blocks.{i}.mlp.fc1.{p}", L + "intermediate.dense.{p}"),
        rule("blocks.{i}.mlp.fc2.{p}", L + "output.dense.{p}"),
        rule("post_norm.{p}", "layernorm.{p}"),
    ])
    return expand(rules, cfg.layers, ours_prefix, hf_prefix)


def hf_vit_config(cfg: VisionConfig) -> dict:
    """A ViTConfig for a glimpse tower of ViT's shape, or an error saying why not."""
    if not (cfg.class_token and not cfg.pre_norm and cfg.patch_bias) or cfg.act not in HF_ACTS:
        raise GlimpseError(f"export: a ViT encoder has a class token, a patch bias and no pre-norm; this tower has "
                           f"class_token={cfg.class_token}, patch_bias={cfg.patch_bias}, pre_norm={cfg.pre_norm}, "
                           f"act={cfg.act!r}")
    return dict(model_type="vit", hidden_size=cfg.width, intermediate_size=int(cfg.width * cfg.mlp_ratio),
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, image_size=cfg.image_size,
                patch_size=cfg.patch_size, num_channels=3, hidden_act=HF_ACTS[cfg.act], layer_norm_eps=cfg.eps,
                qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# ---- text -------------------------------------------------------------------------------------------

def text_config(c: dict, where: str, pool: str | None = None) -> tuple[TextConfig, str]:
    """(glimpse TextConfig, "clip" | "siglip" | "bert") from a clip_text_model / siglip_text_model /
    bert config; `pool` overrides the family's pooling (a sentence encoder's mean pooling)."""
    mt = c.get("model_type", "")
    if mt in ("bert",):
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise GlimpseError(f"{where}: BERT position_embedding_type {c['position_embedding_type']!r} "
                               "is not supported (absolute only)")
        if c.get("is_decoder") or c.get("add_cross_attention"):
            raise GlimpseError(f"{where}: a BERT decoder is not a text tower")
        cfg = TextConfig(vocab_size=c["vocab_size"], context_length=c.get("max_position_embeddings", 512),
                         width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                         mlp_ratio=mlp_ratio(c["intermediate_size"], c["hidden_size"]),
                         act=act_of(c.get("hidden_act", "gelu"), where), causal=False, pool=pool or "cls",
                         eps=c.get("layer_norm_eps", 1e-12), norm="post", final_norm=False, embed_norm=True,
                         type_vocab_size=c.get("type_vocab_size", 2))
        return cfg, "bert"
    siglip = "siglip" in mt
    if not siglip and "clip" not in mt:
        raise GlimpseError(f"{where}: model_type {mt!r} is not a text tower glimpse knows (clip, siglip, bert)")
    cfg = TextConfig(vocab_size=c["vocab_size"], context_length=c.get("max_position_embeddings", 64 if siglip else 77),
                     width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                     mlp_ratio=mlp_ratio(c["intermediate_size"], c["hidden_size"]),
                     act=act_of(c.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"), where),
                     causal=not siglip, pool=pool or ("last" if siglip else "eos"),
                     eps=c.get("layer_norm_eps", 1e-6 if siglip else 1e-5))
    return cfg, "siglip" if siglip else "clip"


def text_rules(cfg: TextConfig, kind: str, hf_prefix: str, ours_prefix: str = "text.") -> list:
    if kind == "bert":
        L = "encoder.layer.{i}."
        rules = [rule("token_embed.weight", "embeddings.word_embeddings.weight"),
                 rule("pos_embed", "embeddings.position_embeddings.weight", *UNSQUEEZE),
                 rule("type_embed.weight", "embeddings.token_type_embeddings.weight")] + params([
            rule("embed_norm.{p}", "embeddings.LayerNorm.{p}"),
            rule("blocks.{i}.attn.qkv.{p}", (L + "attention.self.query.{p}", L + "attention.self.key.{p}",
                                             L + "attention.self.value.{p}")),
            rule("blocks.{i}.attn.out.{p}", L + "attention.output.dense.{p}"),
            rule("blocks.{i}.ln1.{p}", L + "attention.output.LayerNorm.{p}"),
            rule("blocks.{i}.mlp.fc1.{p}", L + "intermediate.dense.{p}"),
            rule("blocks.{i}.mlp.fc2.{p}", L + "output.dense.{p}"),
            rule("blocks.{i}.ln2.{p}", L + "output.LayerNorm.{p}"),
        ])
    else:
        rules = [rule("token_embed.weight", "embeddings.token_embedding.weight"),
                 rule("pos_embed", "embeddings.position_embedding.weight", *UNSQUEEZE)]
        rules += _encoder_rules() + params([rule("final_norm.{p}", "final_layer_norm.{p}")])
    return expand(rules, cfg.layers, ours_prefix, hf_prefix)


def hf_text_config(cfg: TextConfig) -> dict:
    """A CLIP text config for a glimpse text tower of CLIP's shape, or an error saying why not."""
    clip_shape = cfg.causal and cfg.pool == "eos" and cfg.norm == "pre" and cfg.final_norm and not cfg.embed_norm \
        and not cfg.type_vocab_size and cfg.act in HF_ACTS
    if not clip_shape:
        raise GlimpseError("export: only a CLIP-shaped text tower (causal, eos pooling, pre-norm, final norm) "
                           "exports to a CLIP folder")
    return dict(model_type="clip_text_model", vocab_size=cfg.vocab_size, hidden_size=cfg.width,
                intermediate_size=int(cfg.width * cfg.mlp_ratio), num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads, max_position_embeddings=cfg.context_length,
                hidden_act=HF_ACTS[cfg.act], layer_norm_eps=cfg.eps, attention_dropout=0.0)


# ---- a tower as a part of another model (a recipe's init_parts) -----------------------------------

def vision_part(c: dict, sd: dict, prefix: str, target, where: str) -> tuple[list, dict, tuple]:
    """(rules, tensors, unused) that fill the vision tower `target` from the tensors under `prefix`
    of a folder whose vision config is `c` (which must describe `target`'s architecture)."""
    same_config(vision_config(c, where)[0], target.cfg, where, "vision")
    sd = {k: v for k, v in sd.items() if k.startswith(prefix) and not k.startswith(("visual_projection.", "logit_"))}
    return vision_rules(target.cfg, prefix, ""), sd, TOWER_UNUSED


def text_part(c: dict, sd: dict, prefix: str, target, where: str) -> tuple[list, dict, tuple]:
    """(rules, tensors, unused) that fill the text tower `target` from `sd` (the tower's tensors only)."""
    ours, kind = text_config(c, where, target.cfg.pool)
    same_config(ours, target.cfg, where, "text")
    return text_rules(target.cfg, kind, prefix, ""), sd, BERT_UNUSED if kind == "bert" else ()
