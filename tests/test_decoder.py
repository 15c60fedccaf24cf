"""Causal decoder LM: shapes, KV cache, padding, causality, and logit parity with transformers."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from glimpse.models.decoder import CausalLM, DecoderConfig, positions_from_mask

V = 61


def tiny(arch: str = "llama", **kw) -> CausalLM:
    torch.manual_seed(0)
    base = dict(arch=arch, vocab_size=V, width=32, layers=2, heads=4, context_length=32)
    if arch == "llama":
        base.update(kv_heads=2, qkv_bias=True)
    model = CausalLM(DecoderConfig(**{**base, **kw})).eval()
    with torch.no_grad():  # the 0.02 init makes every logit ~0: spread them out so comparisons bite
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


ARCHS = ["llama", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_shape(arch):
    model = tiny(arch)
    assert model(torch.randint(0, V, (2, 7))).shape == (2, 7, V)
    embeds = model.embed(torch.randint(0, V, (2, 5)))
    assert embeds.shape == (2, 5, 32)
    assert model(inputs_embeds=embeds).shape == (2, 5, V)


def test_config_defaults_and_tying():
    m = CausalLM(DecoderConfig(vocab_size=V, width=32, layers=1, heads=4))
    assert m.cfg.kv_heads == 4 and m.cfg.mlp_hidden == 128 and m.cfg.act == "silu"  # int(85.3) -> 128
    assert m.lm_head.weight.data_ptr() == m.token_embed.weight.data_ptr()
    g = CausalLM(DecoderConfig(arch="gpt2", vocab_size=V, width=32, layers=1, heads=4))
    assert g.cfg.mlp_hidden == 128 and g.cfg.act == "gelu_tanh"
    assert g.lm_head.weight.data_ptr() == g.token_embed.weight.data_ptr()
    u = CausalLM(DecoderConfig(vocab_size=V, width=32, layers=1, heads=4, tie_embeddings=False))
    assert u.lm_head.weight.data_ptr() != u.token_embed.weight.data_ptr()
    with pytest.raises(ValueError):
        CausalLM(DecoderConfig(arch="gpt2", vocab_size=V, width=32, layers=1, heads=4, kv_heads=2))


def test_gqa():
    model = tiny(kv_heads=1)
    assert model.blocks[0].attn.k.weight.shape == (8, 32) and model.blocks[0].attn.q.weight.shape == (32, 32)
    logits = model(torch.randint(0, V, (2, 6)))
    assert logits.shape == (2, 6, V) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_kv_cache_matches_full_forward(arch):
    model = tiny(arch)
    ids = torch.randint(0, V, (2, 9))
    full = model(ids)
    cache = model.new_cache(2, 12)
    model(ids[:, :5], cache=cache)  # prefill
    for t in range(5, 9):  # several decode steps in a row
        assert_close(model(ids[:, t:t + 1], cache=cache)[:, 0], full[:, t])
    assert cache.length == 9
    cache.crop(8)  # rewind one token and redo it
    assert_close(model(ids[:, 8:], cache=cache)[:, 0], full[:, 8])
    cache.reset()
    assert_close(model(ids[:, :6], cache=cache), full[:, :6])
    assert_close(model(ids[:, 6:], cache=cache), full[:, 6:])  # several new tokens after a prefix
    with pytest.raises(ValueError):
        model(ids[:, :4], cache=cache)  # 9 + 4 > 12


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_left_padding_matches_single_sequences(arch):
    model = tiny(arch)
    a, b = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 4))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])  # [2, 7], b left-padded
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    pos = positions_from_mask(mask)
    logits = model(ids, mask, position_ids=pos)
    assert torch.isfinite(logits).all()
    assert_close(logits[0], model(a)[0])
    assert_close(logits[1, 3:], model(b)[0])

    # prefill all but the last token, then decode it (and one more) through the cache
    nxt = torch.randint(0, V, (2, 1))
    alone = [model(torch.cat([a, nxt[:1]], 1))[0, -2:], model(torch.cat([b, nxt[1:]], 1))[0, -2:]]
    cache = model.new_cache(2, 10)
    out = model(ids[:, :-1], mask[:, :-1], position_ids=pos[:, :-1], cache=cache)
    assert torch.isfinite(out).all()
    last = model(ids[:, -1:], mask, position_ids=pos[:, -1:], cache=cache)[:, 0]
    mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    step = model(nxt, mask, position_ids=pos[:, -1:] + 1, cache=cache)[:, 0]
    for i in range(2):
        assert_close(torch.stack([last[i], step[i]]), alone[i])


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_causality(arch):
    model = tiny(arch)
    ids = torch.randint(0, V, (1, 8))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % V
    x, y = model(ids), model(changed)
    assert_close(x[:, :5], y[:, :5])
    assert not torch.allclose(x[:, 5:], y[:, 5:])


# ---- parity with transformers ---------------------------------------------------------------------

def convert(hf_sd: dict, ours: CausalLM) -> dict:
    """Our state dict from a transformers one, through the production mapping (glimpse.hub.decoder)."""
    from glimpse.hub.decoder import GPT2_UNUSED, decoder_rules
    from glimpse.hub.mapping import from_hf

    unused = (*GPT2_UNUSED, r"lm_head\.weight") if ours.cfg.tie_embeddings else ()
    return from_hf(hf_sd, decoder_rules(ours.cfg), ours.state_dict(), "transformers", unused)


def hf_randomize(hf):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            is_norm = "norm" in name or "ln_" in name
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_norm else 0.2 * torch.randn_like(p))
    return hf.eval()


def padded_batch():
    torch.manual_seed(2)
    ids = torch.randint(0, V, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :1] = 0
    return ids, mask, positions_from_mask(mask)


def check_parity(ours: CausalLM, hf) -> None:
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, mask, position_ids=pos)
        assert torch.isfinite(got).all()
        real = mask.bool()
        assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
        cache = ours.new_cache(3, 9)  # and through the cache: prefill 6, decode 3
        steps = [ours(ids[:, :6], mask[:, :6], position_ids=pos[:, :6], cache=cache)]
        for t in range(6, 9):
            steps.append(ours(ids[:, t:t + 1], mask[:, :t + 1], position_ids=pos[:, t:t + 1], cache=cache))
        assert_close(torch.cat(steps, 1)[real], ref[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_parity_llama_qwen2(family):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6,
                  attn_implementation="eager")  # an independent reference, not SDPA again
    if family == "llama":
        hf_cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        hf = transformers.Qwen2ForCausalLM(hf_cfg)
    hf = hf_randomize(hf)
    rope_theta = getattr(hf_cfg, "rope_parameters", None) or {"rope_theta": hf_cfg.rope_theta}
    ours = CausalLM(DecoderConfig(
        arch="llama", vocab_size=V, width=32, layers=2, heads=4, kv_heads=2, mlp_hidden=48,
        context_length=32, rope_theta=rope_theta["rope_theta"], qkv_bias=family == "qwen2",
        tie_embeddings=hf_cfg.tie_word_embeddings, norm_eps=1e-6)).eval()
    ours.load_state_dict(convert(hf.state_dict(), ours), strict=False)
    check_parity(ours, hf)


def test_parity_gpt2():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                     bos_token_id=0, eos_token_id=0,
                                     attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    hf = hf_randomize(hf)
    ours = CausalLM(DecoderConfig(arch="gpt2", vocab_size=V, width=32, layers=2, heads=4,
                                  context_length=32, norm_eps=1e-5)).eval()
    ours.load_state_dict(convert(hf.state_dict(), ours), strict=False)
    check_parity(ours, hf)
