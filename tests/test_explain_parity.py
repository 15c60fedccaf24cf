"""Explanations, parity: explain mode (explicit attention probabilities) computes what the fast SDPA path
computes for every family's attention, and its maps, rollout and Chefer's relevance match Hugging Face
CLIP's on transformers' own attentions."""


from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_helpers import randomize, save
from torch.testing import assert_close

from glimpse.explain import explain
from glimpse.explain import relevance as rel
from glimpse.explain.explainers import DualEncoderExplainer
from glimpse.explain.towers import grads_of
from glimpse.families.fusion import FusionConfig, FusionEncoder
from glimpse.models.attention import record_attention
from glimpse.models.cross_attention import CrossAttention, latest_image_mask
from glimpse.models.decoder import DecoderConfig, positions_from_mask
from glimpse.models.dual_encoder import DualEncoder, DualEncoderConfig
from glimpse.models.perceiver import PerceiverResampler
from glimpse.models.text import TextConfig
from glimpse.models.vision import VisionConfig
from glimpse.models.vlm import VisionLanguageModel, VLMConfig

V = 40  # tiny vocabulary of the hand-built models
TIGHT = dict(atol=1e-5, rtol=1e-5)


# -- 1. explain mode computes what the fast (SDPA) path computes ------------------------------------------
def both_paths(fn):
    """fn() on the fast path, then inside record_attention(): (fast, explained, recorder)."""
    with torch.no_grad():
        fast = fn()
        with record_attention() as rec:
            slow = fn()
        n = len(rec.calls)
        fn()  # outside the context nothing more is recorded
        assert len(rec.calls) == n
    return fast, slow, rec


def assert_one_map_per_layer(rec, modules):
    """The recorder holds exactly one map per attention layer, in call order; every row a distribution."""
    assert [id(m) for m, _ in rec.calls] == [id(m) for m in modules]
    for _, p in rec.calls:
        assert p.dim() == 4 and bool((p >= 0).all())
        assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), **TIGHT)


def right_padded(lengths, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V - 1, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, n - 1] = 1, 2  # bos ... eos
        ids[row, n:] = 0
        mask[row, :n] = 1
    return ids, mask


DUAL_POOLS = {  # vision settings, text settings
    "cls": (dict(class_token=True, pool="cls"), dict(causal=True, pool="eos")),
    "mean": (dict(class_token=False, pool="mean"), dict(causal=False, pool="mean")),
    "map": (dict(class_token=False, pool="map", pre_norm=False), dict(causal=False, pool="last")),
}


def tiny_dual(pool: str, seed: int = 0) -> DualEncoder:
    vision, text = DUAL_POOLS[pool]
    torch.manual_seed(seed)
    cfg = DualEncoderConfig(vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=2, heads=2, **vision),
                            text=TextConfig(vocab_size=V, context_length=8, width=16, layers=2, heads=2, **text),
                            embed_dim=8)
    return randomize(DualEncoder(cfg), seed)


@pytest.mark.parametrize("pool", list(DUAL_POOLS))
def test_explain_mode_matches_the_fast_path_dual_encoder(pool):
    m = tiny_dual(pool)
    px = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ids, mask = right_padded((7, 4, 2), 7)
    fast, slow, rec = both_paths(lambda: (m.get_image_features(px), m.get_text_features(ids, mask)))
    assert_close(slow[0], fast[0], **TIGHT)
    assert_close(slow[1], fast[1], **TIGHT)
    vmods = [b.attn for b in m.vision.blocks] + ([m.vision.head] if pool == "map" else [])
    assert_one_map_per_layer(rec, vmods + [b.attn for b in m.text.blocks])
    if pool == "mean":  # the bidirectional text tower's padding mask: no real row reads a padded key
        for p in rec.maps_of([b.attn for b in m.text.blocks]):
            assert float(p[1, :, :4, 4:].abs().max()) == 0.0


