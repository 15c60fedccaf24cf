"""Flamingo's parts: the Perceiver resampler, gated cross-attention and FlamingoModel.

Gates at 0 give exactly the language model; with open gates each token reads only its latest image,
padded images and text before the first image read nothing; cached generation equals recomputing;
and the resampler and gated block equal OpenFlamingo's (open-flamingo 2.0.1) through the key map
a loader uses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from glimpse.families.flamingo.hf import from_openflamingo
from glimpse.families.flamingo.model import FlamingoConfig, FlamingoModel, xattn_layers
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.models.cross_attention import media_index_of
from glimpse.models.decoder import DecoderConfig
from glimpse.models.vision import VisionConfig

V, IMG = 50, 49


def config(style: str, **kw) -> FlamingoConfig:
    base = dict(vision=VisionConfig(image_size=16, patch_size=4, width=24, layers=1, heads=2),
                lm=DecoderConfig(vocab_size=V, width=32, layers=4, heads=4, mlp_hidden=48), style=style,
                resampler_depth=2, resampler_heads=2, resampler_head_dim=8, resampler_latents=5,
                xattn_every=2, image_token_id=IMG, gate="float" if style == "openflamingo" else "vector",
                qk_norm=style == "idefics", resampler_qk_norm=style == "idefics")
    return FlamingoConfig(**{**base, **kw})


def model(style: str, gates: bool, seed: int = 0, **kw) -> FlamingoModel:
    torch.manual_seed(seed)
    m = FlamingoModel(config(style, **kw)).eval()
    if gates:  # open the gates (and spread the norms) so the blocks change the output
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("_gate"):
                    p.copy_(0.5 + torch.rand_like(p))
                elif name.startswith(("xattn", "resampler")) and "norm" in name and name.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
    return m


def batch(seed: int = 1):
    """Two rows, 3 image slots: row 0 uses all three, row 1 two (slot 2 is padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMG, (2, 16), generator=g)
    ids[0, [3, 7, 12]] = IMG
    ids[1, [5, 10]] = IMG
    px = torch.randn(2, 3, 3, 16, 16, generator=g)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    return ids, px, valid


STYLES = ["openflamingo", "idefics"]


@pytest.mark.parametrize("style", STYLES)
def test_closed_gates_give_the_language_model(style):
    m = model(style, gates=False)
    ids, px, valid = batch()
    with torch.no_grad():
        assert torch.equal(m(ids, pixel_values=px, image_valid=valid), m.lm(ids))
    # and the blocks really are placed as the style says
    assert xattn_layers(m.cfg) == ([1, 3] if style == "openflamingo" else [0, 2])


@pytest.mark.parametrize("style", STYLES)
def test_block_reads_only_the_latest_image(style):
    m = model(style, gates=True)
    ids, px, valid = batch()
    index = media_index_of(ids, IMG, valid)  # [B, T]
    mask = m.memory_mask(ids, 3, valid)
    layer = xattn_layers(m.cfg)[0]
    block = m.xattn[str(layer)]
    x = torch.randn(2, ids.shape[1], 32)
    with torch.no_grad():
        before = block(x, m.get_media(px).flatten(1, 2), mask)
        for j in range(3):
            px2 = px.clone()
            px2[:, j] = torch.randn_like(px2[:, j])
            after = block(x, m.get_media(px2).flatten(1, 2), mask)
            changed = (after != before).any(-1)  # [B, T]
            assert torch.equal(changed, index == j), f"image {j}"


