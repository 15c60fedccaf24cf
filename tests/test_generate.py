"""Generation: parity with transformers (greedy, beams), batch invariance, sampling, stopping, streaming."""

from __future__ import annotations

import copy
import itertools
import pickle
import shutil

import pytest
import torch
from test_decoder import V, convert, hf_randomize, tiny

from glimpse.infer.generate import GenerationConfig, _beam_events, _pick, generate, stream
from glimpse.models.decoder import CausalLM, DecoderConfig

PROMPTS = [[5, 17, 3, 40, 22, 9, 31, 2, 11], [7, 1, 50, 33, 12], [19, 28, 4, 45, 60, 8, 14]]


def greedy(n=8, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, ignore_eos=True, **kw)


def letters(ids: list[int]) -> str:
    return "".join(chr(0x41 + i) for i in ids)  # one character per token


@torch.no_grad()
def logprob(model, prompt: list[int], new: list[int]) -> float:
    """Total log-probability of `new` after `prompt`, from one full forward pass."""
    logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1:-1].log_softmax(-1)
    return logits.gather(-1, torch.tensor(new)[:, None]).sum().item()


# ---- parity with transformers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_pair():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attn_implementation="eager")
    hf = hf_randomize(transformers.LlamaForCausalLM(hf_cfg))
    hf.generation_config.eos_token_id = None  # compare fixed-length outputs (our ignore_eos)
    hf.generation_config.pad_token_id = 0
    rope = getattr(hf_cfg, "rope_parameters", None) or {"rope_theta": hf_cfg.rope_theta}
    ours = CausalLM(DecoderConfig(
        arch="llama", vocab_size=V, width=32, layers=2, heads=4, kv_heads=2, mlp_hidden=48,
        context_length=64, rope_theta=rope["rope_theta"], tie_embeddings=False, norm_eps=1e-6)).eval()
    ours.load_state_dict(convert(hf.state_dict(), ours), strict=False)
    T = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    return ours, hf, ids, mask


def test_greedy_matches_transformers(hf_pair):
    ours, hf, ids, mask = hf_pair
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert generate(ours, PROMPTS, greedy(10)) == ref[:, ids.shape[1]:].tolist()


def test_beam_search_matches_transformers(hf_pair):
    ours, hf, ids, mask = hf_pair
    try:
        ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=3,
                          max_new_tokens=6, early_stopping=True)
    except Exception as e:  # transformers moves decoding strategies around between versions
        pytest.skip(f"transformers beam search unavailable: {e}")
    base = ref[:, ids.shape[1]:].tolist()
    assert generate(ours, PROMPTS, greedy(6, num_beams=3)) == base
    for eos in sorted({t for row in base for t in row}):  # finished hypotheses, scoring, stopping
        ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=3, max_new_tokens=6,
                          early_stopping=True, eos_token_id=eos)[:, ids.shape[1]:].tolist()
        ref = [row[:row.index(eos)] if eos in row else row for row in ref]  # HF keeps eos, then pads
        assert generate(ours, PROMPTS, GenerationConfig(max_new_tokens=6, num_beams=3, eos_token_id=eos)) == ref


# ---- greedy and batching --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_invariance(arch):
    model = tiny(arch)
    batch = generate(model, PROMPTS, greedy(10))
    assert [generate(model, [p], greedy(10))[0] for p in PROMPTS] == batch
    assert generate(model, PROMPTS[::-1], greedy(10)) == batch[::-1]
    assert all(len(out) == 10 for out in batch)


def test_prefix_embeds_and_validation():
    model = tiny()
    embeds = [model.embed(torch.tensor(p)).detach() for p in PROMPTS]
    placeholders = [[0] * len(p) for p in PROMPTS]  # ids only give lengths when embeds are passed
    assert generate(model, placeholders, greedy(), prefix_embeds=embeds) == generate(model, PROMPTS, greedy())
    with pytest.raises(ValueError):
        generate(model, [[1, 2]], greedy(), prefix_embeds=[embeds[0]])
    with pytest.raises(ValueError):
        generate(model, [[]], greedy())
    with pytest.raises(ValueError):
        generate(model, PROMPTS, greedy(stop_strings=["x"]))  # no decode
    assert generate(model, PROMPTS, greedy(0)) == [[], [], []]


# ---- sampling -------------------------------------------------------------------------------------