def tiny_fusion(objective: str) -> FusionEncoder:
    torch.manual_seed(0)
    cfg = FusionConfig(vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2),
                       text=TextConfig(vocab_size=V + 1, context_length=8, width=16, layers=1, heads=2, causal=False,
                                       pool="cls"),
                       fusion="cross_attention", fusion_layers=2, embed_dim=8, mask_token_id=V, objective=objective,
                       answers=["red", "blue", "green"] if objective == "vqa" else [])
    return randomize(FusionEncoder(cfg))


def fusion_modules(m):
    return ([b.attn for b in m.vision.blocks] + [b.attn for b in m.text.blocks]
            + [mod for b in m.fusion.blocks for mod in (b.attn, b.cross)])


def test_explain_mode_matches_the_fast_path_fusion_itm_and_vqa():
    px = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ids, mask = right_padded((8, 5, 3), 8, seed=1)
    m = tiny_fusion("pretrain")

    def itm():
        patches, pooled = m.encode_image(m.vision, px)
        return m.itm_logits(m.text.forward_features(ids, mask), mask, patches, pooled)

    fast, slow, rec = both_paths(itm)
    assert_close(slow, fast, **TIGHT)
    assert_one_map_per_layer(rec, fusion_modules(m))
    q = tiny_fusion("vqa")
    fast, slow, rec = both_paths(lambda: q.answer_logits(px, ids, mask))
    assert_close(slow, fast, **TIGHT)
    assert_one_map_per_layer(rec, fusion_modules(q))


def tiny_vlm(arch: str) -> VisionLanguageModel:
    torch.manual_seed(0)
    lm = DecoderConfig(arch=arch, vocab_size=V, width=32, layers=2, heads=4, kv_heads=2 if arch == "llama" else 0,
                       context_length=32)
    cfg = VLMConfig(vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=2, heads=2), lm=lm,
                    vision_feature_layer=-2, image_token_id=V - 1)
    return randomize(VisionLanguageModel(cfg))


def left_padded_vlm_batch(n_image_tokens: int):
    g = torch.Generator().manual_seed(3)
    rows = []
    for n_text in (6, 2):
        rows.append([1] + torch.randint(3, V - 1, (2,), generator=g).tolist() + [V - 1] * n_image_tokens
                    + torch.randint(3, V - 1, (n_text,), generator=g).tolist())
    T = max(map(len, rows))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask, torch.randn(2, 3, 16, 16, generator=g)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_explain_mode_matches_the_fast_path_vlm(arch):
    m = tiny_vlm(arch)
    if arch == "llama":
        assert m.lm.cfg.kv_heads < m.lm.cfg.heads  # grouped-query attention
    ids, mask, px = left_padded_vlm_batch(m.image_tokens)
    pos = positions_from_mask(mask)
    fast, slow, rec = both_paths(lambda: m(ids, mask, px, position_ids=pos))
    assert_close(slow, fast, **TIGHT)
    # vision_feature_layer -2 of 2 blocks runs the first block only: one map for it, none for the second
    assert_one_map_per_layer(rec, [m.vision.blocks[0].attn] + [b.attn for b in m.lm.blocks])
    lm_maps = rec.maps_of([b.attn for b in m.lm.blocks])
    assert all(p.shape[1] == m.lm.cfg.heads for p in lm_maps)  # the kv heads are shared, each query head has a map
    pad = int((mask[1] == 0).sum())
    for p in lm_maps:  # left padding: real tokens never read padding
        assert float(p[1, :, pad:, :pad].abs().max()) == 0.0


def test_explain_mode_matches_the_fast_path_flamingo_cross_attention():
    torch.manual_seed(0)
    ca = randomize(CrossAttention(16, 2, memory_dim=12))
    g = torch.Generator().manual_seed(4)
    x, memory = torch.randn(2, 5, 16, generator=g), torch.randn(2, 6, 12, generator=g)
    media = torch.tensor([[-1, 0, 0, 1, 1], [-1, -1, 0, 0, 1]])  # text before the first image reads nothing
    mask = latest_image_mask(media, images=2, tokens_per_image=3)
    fast, slow, rec = both_paths(lambda: ca(x, memory, mask))
    assert_close(slow, fast, **TIGHT)
    none = media == -1
    assert float(slow[none].abs().max()) == 0.0 and float(slow[~none].abs().min()) > 0
    assert_one_map_per_layer(rec, [ca])
    (p,) = rec.maps_of([ca])
    reads = mask.expand_as(p)
    assert float(p[reads.logical_not() & ~none[:, None, :, None]].abs().max()) == 0.0  # only its image's slots


