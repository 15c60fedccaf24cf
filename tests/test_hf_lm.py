"""Llama / Mistral / Qwen2 / SmolLM-style and GPT-2 folders: logits (padded batches) and greedy
generations equal transformers'."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import randomize, save, write_tokenizer
from torch.testing import assert_close

import glimpse
from glimpse.errors import GlimpseError
from glimpse.families import load_hf
from glimpse.families.causal_lm.pipeline import LanguageModelPipeline
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.models.decoder import CausalLM, positions_from_mask

transformers = pytest.importorskip("transformers")

V = 64
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def family_model(family: str):
    T = transformers
    if family == "llama_gqa":  # grouped-query attention, untied head
        return T.LlamaForCausalLM(T.LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False))
    if family == "smollm_tied":  # SmolLM: a Llama with tied embeddings
        return T.LlamaForCausalLM(T.LlamaConfig(**COMMON, num_key_value_heads=1, tie_word_embeddings=True,
                                                rope_theta=100000.0))
    if family == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None))
    if family == "qwen2":  # q/k/v biases, tied
        return T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True))
    cfg = T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)
    return T.GPT2LMHeadModel(cfg)


FAMILIES = ["llama_gqa", "smollm_tied", "mistral", "qwen2", "gpt2"]


def padded_batch():
    torch.manual_seed(2)
    ids = torch.randint(3, V, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_generation(tmp_path, family):
    hf = randomize(family_model(family))
    save(hf, tmp_path)
    loaded = load_hf(tmp_path)
    assert loaded.family == "causal_lm" and isinstance(loaded.model, CausalLM)
    ours = loaded.model
    ids, mask = padded_batch()
    pos = positions_from_mask(mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, mask, position_ids=pos)
    real = mask.bool()
    assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)

    # greedy, batched with left padding on both sides, eos ignored: token for token
    hf.generation_config.eos_token_id = None
    prompts = [ids[i][mask[i].bool()].tolist() for i in range(3)]
    with torch.no_grad():
        hf_out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0)
    ours_out = generate(ours, prompts, GenerationConfig(max_new_tokens=8), pad_id=0)
    assert ours_out == hf_out[:, ids.shape[1]:].tolist()


def test_glimpse_load_returns_a_language_model_pipeline(tmp_path):
    hf = randomize(family_model("qwen2"))
    save(hf, tmp_path)
    write_tokenizer(tmp_path, [f"w{i}" for i in range(V - 4)], ["<pad>", "<s>", "</s>", "<unk>"])
    pipe = glimpse.load(tmp_path)
    assert isinstance(pipe, LanguageModelPipeline)
    text = pipe.generate(["w1 w2 w3"], max_new_tokens=5)[0]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor([[1, 5, 6, 7]]), do_sample=False, max_new_tokens=5, pad_token_id=0)
    assert text == pipe.tokenizer.decode(ref[0, 4:].tolist()).strip()


def test_unsupported_settings_are_clear_errors(tmp_path):
    cfg = transformers.LlamaConfig(**COMMON, rope_scaling={"rope_type": "linear", "factor": 2.0})
    save(transformers.LlamaForCausalLM(cfg), tmp_path)
    with pytest.raises(GlimpseError, match="RoPE scaling 'linear'"):
        load_hf(tmp_path)
