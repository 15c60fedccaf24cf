"""Explanations: what a model's decision rested on, as a relevance per image patch and per text token.

An *explainer* holds one decision of one model: the image (preprocessed pixels [1, 3, H, W]), the text, and
the score that is explained (a dual encoder's cosine similarity, a fusion encoder's log P(match) or an
answer's log-probability, a LLaVA answer's log-probability).  It offers two things:

- `score(pixels [B, 3, H, W]) -> [B]`: the same score for variants of the image (occlusion, deletion);
- `attention(method) -> Relevance`: the attention methods of glimpse.explain.relevance, run on the maps
  that explain mode records.

- `differentiable_score(pixels)`: `score` with autograd, for integrated gradients.

`explain(explainer, method)` makes an `Explanation` of any kind; occlusion is model-agnostic and needs only
`score`, integrated gradients only `differentiable_score`.  The attention methods and occlusion give a
relevance per patch; integrated gradients one per pixel (a grid of the image's size).  The families'
pipelines build their explainers (`pipeline.explain(...)`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from glimpse.explain.relevance import ATTENTION_METHODS

PIXEL_METHODS = ("integrated_gradients", "chefer_ig")  # maps at the image's resolution, finer than the patches
METHODS = (*ATTENTION_METHODS, *PIXEL_METHODS, "occlusion")
DEFAULT_METHOD = "chefer"


@dataclass
class Relevance:
    """What an attention method finds: per patch [gh, gw], per text token, and per generated word."""
    grid: torch.Tensor
    token_scores: list[float] = field(default_factory=list)
    words: list[tuple[str, torch.Tensor]] = field(default_factory=list)


@dataclass
class Explanation:
    method: str
    target: str  # what was explained, in words ("similarity to 'a red circle'", "answer 'red'")
    score: float  # the explained score on the unaltered input
    grid: torch.Tensor  # [gh, gw] relevance per image patch ([H, W] per pixel: PIXEL_METHODS), min-max scaled to [0, 1]
    tokens: list[str] = field(default_factory=list)  # the text's tokens, as the model read them
    token_scores: list[float] = field(default_factory=list)  # relevance per token, min-max scaled to [0, 1]
    words: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (generated word, its own grid)
    seconds: float = 0.0

    def pixel_map(self, height: int, width: int | None = None, grid: torch.Tensor | None = None) -> torch.Tensor:
        """The patch relevance bilinearly upsampled to the image's pixels [height, width] (what the
        heatmap shows and what the box metrics read)."""
        g = (self.grid if grid is None else grid).float()[None, None]
        return F.interpolate(g, size=(height, width or height), mode="bilinear", align_corners=False)[0, 0].clamp_min(0)

    def to_dict(self) -> dict:
        return {"method": self.method, "target": self.target, "score": self.score,
                "grid": [[round(v, 4) for v in row] for row in self.grid.tolist()],
                "tokens": [{"token": t, "relevance": round(s, 4)} for t, s in zip(self.tokens, self.token_scores)],
                "words": [{"word": w, "grid": [[round(v, 4) for v in row] for row in g.tolist()]} for w, g in self.words],
                "seconds": round(self.seconds, 4)}


def scaled(x: torch.Tensor) -> torch.Tensor:
    """Min-max scaled to [0, 1], as Chefer et al.'s code shows its maps: the least relevant patch is 0
    and the most relevant 1 (a constant map becomes all zero)."""
    x = x.detach().float()
    x = x - x.min()
    top = x.max()
    return x / top if top > 0 else x


def explain(explainer, method: str = DEFAULT_METHOD) -> Explanation:
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; one of {', '.join(METHODS)}")
    start = time.perf_counter()
    if method == "occlusion":
        rel = Relevance(occlusion(explainer.score, explainer.pixels, explainer.grid_shape))
    elif method == "integrated_gradients":
        rel = Relevance(integrated_gradients(explainer.differentiable_score, explainer.pixels))
    elif method == "chefer_ig":
        rel = Relevance(guided(explainer.attention("chefer").grid,
                               integrated_gradients(explainer.differentiable_score, explainer.pixels)))
    else:
        rel = explainer.attention(method)
    scores = [float(s) for s in scaled(torch.tensor(rel.token_scores))] if rel.token_scores else []
    return Explanation(method, explainer.target, explainer.base_score, scaled(rel.grid), list(explainer.tokens), scores,
                       [(w, scaled(g)) for w, g in rel.words], time.perf_counter() - start)


def cell_masks(grid_shape: tuple[int, int], size: tuple[int, int], device=None) -> torch.Tensor:
    """[gh * gw, H, W] bool: the pixels of each patch cell, row-major."""
    gh, gw = grid_shape
    H, W = size
    rows = torch.arange(H, device=device) * gh // H
    cols = torch.arange(W, device=device) * gw // W
    cell = rows[:, None] * gw + cols[None, :]  # [H, W]
    return cell[None] == torch.arange(gh * gw, device=device)[:, None, None]


def occluded(pixels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Variants of one image [1, 3, H, W] with the pixels outside `keep` [K, H, W] set to 0: the data
    set's mean colour, in the normalised space the towers read."""
    return pixels * keep[:, None].to(pixels.dtype)