def test_sampling_seeds():
    model = tiny()
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, seed=3, ignore_eos=True)
    first = generate(model, PROMPTS, cfg)
    assert generate(model, PROMPTS, cfg) == first
    other = generate(model, PROMPTS, GenerationConfig(**{**cfg.__dict__, "seed": 4}))
    assert other != first
    assert first != generate(model, PROMPTS, greedy(12))


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny()
    ref = generate(model, PROMPTS, greedy())
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        cfg = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=2.0, seed=0, ignore_eos=True, **kw)
        assert generate(model, PROMPTS, cfg) == ref


def test_a_vanishing_temperature_is_greedy_not_nan():
    model = tiny()  # logits / 1e-40 overflow float32: every probability would be NaN
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1e-40, seed=0, ignore_eos=True)
    assert generate(model, PROMPTS, cfg) == generate(model, PROMPTS, greedy())


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(2000, 4)
    gen = torch.Generator().manual_seed(0)
    for top_p, allowed in ((0.45, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2})):
        drawn = set(_pick(logits, GenerationConfig(do_sample=True, top_p=top_p), gen).tolist())
        assert drawn == allowed
    drawn = set(_pick(logits, GenerationConfig(do_sample=True, top_k=2), gen).tolist())
    assert drawn == {0, 1}


# ---- stopping -------------------------------------------------------------------------------------

def test_eos_stops_each_row():
    model = tiny()
    full = generate(model, PROMPTS, greedy(12))
    eos = full[1][4]  # row 1 stops where it first produces this token
    expected = [out[:out.index(eos)] if eos in out else out for out in full]
    assert expected[1] == full[1][:full[1].index(eos)]
    cfg = GenerationConfig(max_new_tokens=12, eos_token_id=eos)
    assert generate(model, PROMPTS, cfg) == expected
    cfg.eos_token_id = [V - 1, eos]
    assert generate(model, PROMPTS, cfg) == expected
    cfg.ignore_eos = True
    assert generate(model, PROMPTS, cfg) == full


def test_stop_strings_cut_before_completing_token():
    model = tiny()
    full = generate(model, PROMPTS, greedy(12))
    stop = letters(full[0][5:7])
    k = next(i for i in range(12) if stop in letters(full[0][:i + 1]))  # the completing token
    got = generate(model, PROMPTS, greedy(12, stop_strings=["\x00never", stop]), decode=letters)
    assert got[0] == full[0][:k] and stop not in letters(got[0])
    for out, ref in zip(got[1:], full[1:]):  # other rows stop only if they produce it too
        assert out == ref[:len(out)]


# ---- streaming ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"do_sample": True, "seed": 5, "top_p": 0.9}, {"eos_token_id": 3}])
def test_stream_and_on_token_match_generate(kw):
    model = tiny()
    cfg = GenerationConfig(max_new_tokens=10, **kw)
    seen: list[list[int]] = [[] for _ in PROMPTS]
    out = generate(model, PROMPTS, cfg, on_token=lambda row, tok: seen[row].append(tok))
    assert seen == out
    it = stream(model, PROMPTS[1], cfg)
    assert next(it) == generate(model, [PROMPTS[1]], cfg)[0][0]  # a real generator, token by token
    assert [next(it)] + list(it) == generate(model, [PROMPTS[1]], cfg)[0][1:]
    assert torch.is_grad_enabled()  # no_grad does not leak out of the generator


# ---- beam search ----------------------------------------------------------------------------------

def test_one_beam_is_greedy():
    model = tiny()
    for cfg in (greedy(8), GenerationConfig(max_new_tokens=8, eos_token_id=generate(model, PROMPTS, greedy())[0][3])):
        out: list[list[int]] = [[] for _ in PROMPTS]
        list(_beam_events(model, PROMPTS, cfg, 0, None, out))
        assert out == generate(model, PROMPTS, cfg)
        cfg.num_beams = 1
        assert generate(model, PROMPTS, cfg) == out


def test_beams_score_at_least_greedy():
    model = tiny()
    ref = generate(model, PROMPTS, greedy(6))
    beams = generate(model, PROMPTS, greedy(6, num_beams=4))
    for p, g, b in zip(PROMPTS, ref, beams):
        assert len(b) == 6 and logprob(model, p, b) >= logprob(model, p, g) - 1e-5
    assert beams != ref  # the search did find something better somewhere


