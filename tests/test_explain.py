"""Explanations (glimpse.explain): explain mode computes what the fast path computes, its maps and Chefer's
equations match Hugging Face CLIP's, the relevance and metric helpers agree with hand-computed cases,
occlusion and deletion find a planted cell, the world's boxes are right, and the pipelines, the command
line and the server explain end to end."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_helpers import randomize, save
from PIL import Image
from torch.testing import assert_close

from glimpse.explain import METHODS, Explanation, explain
from glimpse.explain import relevance as rel
from glimpse.explain.core import (
    auc,
    cell_masks,
    deletion_curve,
    guided,
    integrated_gradients,
    occlusion,
    patch_order,
)
from glimpse.explain.explainers import DualEncoderExplainer
from glimpse.explain.towers import grads_of
from glimpse.families.fusion import FusionConfig, FusionEncoder
from glimpse.metrics.explain import box_mask, box_share, energy_in_box, pointing_hit, spearman
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
ATTENTION_METHODS = [m for m in METHODS if m != "occlusion"]


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


# -- 3. the relevance helpers, by hand --------------------------------------------------------------------
def test_normalised_is_chefers_residual_handling():
    R = torch.tensor([[[1.5, 0.5], [0.25, 1.0]]])
    # less I: [[.5, .5], [.25, 0]]; rows normalised: [[.5, .5], [1, 0]]; plus I
    assert_close(rel.normalised(R), torch.tensor([[[1.5, 0.5], [1.0, 1.0]]]))
    assert_close(rel.normalised(torch.eye(3)[None]), torch.eye(3)[None])  # nothing but the identity: no NaN


def test_weighted_heads_keeps_the_positive_part_then_averages():
    attn = torch.tensor([[[[0.2, 0.8]], [[0.6, 0.4]]]])  # [B=1, H=2, T=1, S=2]
    grad = torch.tensor([[[[1.0, -1.0]], [[2.0, 0.5]]]])
    # head 0: [.2, -.8] -> [.2, 0]; head 1: [1.2, .2]; mean [.7, .1]
    assert_close(rel.weighted_heads(attn, grad), torch.tensor([[[0.7, 0.1]]]))


def test_chefer_cross_rule_10_by_hand():
    R_ss = torch.tensor([[[1.5, 0.5], [0.25, 1.0]]])  # R̄_ss = [[1.5, .5], [1, 1]]
    R_qq = torch.tensor([[[1.0, 0.5, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # R̄_qq = R_qq
    attn = torch.tensor([[[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]])  # one head, [1, 1, 2, 3]
    R_sq = torch.full((1, 2, 3), 0.1)
    # R̄_ssᵀ Ā = [[.85, .475, 1.175], [.35, .225, .925]]; @ R̄_qq = [[.85, .9, 1.6], [.35, .4, 1.1]]
    expected = torch.tensor([[[0.85, 0.9, 1.6], [0.35, 0.4, 1.1]]]) + 0.1
    assert_close(rel.chefer_cross(R_ss, R_sq, R_qq, attn, torch.ones_like(attn)), expected)
    # a negative gradient wipes its share out
    assert_close(rel.chefer_cross(R_ss, R_sq, R_qq, attn, -torch.ones_like(attn)), R_sq)


def test_rollout_chefer_self_raw_and_gradcam_by_hand():
    a1 = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    a2 = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
    # (a + I) / rows: [[1, 0], [.25, .75]] and [[.75, .25], [0, 1]]; later @ earlier
    assert_close(rel.rollout([a1, a2]), torch.tensor([[[0.8125, 0.1875], [0.25, 0.75]]]))
    ones = torch.ones_like(a1)
    R, cross = rel.chefer_self([a1, a2], [ones, ones], cross=torch.tensor([[[1.0], [0.0]]]))
    eye = torch.eye(2)
    assert_close(R, ((eye + a2[0, 0]) @ (eye + a1[0, 0]))[None])
    assert_close(cross, ((eye + a2[0, 0]) @ (eye + a1[0, 0]) @ torch.tensor([[1.0], [0.0]]))[None])
    assert_close(rel.raw([a1, a2]), a2[:, 0])
    assert_close(rel.self_relevance("gradcam", [a1, a2], [ones, -ones]), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="gradients"):
        rel.self_relevance("chefer", [a1])
    with pytest.raises(ValueError, match="unknown attention method"):
        rel.self_relevance("nonsense", [a1], [ones])


# -- 4. the metrics against hand-computed cases -----------------------------------------------------------
def test_box_mask_takes_pixel_centres_and_a_tolerance():
    m = box_mask([1, 1, 2, 2], 5, 5)
    assert m.nonzero().tolist() == [[r, c] for r in (1, 2) for c in (1, 2)]
    edge = box_mask([0.5, 0.5, 1, 1], 4, 4)  # centres 0.5 and 1.5 lie on the box's edges: inside
    assert edge.nonzero().tolist() == [[r, c] for r in (0, 1) for c in (0, 1)]
    assert box_mask([1.6, 1.6, 0.8, 0.8], 4, 4).sum() == 0  # holds no pixel centre
    grown = box_mask([1, 1, 2, 2], 5, 5, tolerance=0.5)  # centres in [0.5, 3.5]
    assert grown.nonzero().tolist() == [[r, c] for r in range(4) for c in range(4)]


def test_pointing_hit_and_its_rule_for_a_flat_maximum():
    m = torch.zeros(4, 4)
    m[2, 3] = 1.0
    assert pointing_hit(m, [3, 2, 1, 1]) and not pointing_hit(m, [0, 0, 2, 2])
    assert pointing_hit(m, [2, 2, 1, 1], tolerance=0.5)  # the pixel centre 3.5 is on the grown box's edge
    assert not pointing_hit(m, [2, 2, 1, 1], tolerance=0.4)
    flat = torch.zeros(4, 5)
    flat[1, 0:3] = 1.0  # a maximum flat over three pixels: the point is their centre (1, 1), not the first (1, 0)
    assert pointing_hit(flat, [1, 1, 1, 1]) and not pointing_hit(flat, [0, 1, 1, 1])
    upsampled = Explanation("", "", 0.0, torch.tensor([[0.0, 0.0], [0.0, 1.0]])).pixel_map(8, 8)
    assert pointing_hit(upsampled, [4, 4, 4, 4]) and not pointing_hit(upsampled, [0, 0, 4, 4])


def test_pointing_hit_points_at_a_maximum_when_two_peaks_tie():
    two = torch.zeros(5, 5)
    two[0, 0], two[4, 4] = 1.0, 1.0  # two equal peaks, in opposite corners
    assert not pointing_hit(two, [2, 2, 1, 1])  # the empty centre holds no maximum


def test_energy_in_box_and_box_share():
    m = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 0.0, -5.0], [0.0] * 4, [0.0, 0.0, 0.0, 10.0]])
    assert energy_in_box(m, [0, 0, 2, 2]) == pytest.approx(10 / 20)  # the negative -5 counts for nothing
    assert energy_in_box(m, [3, 3, 1, 1]) == pytest.approx(10 / 20)
    assert energy_in_box(torch.zeros(4, 4), [0, 0, 2, 2]) == 0.0
    assert box_share([0, 0, 2, 2], 4, 4) == pytest.approx(4 / 16)
    assert box_share([0, 0, 2, 2], 4, 4, tolerance=1) == pytest.approx(9 / 16)  # centres in [-1, 3]
    assert box_share([0, 0, 4, 2], 4, 8) == pytest.approx(8 / 32)  # height 4, width 8


def spearman_reference(a, b):
    """Pure Python: average ranks for ties, then Pearson's r of the ranks."""
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def test_spearman_with_ties_identity_reversal_and_constants():
    a = [0.1, 0.5, 0.5, 0.9, 0.2, 0.2, 0.2, 0.7, 0.0]
    b = [3.0, 1.0, 2.0, 2.0, 5.0, 0.0, 4.0, 4.0, 1.0]
    expected = spearman_reference(a, b)
    assert spearman(torch.tensor(a).view(3, 3), torch.tensor(b).view(3, 3)) == pytest.approx(expected, abs=1e-12)
    # hand check of one tied case: ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4] -> r = 4.5 / sqrt(4.5 * 5)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        4.5 / math.sqrt(4.5 * 5))
    m = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    assert spearman(m, m) == pytest.approx(1.0)
    assert spearman(m, -m) == pytest.approx(-1.0)
    assert spearman(m, m ** 3 + 2) == pytest.approx(1.0)  # ranks only
    assert math.isnan(spearman(m, torch.full((4, 4), 0.3)))