@torch.no_grad()
def occlusion(score, pixels: torch.Tensor, grid_shape: tuple[int, int], batch_size: int = 64) -> torch.Tensor:
    """Occlusion (Zeiler & Fergus 2014) on the patch grid: how much the score falls when each patch is
    painted over with the mean colour.  [gh, gw]."""
    masks = cell_masks(grid_shape, pixels.shape[-2:], pixels.device)
    base = score(pixels)[0]
    drops = torch.cat([base - score(occluded(pixels, ~masks[i:i + batch_size]))
                       for i in range(0, len(masks), batch_size)])
    return drops.view(grid_shape).clamp_min(0)  # painting a patch over that raises the score: no relevance


def integrated_gradients(score, pixels: torch.Tensor, steps: int = 16, batch_size: int = 16) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al. 2017): each pixel's (x - x0) times the mean gradient of the
    score along the straight path from the baseline x0 to the image, summed over the colour channels, its
    positive part.  The baseline is the mean-colour image (0 in the towers' normalised space: what occlusion
    paints with), the path integral a midpoint rule of `steps` points.  Completeness: the attributions sum
    to score(x) - score(x0), up to the rule's error.  [H, W], per pixel."""
    alphas = (torch.arange(steps, device=pixels.device, dtype=pixels.dtype) + 0.5) / steps
    total = torch.zeros_like(pixels[0])
    for a in alphas.split(batch_size):
        path = (pixels * a[:, None, None, None]).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(score(path).sum(), path)
        total += grad.sum(0)
    return (pixels[0] * total / steps).sum(0).clamp_min(0).detach()


def guided(patch_map: torch.Tensor, pixel_map: torch.Tensor) -> torch.Tensor:
    """A patch map upsampled (bilinear, as `Explanation.pixel_map`) times a pixel map, each min-max scaled:
    Guided Grad-CAM's recipe (Selvaraju et al. 2017: Grad-CAM's coarse map times guided backpropagation's
    fine one), here with Chefer's relevance as the coarse map and integrated gradients as the fine one.
    The coarse map says which object, the fine one which of the patch's pixels.  [H, W]."""
    coarse = Explanation("", "", 0.0, scaled(patch_map)).pixel_map(*pixel_map.shape)
    return coarse * scaled(pixel_map)


def patch_order(grid: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor:
    """Patch indices, most relevant first, of a patch map or of a pixel map (its mean over each patch)."""
    if tuple(grid.shape) != tuple(grid_shape):
        grid = F.adaptive_avg_pool2d(grid[None, None].float(), grid_shape)[0, 0]
    return grid.flatten().argsort(descending=True, stable=True)


@torch.no_grad()
def deletion_curve(score, pixels: torch.Tensor, order: torch.Tensor, grid_shape: tuple[int, int],
                   steps: int = 16) -> torch.Tensor:
    """The score as the patches are painted over in `order` (most relevant first), at `steps` + 1 evenly
    spaced counts from none to all (RISE's deletion, Petsiuk et al. 2018).  [steps + 1]."""
    masks = cell_masks(grid_shape, pixels.shape[-2:], pixels.device)
    n = len(order)
    counts = torch.linspace(0, n, steps + 1).round().long().tolist()
    keep = torch.stack([~masks[order[:c]].any(0) for c in counts])  # [steps + 1, H, W]
    return score(occluded(pixels, keep)).float()


def auc(curve: torch.Tensor) -> float:
    """Area under a curve sampled evenly on [0, 1] (trapezoids)."""
    return float(torch.trapezoid(curve, dx=1.0 / (len(curve) - 1)))