def test_full_width_beams_are_exhaustive():
    model = tiny()
    got = generate(model, PROMPTS[:2], greedy(2, num_beams=V))
    pairs = torch.tensor(list(itertools.product(range(V), repeat=2)))  # every 2-token continuation
    for p, b in zip(PROMPTS, got):
        with torch.no_grad():  # score all V * V of them in one batch
            ids = torch.cat([torch.tensor(p).expand(len(pairs), -1), pairs], 1)
            lp = model(ids)[:, len(p) - 1:-1].log_softmax(-1).gather(-1, pairs[..., None]).sum((1, 2))
        assert b == pairs[lp.argmax()].tolist()


def test_beam_eos_not_returned():
    model = tiny()
    ref = generate(model, PROMPTS, greedy(8, num_beams=3))
    eos = ref[0][2]
    got = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, num_beams=3, eos_token_id=eos))
    assert all(eos not in out and len(out) <= 8 for out in got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled-graph"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cuda_graph_decoding_equals_eager(arch, compile):
    from glimpse.infer.generate import GenerationConfig, generate
    from glimpse.models.decoder import CausalLM, DecoderConfig

    torch.manual_seed(0)
    m = CausalLM(DecoderConfig(arch=arch, vocab_size=97, width=64, layers=2, heads=4,
                               kv_heads=2 if arch == "llama" else 4, context_length=64)).cuda().eval()
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]]
    for cfg in (dict(), dict(do_sample=True, temperature=0.8, top_p=0.9, seed=3)):
        eager = generate(m, prompts, GenerationConfig(max_new_tokens=12, cuda_graph=False, ignore_eos=True, **cfg))
        graph = generate(m, prompts, GenerationConfig(max_new_tokens=12, cuda_graph=True, ignore_eos=True,
                                                      compile=compile, **cfg))
        assert graph == eager


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor's CPU code needs a C++ compiler")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_cpu_decoding_equals_eager(arch, monkeypatch):
    """The compiled CPU step and prefill (weights frozen as constants) give eager's tokens, greedy and
    seeded sampling; prompts of another length in the same cache bucket reuse the compiled programs
    (learned positions too); and weights changed in place after compiling are not run stale."""
    from torch._dynamo.utils import counters

    from glimpse.infer import static_decode
    from glimpse.infer.generate import GenerationConfig, generate
    from glimpse.models import attention
    from glimpse.models.decoder import CausalLM, DecoderConfig

    torch.manual_seed(0)
    m = CausalLM(DecoderConfig(arch=arch, vocab_size=97, width=32, layers=1, heads=2,
                               kv_heads=1 if arch == "llama" else 2, context_length=64)).eval()
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]]

    def both(prompts, **cfg):
        eager = generate(m, prompts, GenerationConfig(max_new_tokens=10, ignore_eos=True, **cfg))
        return eager, generate(m, prompts, GenerationConfig(max_new_tokens=10, ignore_eos=True, compile=True, **cfg))

    before = counters["stats"]["unique_graphs"]
    eager, compiled = both(prompts)
    assert compiled == eager and counters["stats"]["unique_graphs"] > before  # it did compile
    assert {"prefill", "step-max-autotune"} <= set(static_decode._compiled)  # the prompts' pass too
    compiled_once = counters["stats"]["unique_graphs"]
    eager, compiled = both([p + [20, 21, 22] for p in prompts])  # 8 tokens, not 5: the same 64-slot bucket
    assert compiled == eager and counters["stats"]["unique_graphs"] == compiled_once
    if arch == "llama":
        eager, compiled = both(prompts, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
        assert compiled == eager
        one_query = attention._one_query
        calls = []
        monkeypatch.setattr(attention, "_one_query", lambda *a: calls.append(1) or one_query(*a))
        eager, compiled = both(prompts[:1])  # batch 1: the step's attention is `_one_query`'s products
        assert compiled == eager and calls
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)  # in place: the same tensors, a new version
        m.blocks[0].attn.o.weight.add_(torch.randn_like(m.blocks[0].attn.o.weight))  # inside prefill and step
    eager, compiled = both(prompts)
    assert compiled == eager
    with pytest.raises(ValueError, match="beam search"):
        generate(m, prompts, GenerationConfig(max_new_tokens=4, num_beams=2, compile=True))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_one_query_attention_equals_sdpa(kv_heads):
    """A batch-1 compiled decode step's attention (two products and a softmax) equals SDPA's, grouped
    query heads and a cache mask included."""
    import torch.nn.functional as F

    from glimpse.models.attention import _one_query

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 8, generator=g)
    k, v = torch.randn(2, 1, kv_heads, 11, 8, generator=g)
    mask = torch.rand(1, 1, 1, 11, generator=g) > 0.3
    mask[..., -1] = True
    for m in (None, mask):
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4 // kv_heads, 1),
                                             v.repeat_interleave(4 // kv_heads, 1), attn_mask=m)
        torch.testing.assert_close(_one_query(q, k, v, m), ref)


# ---- continuous batching: rows join a running batch and leave it ----------------------------------

LATE = [[33, 2, 48, 5, 9, 27, 40, 1, 13, 56, 21, 30, 7, 44, 18, 3], [8, 29], [51, 6, 36, 22]]


def run_schedule(model, cfg, joins, removals=None, decode=None):
    """Drive a running DecodeBatch: joins {step: [(prompt, max_new_tokens)]}, removals {step: [name]};
    -> {name: tokens}, names being (step, i).  Checks after every step that the cache holds no column
    that no row reads."""
    from glimpse.infer.batch import DecodeBatch

    batch, out, names, step, removals = DecodeBatch(model, cfg, decode=decode), {}, {}, 0, removals or {}
    widths = []
    while step <= max(joins) or batch.running:
        if step in joins:
            prompts, limits = zip(*joins[step])
            for i, h in enumerate(batch.add(list(prompts), max_new_tokens=list(limits))):
                names[h] = (step, i)
                out[(step, i)] = []
        batch.remove([h for h in batch.running if names[h] in removals.get(step, ())])
        events, _ = batch.choose()
        for h, tok in events:
            out[names[h]].append(tok)
        batch.advance()
        if batch.running:
            assert batch.mask.shape[1] == int(batch.mask.sum(1).max())  # compact: no all-padding column
            widths.append(batch.mask.shape[1])
        step += 1
    return out, widths


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_that_join_a_running_batch_decode_as_alone(arch):
    model = tiny(arch)
    joins = {0: [(PROMPTS[0], 12)],
             3: [(PROMPTS[1], 6), (PROMPTS[2], 10)],  # shorter than the batch: padded on the left
             5: [(LATE[0], 9)],  # longer than the batch: the running rows get the padding
             7: [(LATE[1], 8), (LATE[2], 3)]}
    out, widths = run_schedule(model, greedy(), joins)
    for step, rows in joins.items():
        for i, (prompt, n) in enumerate(rows):
            assert out[(step, i)] == generate(model, [prompt], greedy(n))[0], (step, i)
            assert len(out[(step, i)]) == n
    assert max(widths) <= model.cfg.context_length  # gpt2's learned positions bound the columns
    assert max(widths) == len(LATE[0]) + 8  # the longest row sets the width, padding is trimmed


def test_finished_rows_leave_and_the_others_continue():
    model = tiny()
    full = generate(model, PROMPTS, greedy(12))
    eos = full[1][3]  # row 1 ends early on it; others may too, each where it first produces it
    cfg = GenerationConfig(max_new_tokens=12, eos_token_id=eos)
    expected = generate(model, PROMPTS, cfg)
    joins = {0: [(PROMPTS[0], 12), (PROMPTS[1], 12)], 2: [(PROMPTS[2], 12)], 4: [(LATE[1], 12)]}
    out, _ = run_schedule(model, cfg, joins, removals={4: [(0, 0)]})  # row (0, 0)'s client leaves at step 4
    assert out[(0, 1)] == expected[1] and len(out[(0, 1)]) < 12
    assert out[(2, 0)] == expected[2]
    assert out[(0, 0)] == expected[0][:4]  # what it had before it left
    assert out[(4, 0)] == generate(model, [LATE[1]], cfg)[0]
    # stop strings: a row ends where its text holds one, the token that completed it dropped
    stop = letters(full[0][5:7])
    got, _ = run_schedule(model, greedy(12, stop_strings=[stop]), {0: [(PROMPTS[1], 12)], 1: [(PROMPTS[0], 12)]},
                          decode=letters)
    assert got[(1, 0)] == generate(model, [PROMPTS[0]], greedy(12, stop_strings=[stop]), decode=letters)[0]
    assert stop not in letters(got[(1, 0)]) and len(got[(1, 0)]) < 12


def test_a_running_batch_refuses_misuse():
    from glimpse.infer.batch import DecodeBatch

    model = tiny()
    batch = DecodeBatch(model, greedy())
    batch.add([PROMPTS[0]])
    batch.choose()
    with pytest.raises(RuntimeError):  # rows join between steps
        batch.add([PROMPTS[1]])
    with pytest.raises(ValueError):
        DecodeBatch(model, greedy(num_beams=2))
    fixed = DecodeBatch(model, greedy(), fixed=True)
    fixed.add([PROMPTS[0]])
    with pytest.raises(ValueError):
        fixed.add([PROMPTS[1]])
    with pytest.raises(ValueError):
        DecodeBatch(model, greedy()).add([PROMPTS[0]], max_new_tokens=0)


# ---- oneDNN-packed weights for decoding on a CPU --------------------------------------------------

def test_packed_linear_equals_linear_and_never_goes_stale():
    from glimpse.infer.packed_linear import PackedLinear, available, pack_linears

    if not available():
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 8, bias=False))
    keys = list(model.state_dict())
    assert pack_linears(model) == 2 and pack_linears(model) == 0  # once per model
    assert all(type(m) is PackedLinear for m in (model[0], model[2])) and list(model.state_dict()) == keys
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        packed = model(x)
        assert model[0]._packed is not None  # the packed path ran
        plain = model[2](torch.nn.functional.gelu(torch.nn.functional.linear(x, model[0].weight, model[0].bias)))
        torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
        strided = torch.randn(5, 3, 24).transpose(0, 1)  # a view whose rows are not contiguous
        torch.testing.assert_close(model[0](strided), torch.nn.functional.linear(strided, model[0].weight,
                                                                                 model[0].bias), atol=1e-5, rtol=1e-5)
        model[0].weight.add_(0.5)  # an in-place change (an optimizer step, load_state_dict) re-packs
        changed = model(x)
        assert not torch.allclose(changed, packed, atol=1e-3)
        torch.testing.assert_close(changed, model[2](torch.nn.functional.gelu(
            torch.nn.functional.linear(x, model[0].weight, model[0].bias))), atol=1e-5, rtol=1e-5)
        one = x[:1, :1]  # one row: packed or F.linear, whichever this machine runs faster (timed once)
        torch.testing.assert_close(model[0](one), torch.nn.functional.linear(one, model[0].weight, model[0].bias),
                                   atol=1e-5, rtol=1e-5)
        assert isinstance(model[0]._one_row_packed, bool)
        model[0]._one_row_packed = not model[0]._one_row_packed  # and the other way gives the same
        torch.testing.assert_close(model[0](one), torch.nn.functional.linear(one, model[0].weight, model[0].bias),
                                   atol=1e-5, rtol=1e-5)
        twin = copy.deepcopy(model)  # a used model copies (randomised explanations, EMA teachers) and pickles
        assert twin[0]._packed is None and type(twin[0]) is PackedLinear
        torch.testing.assert_close(twin(x), model(x))
        assert pickle.loads(pickle.dumps(model))[0]._packed is None
    y = model(x)  # with autograd on, the plain F.linear: gradients flow as before
    y.sum().backward()
    assert model[0].weight.grad is not None and model[2].weight.grad is not None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoding_on_packed_weights_equals_plain(arch):
    torch.manual_seed(0)
    cfg = DecoderConfig(arch=arch, vocab_size=97, width=64, layers=2, heads=4,
                        kv_heads=2 if arch == "llama" else 4, context_length=64)
    packed, plain = CausalLM(cfg).eval(), CausalLM(cfg).eval()
    plain.load_state_dict(packed.state_dict())
    plain._glimpse_packed = True  # marks it done: pack_linears leaves it plain
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]]
    for kw in (dict(), dict(do_sample=True, temperature=0.8, seed=3), dict(num_beams=3)):
        assert generate(packed, prompts, greedy(12, **kw)) == generate(plain, prompts, greedy(12, **kw))
    from glimpse.infer.packed_linear import PackedLinear, available

    assert any(type(m) is PackedLinear for m in packed.modules()) == available()
    assert not any(type(m) is PackedLinear for m in plain.modules())