# -- 5. occlusion and deletion on a planted model ---------------------------------------------------------
CELL = (1, 2)  # rows 8:16, columns 16:24 of a 32 x 32 image on a 4 x 4 grid


def planted_score(pixels):
    return pixels[:, :, 8:16, 16:24].sum((1, 2, 3))


def planted_pixels():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7)) + 0.5


def test_cell_masks_cover_the_image_once():
    masks = cell_masks((4, 4), (32, 32))
    assert masks.shape == (16, 32, 32) and bool((masks.sum(0) == 1).all())
    assert masks[CELL[0] * 4 + CELL[1]].nonzero().min(0).values.tolist() == [8, 16]
    assert masks[CELL[0] * 4 + CELL[1]].nonzero().max(0).values.tolist() == [15, 23]
    wide = cell_masks((2, 4), (4, 8))  # 2 rows of 4 cells, each 2 x 2 pixels
    assert wide.shape == (8, 4, 8) and wide[5].nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]


def test_occlusion_puts_its_maximum_on_the_planted_cell():
    px = planted_pixels()
    grid = occlusion(planted_score, px, (4, 4))
    assert grid.shape == (4, 4)
    assert divmod(int(grid.argmax()), 4) == CELL
    assert float(grid[CELL]) == pytest.approx(float(planted_score(px)[0]), rel=1e-5)
    others = grid.clone()
    others[CELL] = 0
    assert float(others.abs().max()) == 0.0
    assert_close(occlusion(planted_score, px, (4, 4), batch_size=3), grid)  # batching changes nothing
    # painting a patch over that raises the score gives it no relevance (occlusion's drops are clamped at 0)
    assert float(occlusion(lambda p: -planted_score(p), px, (4, 4)).abs().max()) == 0.0


