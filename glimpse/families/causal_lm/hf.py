"""Llama-family (Llama, Mistral, Qwen2, SmolLM) and GPT-2 folders <-> a causal LM; export writes
LlamaForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel folders.  The map itself is glimpse.hub.decoder's."""

from __future__ import annotations

import json
from pathlib import Path

from glimpse.errors import GlimpseError
from glimpse.families.base import HFBuild
from glimpse.hub import folder as hf
from glimpse.hub.decoder import (
    GPT2_UNUSED,
    LLAMA_TYPES,
    decoder_config,
    decoder_rules,
    hf_decoder_config,
    lm_part,
)
from glimpse.hub.export import HFFolder, special_tokens, token_ids
from glimpse.models.decoder import CausalLM

MODEL_TYPES = (*LLAMA_TYPES, "gpt2")


def build(folder: Path, c: dict) -> HFBuild:
    """The CausalLM (random weights), rules, tensors and unused patterns of an LM folder."""
    cfg = decoder_config(c, str(folder))
    model = CausalLM(cfg)
    sd, unused = hf.read_safetensors(folder), ()
    if c.get("model_type") == "gpt2":
        if not any(k.startswith("transformer.") for k in sd):  # a GPT2Model file: no prefix
            sd = {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in sd.items()}
        unused = (*GPT2_UNUSED, r"lm_head\.weight")
    elif cfg.tie_embeddings:
        unused = (r"lm_head\.weight",)
    return HFBuild(model, decoder_rules(model.cfg), sd, unused)


def part(folder: Path, c: dict, target) -> tuple[list, dict, tuple]:
    if not isinstance(target, CausalLM):
        raise GlimpseError(f"{folder} ({c.get('model_type')}) is a language model: it has no "
                           f"{type(target).__name__}")
    return lm_part(c, hf.read_safetensors(folder), target, str(folder))


def to_hf(model: CausalLM, tok) -> HFFolder:
    ids = token_ids(tok)
    config = {**hf_decoder_config(model.cfg), **ids}
    return HFFolder(config, dict(model.state_dict()), decoder_rules(model.cfg), json.loads(Path(tok.path).read_text()),
                    special_tokens(tok), model.cfg.context_length, generation_config=ids)
