"""Llama-family (Llama, Mistral, Qwen2, SmolLM) and GPT-2 causal LMs <-> glimpse's CausalLM.

The template tables are in glimpse/models/decoder.py's docstring; here they are code.  GPT-2's
Conv1D weights are stored [in, out] and transposed; a tied lm_head is absent from the files.
"""

from __future__ import annotations

from glimpse.errors import GlimpseError
from glimpse.hub.mapping import TRANSPOSE, expand, params, rule
from glimpse.hub.parts import same_config
from glimpse.models.decoder import DecoderConfig

LLAMA_TYPES = ("llama", "mistral", "qwen2")  # SmolLM / SmolLM2 checkpoints are model_type llama

LLAMA_KEYS = {
    "token_embed.weight": "model.embed_tokens.weight",
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.q.{p}": "model.layers.{i}.self_attn.q_proj.{p}",
    "blocks.{i}.attn.k.{p}": "model.layers.{i}.self_attn.k_proj.{p}",
    "blocks.{i}.attn.v.{p}": "model.layers.{i}.self_attn.v_proj.{p}",
    "blocks.{i}.attn.o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
GPT2_KEYS = {
    "token_embed.weight": "transformer.wte.weight",
    "pos_embed.weight": "transformer.wpe.weight",
    "blocks.{i}.attn_norm.{p}": "transformer.h.{i}.ln_1.{p}",
    "blocks.{i}.attn.qkv.{p}": "transformer.h.{i}.attn.c_attn.{p}",
    "blocks.{i}.attn.o.{p}": "transformer.h.{i}.attn.c_proj.{p}",
    "blocks.{i}.mlp_norm.{p}": "transformer.h.{i}.ln_2.{p}",
    "blocks.{i}.mlp.fc1.{p}": "transformer.h.{i}.mlp.c_fc.{p}",
    "blocks.{i}.mlp.fc2.{p}": "transformer.h.{i}.mlp.c_proj.{p}",
    "final_norm.{p}": "transformer.ln_f.{p}",
    "lm_head.weight": "lm_head.weight",
}
# old GPT-2 files keep the causal-mask buffers; nothing reads them
GPT2_UNUSED = (r"transformer\.h\.\d+\.attn\.(masked_)?bias",)


def _rope_theta(c: dict, where: str) -> float:
    rp = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    kind = rp.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise GlimpseError(f"{where}: RoPE scaling {kind!r} is not supported (plain RoPE only)")
    return float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))


def decoder_config(c: dict, where: str) -> DecoderConfig:
    """A glimpse DecoderConfig from a Llama / Mistral / Qwen2 / GPT-2 config.json."""
    mt = c.get("model_type", "")
    if mt == "gpt2":
        if c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn"):
            raise GlimpseError(f"{where}: GPT-2 attention variants are not supported")
        width = c.get("n_embd", 768)
        return DecoderConfig(arch="gpt2", vocab_size=c["vocab_size"], width=width, layers=c.get("n_layer", 12),
                             heads=c.get("n_head", 12), mlp_hidden=c.get("n_inner") or 4 * width,
                             context_length=c.get("n_positions", 1024), tie_embeddings=True,
                             norm_eps=c.get("layer_norm_epsilon", 1e-5),
                             act={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                                  "quick_gelu": "quick_gelu"}.get(c.get("activation_function", "gelu_new"), "?"))
    if mt not in LLAMA_TYPES:
        raise GlimpseError(f"{where}: model_type {mt!r} is not a causal LM glimpse knows ({', '.join(LLAMA_TYPES)}, gpt2)")
    width, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, width // heads):
        raise GlimpseError(f"{where}: head_dim {c['head_dim']} differs from hidden_size / heads ({width // heads})")
    if c.get("mlp_bias"):
        raise GlimpseError(f"{where}: MLP biases are not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise GlimpseError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (silu only)")
    if mt == "qwen2":
        qkv_bias = True
    elif c.get("attention_bias"):
        raise GlimpseError(f"{where}: attention_bias on the output projection is not supported")
    else:
        qkv_bias = False
    if mt == "qwen2" and c.get("use_sliding_window"):
        raise GlimpseError(f"{where}: Qwen2 sliding-window attention is not supported")
    return DecoderConfig(arch="llama", vocab_size=c["vocab_size"], width=width, layers=c["num_hidden_layers"],
                         heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                         mlp_hidden=c["intermediate_size"], context_length=c.get("max_position_embeddings", 2048),
                         rope_theta=_rope_theta(c, where), qkv_bias=qkv_bias,
                         tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                         norm_eps=c.get("rms_norm_eps", 1e-6))


def decoder_rules(cfg: DecoderConfig, hf_prefix: str = "", ours_prefix: str = "",
                  lm_head: str = "lm_head.weight") -> list:
    """Rules for a resolved DecoderConfig; `lm_head` is the head's full Hugging Face name (LLaVA's
    sits elsewhere), left out when tied."""
    gpt2 = cfg.arch == "gpt2"
    rules = []
    for ours, theirs in (GPT2_KEYS if gpt2 else LLAMA_KEYS).items():
        if ours == "lm_head.weight":
            continue
        bias = gpt2 or (cfg.qkv_bias and ".attn." in ours and ours.split(".")[3] in "qkv")
        conv1d = gpt2 and ".h." in theirs and ("attn.c_" in theirs or "mlp.c_" in theirs)
        for r in params([rule(ours, theirs)], bias=bias):
            if conv1d and r.ours[0].endswith(".weight"):
                r = rule(r.ours, r.hf, *TRANSPOSE)
            rules.append(r)
    rules = expand(rules, cfg.layers, ours_prefix, hf_prefix)
    if not cfg.tie_embeddings:
        rules.append(rule(ours_prefix + "lm_head.weight", lm_head))
    return rules


def hf_decoder_config(cfg: DecoderConfig) -> dict:
    """A LlamaForCausalLM / Qwen2ForCausalLM / GPT2LMHeadModel config.json for a resolved glimpse DecoderConfig."""
    if cfg.arch == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "quick_gelu": "quick_gelu"}.get(cfg.act)
        if act is None:
            raise GlimpseError(f"export: GPT-2 activation {cfg.act!r} has no Hugging Face equivalent")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_embd": cfg.width, "n_layer": cfg.layers, "n_head": cfg.heads, "n_inner": cfg.mlp_hidden,
                "n_positions": cfg.context_length, "layer_norm_epsilon": cfg.norm_eps, "activation_function": act,
                "tie_word_embeddings": True}
    if cfg.act != "silu":
        raise GlimpseError(f"export: Llama-family activation {cfg.act!r} has no Hugging Face equivalent")
    mt = "qwen2" if cfg.qkv_bias else "llama"
    return {"architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"], "model_type": mt,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "intermediate_size": cfg.mlp_hidden,
            "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.width // cfg.heads, "max_position_embeddings": cfg.context_length,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "use_sliding_window": False}


def lm_part(c: dict, sd: dict, target, where: str) -> tuple[list, dict, tuple]:
    """(rules, tensors, unused) that fill the causal LM `target` from a folder's LM config `c` and tensors
    (the recipe's LM must have the checkpoint's architecture)."""
    ours = decoder_config(c, where)
    same_config(ours.resolved(), target.cfg, where, "lm")
    unused = (*GPT2_UNUSED, r"lm_head\.weight") if ours.arch == "gpt2" else \
        ((r"lm_head\.weight",) if target.cfg.tie_embeddings else ())
    return decoder_rules(target.cfg), sd, unused