def test_deletion_curve_drops_when_the_planted_cell_goes():
    px = planted_pixels()
    base = float(planted_score(px)[0])
    cell = CELL[0] * 4 + CELL[1]
    rest = [i for i in range(16) if i != cell]
    first = deletion_curve(planted_score, px, torch.tensor([cell] + rest), (4, 4), steps=16)
    last = deletion_curve(planted_score, px, torch.tensor(rest + [cell]), (4, 4), steps=16)
    assert first.shape == last.shape == (17,)
    assert first[0] == pytest.approx(base, rel=1e-6) and float(first[1:].abs().max()) == 0.0
    assert_close(last[:-1], torch.full((16,), base), rtol=1e-6, atol=1e-4)
    assert float(last[-1]) == 0.0
    coarse = deletion_curve(planted_score, px, torch.tensor(rest[:3] + [cell] + rest[3:]), (4, 4), steps=4)
    assert coarse[0] == pytest.approx(base, rel=1e-6) and float(coarse[1:].abs().max()) == 0.0  # 4 per step
    assert auc(first) == pytest.approx(base / 16 / 2, rel=1e-5)
    assert auc(last) == pytest.approx(base * (15 / 16 + 1 / 32), rel=1e-5)


def test_auc_of_known_curves():
    assert auc(torch.tensor([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert auc(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert auc(torch.tensor([0.0, 1.0])) == pytest.approx(0.5)
    assert auc(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])) == pytest.approx(0.125)


# -- 6. the world's object boxes --------------------------------------------------------------------------
def test_world_instances_are_coco_boxes_of_the_scene_objects(world):
    coco = json.loads((world / "annotations" / "instances_test.json").read_text())
    assert {"images", "annotations", "categories"} <= set(coco)
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    assert len(cats) == 24 and cats[1] == "red circle"
    scenes = {im["id"]: im["scene"] for im in json.loads((world / "annotations" / "captions_test.json")
                                                          .read_text())["images"]}
    objects = defaultdict(list)
    for a in coco["annotations"]:
        assert {"id", "image_id", "bbox", "category_id", "area", "iscrowd"} <= set(a) and a["iscrowd"] == 0
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and a["area"] == pytest.approx(w * h, abs=0.02)
        assert cats[a["category_id"]] == f"{a['colour']} {a['shape']}"
        objects[a["image_id"]].append(a)
    assert len(coco["images"]) == 40 and {im["id"] for im in coco["images"]} == set(scenes)
    singles = 0
    for im in coco["images"]:
        objs = objects[im["id"]]
        assert [{k: o[k] for k in ("size", "colour", "shape", "position")} for o in objs] == scenes[im["id"]]
        pixels = np.asarray(Image.open(world / "images" / "test" / im["file_name"]).convert("RGB")).astype(int)
        H, W, _ = pixels.shape
        assert (im["height"], im["width"]) == (H, W) == (32, 32)
        coloured = np.abs(pixels - pixels[0, 0]).max(-1) > 60  # the corner is background
        union = torch.zeros(H, W, dtype=torch.bool)
        for o in objs:
            union |= box_mask(o["bbox"], H, W, tolerance=1.0)
        assert not (coloured & ~union.numpy()).any(), im["file_name"]
        if len(objs) == 1:  # the box is tight: the shape reaches (within 1.5 px) each of its edges
            singles += 1
            x, y, w, h = objs[0]["bbox"]
            rows, cols = np.nonzero(coloured & union.numpy())
            assert abs(cols.min() - x) <= 1.5 and abs(cols.max() + 1 - (x + w)) <= 1.5, objs[0]
            assert abs(rows.min() - y) <= 1.5 and abs(rows.max() + 1 - (y + h)) <= 1.5, objs[0]
    assert singles >= 5


def test_integrated_gradients_of_a_linear_score_is_gradient_times_input():
    px = planted_pixels()
    grid = integrated_gradients(planted_score, px, steps=4, batch_size=3)
    assert grid.shape == (32, 32)
    expected = torch.zeros(32, 32)
    expected[8:16, 16:24] = px[0, :, 8:16, 16:24].sum(0)  # a constant gradient of 1 there, times the pixel
    assert_close(grid, expected, rtol=1e-6, atol=1e-6)
    # completeness: the attributions sum to score(x) - score(baseline) (baseline 0, score(0) = 0)
    assert float(grid.sum()) == pytest.approx(float(planted_score(px)[0]), rel=1e-5)
    # a pixel that lowers the score gets none (the positive part), and the order of patches follows
    assert float(integrated_gradients(lambda p: -planted_score(p), px).abs().max()) == 0.0
    assert patch_order(grid, (4, 4))[0] == CELL[0] * 4 + CELL[1]


def test_integrated_gradients_completeness_on_a_nonlinear_score():
    w = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1)).abs()
    px = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def score(p):  # positive weights on positive pixels: every attribution is >= 0, so none is clipped
        return torch.tanh((p * w).sum((1, 2, 3)) / 20) * 3

    grid = integrated_gradients(score, px, steps=64)
    assert float(grid.sum()) == pytest.approx(float(score(px)[0] - score(torch.zeros_like(px))[0]), rel=1e-3)


def test_guided_keeps_the_fine_maps_pixels_where_the_coarse_map_points():
    coarse = torch.tensor([[0.0, 3.0], [0.0, 0.0]])  # the top-right patch
    fine = torch.zeros(8, 8)
    fine[1, 6] = 2.0  # a pixel in the top-right patch
    fine[6, 1] = 4.0  # a stronger one where the coarse map says nothing
    out = guided(coarse, fine)
    assert out.shape == (8, 8) and divmod(int(out.argmax()), 8) == (1, 6)
    assert float(out[6, 1]) == 0.0 and float(out.max()) <= 1.0
