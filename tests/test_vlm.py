"""The vision-language decoder: image features land exactly on the <image> positions."""

import pytest
import torch

from glimpse.families.vlm.model import VisionLanguageModel, VLMConfig
from glimpse.models.connectors import pixel_shuffle
from glimpse.models.decoder import DecoderConfig
from glimpse.models.vision import VisionConfig

IMG = 7  # the <image> token id in these tests


def tiny(**kw) -> VisionLanguageModel:
    torch.manual_seed(0)
    cfg = VLMConfig(vision=VisionConfig(image_size=16, patch_size=4, width=16, layers=2, heads=2),
                    lm=DecoderConfig(vocab_size=32, width=24, layers=2, heads=2), image_token_id=IMG, **kw)
    return VisionLanguageModel(cfg).eval()


def test_features_replace_exactly_the_placeholders_in_reading_order():
    m = tiny()
    assert m.image_tokens == 16  # 4x4 patches, class token dropped
    pixels = torch.randn(3, 3, 16, 16)
    feats = m.get_image_features(pixels)
    assert feats.shape == (3, 16, 24)
    # sample 0: text, image 0, text, image 1 (interleaved); sample 1: image 2 then text
    row0 = [1, 2] + [IMG] * 16 + [3] + [IMG] * 16 + [4]
    row1 = [IMG] * 16 + [5] * 20
    ids = torch.tensor([row0, row1])
    embeds = m.merge(ids, feats)
    text = m.lm.embed(ids)
    torch.testing.assert_close(embeds[0, 2:18], feats[0])
    torch.testing.assert_close(embeds[0, 19:35], feats[1])
    torch.testing.assert_close(embeds[1, :16], feats[2])
    keep = ids != IMG
    torch.testing.assert_close(embeds[keep], text[keep])
    logits = m(ids, torch.ones_like(ids), pixels)
    assert logits.shape == (2, 36, 32)


def test_a_count_mismatch_is_a_clear_error():
    m = tiny()
    ids = torch.tensor([[1] + [IMG] * 15 + [2]])  # one placeholder short
    with pytest.raises(ValueError, match="15 <image> tokens but 1 images give 16 features"):
        m(ids, pixel_values=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="16 <image> tokens but 0 images"):
        m(torch.tensor([[IMG] * 16]))


def test_feature_layer_and_selection_follow_transformers_llava():
    m = tiny(vision_feature_layer=-2, vision_feature_select="full")
    pixels = torch.randn(2, 3, 16, 16)
    assert m.image_tokens == 17  # the class token kept
    hidden = m.vision.forward_features(pixels, layer=-2)  # after the first of the two blocks
    manual = m.vision.pre_norm(m.vision.pos_embed + torch.cat(
        [m.vision.class_token.expand(2, -1, -1), m.vision.patch_embed(pixels).flatten(2).transpose(1, 2)], 1))
    torch.testing.assert_close(hidden, m.vision.blocks[0](manual))
    torch.testing.assert_close(m.get_image_features(pixels), m.connector(hidden))


def test_pixel_shuffle_folds_neighbouring_patches():
    x = torch.arange(16).float().view(1, 16, 1)  # a 4x4 grid, value = index
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 4, 4)
    assert y[0, 0].tolist() == [0, 1, 4, 5] and y[0, 3].tolist() == [10, 11, 14, 15]
    m = tiny(pixel_shuffle=2)
    assert m.image_tokens == 4 and m.get_image_features(torch.randn(1, 3, 16, 16)).shape == (1, 4, 24)
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.randn(1, 12, 2), 2)


@pytest.mark.parametrize("connector, source, tokens", [("linear", "pooled", 16), ("mlp2x_gelu", "pooled", 16),
                                                      ("prefix", "pooled", 3), ("prefix", "patches", 3)])
def test_connectors(connector, source, tokens):
    m = tiny(connector=connector, prefix_tokens=3, prefix_source=source)
    assert m.image_tokens == tokens
    feats = m.get_image_features(torch.randn(2, 3, 16, 16))
    assert feats.shape == (2, tokens, 24)
    ids = torch.tensor([[1] + [IMG] * tokens + [2]] * 2)
    assert m(ids, pixel_values=torch.randn(2, 3, 16, 16)).shape == (2, tokens + 2, 32)