@pytest.mark.parametrize("style", STYLES)
def test_model_locality_padding_and_text_before_images(style):
    m = model(style, gates=True)
    ids, px, valid = batch()
    first = (ids == IMG).long().argmax(-1)  # the first image's position per row
    with torch.no_grad():
        ref = m(ids, pixel_values=px, image_valid=valid)
        assert not ref.isnan().any()
        assert not torch.equal(ref, m.lm(ids))  # the blocks do something
        # changing image j leaves every token before it alone, and changes the ones that read it
        for j in range(2):
            px2 = px.clone()
            px2[:, j] = torch.randn_like(px2[:, j])
            out = m(ids, pixel_values=px2, image_valid=valid)
            for b in range(2):
                at = int((ids[b] == IMG).nonzero()[j])
                assert torch.equal(out[b, :at], ref[b, :at])
                assert not torch.equal(out[b, at:], ref[b, at:])
        # a padded image slot has no effect, and the row equals the row alone with its own images
        px2 = px.clone()
        px2[1, 2] = 100 * torch.randn_like(px2[1, 2])
        assert torch.equal(m(ids, pixel_values=px2, image_valid=valid), ref)
        alone = m(ids[1:], pixel_values=px[1:, :2])
        assert_close(alone[0], ref[1], atol=1e-5, rtol=1e-5)
        # text before the first image reads nothing: it is the same whatever the images
        other = m(ids, pixel_values=torch.randn_like(px), image_valid=valid)
        for b in range(2):
            assert torch.equal(other[b, :first[b]], ref[b, :first[b]])


def test_media_shapes_and_tokens_without_images():
    m = model("idefics", gates=True, use_resampler=False, vision_feature_select="full")
    assert m.tokens_per_image == 17  # 16 patches + the class token, read directly
    _, px, _ = batch()
    assert m.get_media(px).shape == (2, 3, 17, 24)
    m = model("openflamingo", gates=True)
    assert m.get_media(px).shape == (2, 3, 5, 24) and m.resampler(torch.randn(3, 7, 24)).shape == (3, 5, 24)
    text = torch.randint(0, IMG, (2, 6))
    with torch.no_grad():  # no images at all: the attention is skipped, the feed-forward still runs
        assert not m(text).isnan().any()
    with pytest.raises(ValueError, match="<image> tokens"):
        m(torch.full((1, 3), IMG), pixel_values=px[:1, :2])