def test_explain_mode_matches_the_fast_path_perceiver():
    torch.manual_seed(0)
    r = randomize(PerceiverResampler(16, depth=2, heads=2, head_dim=8, n_latents=4))
    media = torch.randn(2, 1, 5, 16, generator=torch.Generator().manual_seed(5))
    fast, slow, rec = both_paths(lambda: r(media))
    assert_close(slow, fast, **TIGHT)
    assert_one_map_per_layer(rec, [layer.attn for layer in r.layers])
    assert all(p.shape == (2, 2, 4, 5 + 4) for _, p in rec.calls)  # latents read the media and themselves


def test_maps_of_says_when_nothing_was_recorded():
    m = tiny_dual("cls")
    with record_attention() as rec, torch.no_grad():
        m.get_image_features(torch.zeros(1, 3, 16, 16))
    rec.maps_of([b.attn for b in m.vision.blocks])
    with pytest.raises(RuntimeError, match="recorded nothing"):
        rec.maps_of([b.attn for b in m.text.blocks])


# -- 2. Hugging Face CLIP: the same maps, rollout and Chefer's relevance -----------------------------------
CLIP_V = 50
CLIP_VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)
CLIP_TEXT = dict(hidden_size=24, intermediate_size=36, num_hidden_layers=2, num_attention_heads=2, vocab_size=CLIP_V,
                 max_position_embeddings=12, eos_token_id=CLIP_V - 1, bos_token_id=CLIP_V - 2, pad_token_id=0)


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    """(transformers' CLIPModel with eager attention, so output_attentions works; glimpse's DualEncoder of the
    same folder)."""
    transformers = pytest.importorskip("transformers")
    from glimpse.families import load_hf

    cfg = transformers.CLIPConfig(vision_config=CLIP_VISION, text_config=CLIP_TEXT, projection_dim=16)
    hf = randomize(transformers.CLIPModel._from_config(cfg, attn_implementation="eager"))
    path = tmp_path_factory.mktemp("clip")
    save(hf, path)
    return hf, load_hf(path).model


def clip_inputs():
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, CLIP_V - 2, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate((7, 4)):  # right padding, each text ending with its eos
        ids[row, 0], ids[row, n - 1] = CLIP_V - 2, CLIP_V - 1
        ids[row, n:] = 0
        mask[row, n:] = 0
    return torch.randn(2, 3, 32, 32, generator=g), ids, mask


def glimpse_maps(model, px, ids, mask, grad: bool = False):
    """glimpse's vision and text maps (and, with `grad`, d cos(image 0, text 0) / d map)."""
    vmods, tmods = [b.attn for b in model.vision.blocks], [b.attn for b in model.text.blocks]
    with record_attention() as rec, torch.set_grad_enabled(grad):
        image = F.normalize(model.get_image_features(px), dim=-1)
        text = F.normalize(model.get_text_features(ids, mask), dim=-1)
    maps = rec.maps_of(vmods + tmods)
    grads = grads_of((image[0] * text[0]).sum(), maps) if grad else None
    return maps[:len(vmods)], maps[len(vmods):], grads


def chefer_compute_rollout(attentions):
    """hila-chefer/Transformer-Explainability: heads averaged (generate_rollout), then
    compute_rollout_attention: + I, rows normalised, joint = layer_i @ joint from the first layer on."""
    mats = [a.mean(1) for a in attentions]
    eye = torch.eye(mats[0].shape[-1]).expand_as(mats[0])
    mats = [a + eye for a in mats]
    mats = [a / a.sum(-1, keepdim=True) for a in mats]
    joint = mats[0]
    for a in mats[1:]:
        joint = a.bmm(joint)
    return joint