def test_patch_prefix_tokens_read_their_own_region():
    """With prefix_source patches, token i depends only on the i-th group of patches."""
    from glimpse.models.connectors import PrefixMapper

    mapper = PrefixMapper(6, 8, 4, "patches")
    x = torch.randn(1, 16, 6)
    y = x.clone()
    y[:, 12:] += 1.0  # change the last group of 4 patches only
    a, b = mapper(x), mapper(y)
    assert torch.equal(a[:, :3], b[:, :3]) and not torch.allclose(a[:, 3], b[:, 3])


def test_prompts_with_images_generate_like_the_full_forward():
    from glimpse.infer.generate import GenerationConfig, generate

    m = tiny()
    pixels = torch.randn(1, 3, 16, 16)
    ids = torch.tensor([[1] + [IMG] * 16 + [2, 3]])
    embeds = m.merge(ids, m.get_image_features(pixels))[0]
    out = generate(m.lm, [ids[0].tolist()], GenerationConfig(max_new_tokens=3, ignore_eos=True), prefix_embeds=[embeds])
    # greedy by hand: extend the sequence token by token through the full (uncached) forward
    seq = ids
    for _ in range(3):
        nxt = m(seq, pixel_values=pixels)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert out[0] == seq[0, -3:].tolist()


def test_image_positions_start_neutral_and_mark_each_token():
    plain, placed = tiny(), tiny(image_positions=True)
    placed.load_state_dict(plain.state_dict(), strict=False)  # the same weights; positions start at zero
    px = torch.randn(2, 3, 16, 16)
    assert torch.equal(plain.get_image_features(px), placed.get_image_features(px))
    with torch.no_grad():
        placed.connector.position[3] += 1.0
    moved = placed.get_image_features(px) - plain.get_image_features(px)
    assert torch.allclose(moved[:, 3], torch.ones(2, 24)) and moved[:, [0, 1, 2, 4]].abs().max() == 0
    with pytest.raises(ValueError, match="16 image positions, got 4"):
        placed.project(torch.randn(1, 4, 16))


def test_image_positions_are_refused_where_they_mean_nothing():
    from glimpse.config import load_recipe
    from glimpse.errors import GlimpseError

    with pytest.raises(GlimpseError, match="model.image_positions"):
        load_recipe("shapes-frozen", ["model.image_positions=true"])


def test_projector_norm_makes_the_image_tokens_blind_to_the_feature_scale():
    """With `projector_norm` the projector sees LayerNormed features: scaling a tower's features
    by 30 (a ViT's hidden states are that large) leaves the image tokens as they were."""
    from glimpse.config import load_recipe
    from glimpse.errors import GlimpseError

    normed = tiny(projector_norm=True)
    feats = torch.randn(2, 16, 16)
    assert torch.allclose(normed.project(feats), normed.project(30 * feats + 2), atol=1e-5)
    plain = tiny()
    plain.load_state_dict({k: v for k, v in normed.state_dict().items() if "connector.norm" not in k})
    assert not torch.allclose(plain.project(feats), plain.project(30 * feats + 2), atol=1e-3)
    assert not torch.allclose(plain.project(feats), normed.project(feats), atol=1e-3)
    with pytest.raises(GlimpseError, match="model.projector_norm"):
        load_recipe("shapes-frozen", ["model.projector_norm=true"])


def test_tower_features_stand_in_for_pixels():
    """The feature cache's path: forward on precomputed tower features == forward on the pixels."""
    for kw in ({}, {"pixel_shuffle": 2, "image_positions": True}, {"connector": "prefix", "prefix_tokens": 2}):
        m = tiny(**kw)
        px = torch.randn(2, 3, 16, 16)
        ids = torch.tensor([[1] + [IMG] * m.image_tokens + [2]] * 2)
        assert torch.equal(m(ids, pixel_values=px), m(ids, tower_features=m.tower_features(px)))
