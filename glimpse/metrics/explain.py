"""How well an explanation map agrees with the truth: an object's box [x, y, w, h] in pixels (COCO's bbox).

- Pointing game (Zhang et al., ECCV 2016, "Top-down Neural Attention by Excitation Backprop"): a hit when
  the map's maximum falls in the object's box, with a tolerance (15 px at 224 px in the paper, 6.7% of the
  side; here `tolerance` pixels, half a patch by default).  Random baseline: the share of the image that the
  box plus tolerance covers (where a uniformly random point lands in it).
- Energy in box (the "energy-based pointing game" of Score-CAM, Wang et al. 2020; the weighting game of
  arXiv 2208.06175): the share of the map's (non-negative) mass inside the box.  Random baseline: the box's
  share of the image (what a uniform map puts there).
- Rank correlation (Spearman's rho, average ranks for ties): how alike two maps are, for the model-
  randomisation sanity check of Adebayo et al. (NeurIPS 2018, "Sanity Checks for Saliency Maps").
"""

from __future__ import annotations

import torch


def box_mask(box, height: int, width: int, tolerance: float = 0.0) -> torch.Tensor:
    """[H, W] bool: the pixels whose centres lie in the box grown by `tolerance` pixels on each side."""
    x, y, w, h = box
    cy = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    cx = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    return ((cx >= x - tolerance) & (cx <= x + w + tolerance) & (cy >= y - tolerance) & (cy <= y + h + tolerance))


def pointing_hit(pixel_map: torch.Tensor, box, tolerance: float = 0.0) -> bool:
    """The map's maximum is in the box grown by `tolerance`.  Where several pixels share the maximum (a map
    that is flat over a patch, or over the block of patches one image token stands for), the point is the one
    nearest their centre, not the first in reading order, which would favour the block's top-left corner.
    A constant map (no maximum) is a miss."""
    H, W = pixel_map.shape
    m = pixel_map.detach().float().cpu()
    if m.max() <= m.min():  # a constant map points nowhere
        return False
    top = m >= m.max() - 1e-6 * m.max().abs().clamp_min(1e-12)
    ys, xs = top.nonzero(as_tuple=True)
    # the tied pixel nearest their centre: a flat block's middle, or one of two separate peaks (never between)
    near = ((ys.float() - ys.float().mean()) ** 2 + (xs.float() - xs.float().mean()) ** 2).argmin()
    return bool(box_mask(box, H, W, tolerance)[ys[near], xs[near]])


def energy_in_box(pixel_map: torch.Tensor, box) -> float:
    """The share of the map's positive mass inside the box (0 for an all-zero map)."""
    m = pixel_map.detach().float().cpu().clamp_min(0)
    total = float(m.sum())
    return float(m[box_mask(box, *m.shape)].sum()) / total if total > 0 else 0.0


def box_share(box, height: int, width: int, tolerance: float = 0.0) -> float:
    """The random baseline of both: the share of the image's pixels in the (grown) box."""
    return float(box_mask(box, height, width, tolerance).float().mean())


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank."""
    x = x.detach().flatten().double().cpu()
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two maps (NaN when either is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")