def chefer_self_reference(attentions, grads):
    """Chefer et al. 2021, rules 5-6 in the test's own words: R = I; R += mean_h((∇A ⊙ A)⁺) @ R per layer."""
    R = torch.eye(attentions[0].shape[-1]).expand(attentions[0].shape[0], -1, -1).clone()
    for a, g in zip(attentions, grads):
        R = R + (g * a).clamp(min=0).mean(1) @ R
    return R


def test_hf_clip_maps_and_rollout_match_transformers(clip_pair):
    hf, ours = clip_pair
    px, ids, mask = clip_inputs()
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=px, attention_mask=mask, output_attentions=True)
    hv, ht = out.vision_model_output.attentions, out.text_model_output.attentions
    assert len(hv) == 2 and len(ht) == 2 and hv[0] is not None
    with torch.no_grad():
        gv, gt, _ = glimpse_maps(ours, px, ids, mask)
    for a, b in zip(gv, hv):
        assert_close(a, b, **TIGHT)
    lengths = mask.sum(1).tolist()
    for a, b in zip(gt, ht):  # a padded text's real rows (transformers also masks what its padding rows read)
        for row, n in enumerate(lengths):
            assert_close(a[row, :, :n], b[row, :, :n], **TIGHT)
    assert_close(rel.rollout(gv), chefer_compute_rollout(hv), **TIGHT)
    ours_t, ref_t = rel.rollout(gt), chefer_compute_rollout(ht)
    for row, n in enumerate(lengths):
        assert_close(ours_t[row, :n], ref_t[row, :n], **TIGHT)
    assert not torch.allclose(rel.rollout(gv), chefer_compute_rollout(hv[::-1]), atol=1e-3)  # the order matters


def test_hf_clip_chefer_relevance_matches_a_reference_on_transformers_attentions(clip_pair):
    hf, ours = clip_pair
    px, ids, mask = clip_inputs()
    px, ids, mask = px[:1], ids[:1], mask[:1]  # one image, one (unpadded) text
    out = hf(input_ids=ids, pixel_values=px, attention_mask=mask, output_attentions=True)
    hv, ht = list(out.vision_model_output.attentions), list(out.text_model_output.attentions)
    similarity = (out.image_embeds * out.text_embeds).sum()
    hgrads = torch.autograd.grad(similarity, hv + ht)
    ref_v, ref_t = chefer_self_reference(hv, hgrads[:2]), chefer_self_reference(ht, hgrads[2:])

    gv, gt, grads = glimpse_maps(ours, px, ids, mask, grad=True)
    for a, b in zip(grads, hgrads):
        assert_close(a, b, atol=1e-5, rtol=1e-4)
    # relevance is a sum of products over layers: 1e-5 absolute, a little rtol for its larger entries
    assert_close(rel.chefer_self(gv, grads[:2])[0], ref_v, atol=1e-5, rtol=1e-4)
    assert_close(rel.chefer_self(gt, grads[2:])[0], ref_t, atol=1e-5, rtol=1e-4)
    assert float((ref_v - torch.eye(17)).detach().abs().max()) > 1e-3  # the gradients did reach the relevance

    # the explainer reads the class token's row over the patches, and the eos row over the tokens
    explainer = DualEncoderExplainer(ours, px, ids, mask, [f"t{i}" for i in range(7)], "seven tokens")
    e = explain(explainer, "chefer")
    # shown min-max scaled (glimpse.explain.core.scaled); the 1e-5 of the relevance grows by 1 / (max - min)
    assert_close(e.grid, min_max(ref_v[0, 0, 1:]).view(4, 4), atol=1e-3, rtol=1e-3)
    assert_close(torch.tensor(e.token_scores), min_max((ref_t - torch.eye(7))[0, 6]), atol=1e-3, rtol=1e-3)
    assert e.score == pytest.approx(float(similarity.detach()), abs=1e-5)


def min_max(x):
    x = x.detach() - x.detach().min()
    return x / x.max()