def _recompute(m: FlamingoModel, prompt: list[int], images: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence again for every token; generated tokens
    read the image the prompt's last token reads (the engine's rule)."""
    memory = m.get_media(images[None]).flatten(1, 2)
    mask = m.memory_mask(torch.tensor([prompt]), images.shape[0])
    seq = list(prompt)
    for _ in range(n):
        grown = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, len(seq) - len(prompt), -1)], 2)
        logits = m(torch.tensor([seq]), memory=memory, memory_mask=grown)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("style", STYLES)
def test_generation_with_cached_memory(style):
    m = model(style, gates=True)
    g = torch.Generator().manual_seed(5)
    prompts = [[3, IMG, 7, 8, 9, IMG, 11, 12], [4, 5, IMG, 6]]
    images = [torch.randn(2, 3, 16, 16, generator=g), torch.randn(1, 3, 16, 16, generator=g)]
    with torch.no_grad():
        memory, masks = m.generation_memory(prompts, images)
        assert [t.shape for t in memory] == [(10, 24), (5, 24)] and masks[0].shape == (8, 10)
        out = generate(m, prompts, GenerationConfig(max_new_tokens=5), memory=memory, memory_mask=masks)
        assert out == [_recompute(m, p, im, 5) for p, im in zip(prompts, images)]
        beam = GenerationConfig(max_new_tokens=5, num_beams=3)
        beams = generate(m, prompts, beam, memory=memory, memory_mask=masks)
        # the blocks' keys and values live in the cache after a prefill; a step reads them from there
        cache = m.new_cache(1, 10)
        m(torch.tensor([prompts[1]]), pixel_values=images[1][None], cache=cache)
        assert {("xattn", i) for i in xattn_layers(m.cfg)} <= set(cache.memory)
        step = m(torch.tensor([[out[1][0]]]), cache=cache)[0, -1]
        assert int(step.argmax()) == out[1][1]
    assert [len(b) for b in beams] == [5, 5]


# ---- OpenFlamingo parity ----------------------------------------------------------------------------

def _of_helpers():
    """open_flamingo/src/helpers.py on its own: the package's __init__ imports open_clip, which the
    modules compared here do not need."""
    pytest.importorskip("einops")
    pytest.importorskip("einops_exts")
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None or spec.origin is None:
        pytest.skip("open-flamingo is not installed "
                    "(pip install --no-deps open-flamingo==2.0.1 einops einops-exts)")
    path = Path(spec.origin).parent / "src" / "helpers.py"
    helpers = importlib.util.spec_from_file_location("_of_helpers", path)
    module = importlib.util.module_from_spec(helpers)
    helpers.loader.exec_module(module)
    return module


def test_openflamingo_parity():
    of = _of_helpers()
    torch.manual_seed(0)
    cfg = config("openflamingo", gate="float", qk_norm=False, resampler_qk_norm=False, xattn_heads=4,
                 xattn_head_dim=8)
    Dv, D = cfg.vision.width, cfg.lm.width
    perceiver = of.PerceiverResampler(dim=Dv, depth=2, dim_head=8, heads=2, num_latents=5).eval()
    blocks = {i: of.GatedCrossAttentionBlock(dim=D, dim_visual=Dv, dim_head=8, heads=4).eval()
              for i in xattn_layers(cfg)}
    sd = {}
    with torch.no_grad():
        for prefix, mod in [("perceiver.", perceiver)] + [
                (f"lang_encoder.model.layers.{i}.gated_cross_attn_layer.", b) for i, b in blocks.items()]:
            for name, p in mod.named_parameters():
                p.copy_(torch.full_like(p, 0.7) if name.endswith("_gate") else torch.randn_like(p) * 0.3 + (
                    1 if "norm" in name and name.endswith("weight") else 0))
                sd[prefix + name] = p.detach().clone()
    # a full OpenFlamingo state dict also names each block through gated_cross_attn_layers, and holds the
    # frozen LM's and tower's tensors: the map leaves those to their own loaders
    duplicate = lambda k: k.replace("model.layers.", "gated_cross_attn_layers.").replace(  # noqa: E731
        ".gated_cross_attn_layer", "")
    sd.update({duplicate(k): v for k, v in list(sd.items()) if k.startswith("lang_encoder.")})
    sd["lang_encoder.model.embed_tokens.weight"] = torch.randn(V, D)
    sd["vision_encoder.conv1.weight"] = torch.randn(Dv, 3, 4, 4)

    m = FlamingoModel(cfg).eval()
    mapped = from_openflamingo(sd, m)
    missing, unexpected = m.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.startswith(("vision.", "lm.")) for k in missing)
    assert len(mapped) == sum(1 for k in sd if k.startswith(("perceiver.", "lang_encoder.model.layers.")))

    ids, _, _ = batch()
    ids[1, 14] = 0  # row 1 has two images; OpenFlamingo's third (padding) image is never reached
    media_locations = ids == IMG
    with torch.no_grad():
        tokens = torch.randn(2, 3, 7, Dv)  # [B, T_img, v, Dv]: OpenFlamingo's [b, T, F=1, v, D]
        ref = perceiver(tokens[:, :, None])
        got = m.resampler(tokens)
        assert_close(got, ref, atol=1e-6, rtol=1e-6)
        x = torch.randn(2, ids.shape[1], D)
        memory, mask = ref.flatten(1, 2), m.memory_mask(ids, 3)
        for i, b in blocks.items():
            want = b(x, ref, media_locations=media_locations)
            assert_close(m.xattn[str(i)](x, memory, mask), want, atol=1e-6, rtol=1e-6)
        # the tokens before the first image: OpenFlamingo zeroes their attention, the feed-forward still runs
        first = int(media_locations[0].long().argmax())
        b = blocks[xattn_layers(cfg)[0]]
        ff_only = x + b.ff(x) * b.ff_gate.tanh()
        want = b(x, ref, media_locations=media_locations)
        assert_close(want[0, :first], ff_only[0, :first], atol=1e-6, rtol=1e-6)
