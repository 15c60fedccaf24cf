"""Explanations (glimpse.explain): the relevance and metric helpers agree with hand-computed cases,
occlusion and deletion find a planted cell, and the world's boxes are right.  Parity with the fast path
and with Hugging Face CLIP: test_explain_parity.py; the pipelines, the command line and the server:
test_explain_use.py."""


from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from glimpse.explain import Explanation
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
from glimpse.metrics.explain import box_mask, box_share, energy_in_box, pointing_hit, spearman


# -- 1. the relevance helpers, by hand --------------------------------------------------------------------
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


# -- 2. the metrics against hand-computed cases -----------------------------------------------------------
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


# -- 3. occlusion and deletion on a planted model ---------------------------------------------------------
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


# -- 4. the world's object boxes --------------------------------------------------------------------------
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
