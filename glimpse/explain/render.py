"""Explanations as pictures: the image with its heatmap over it, the text's tokens shaded by relevance
underneath, and (for generated answers) one small map per answer word."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from glimpse.explain.core import PIXEL_METHODS, Explanation

_SIDE = 256  # the heatmap panel's side in pixels
_WORD_SIDE = 96


def overlay(image: Image.Image, grid: torch.Tensor, side: int, alpha: float = 0.75, gamma: float = 1.0) -> Image.Image:
    """The image resized to side x side with the relevance grid (bilinear, the inferno colour map)
    blended over it, strongest where the relevance is; shown as relevance ** gamma."""
    base = image.convert("RGB").resize((side, side), Image.BICUBIC)
    heat = Explanation("", "", 0.0, grid).pixel_map(side, side).numpy() ** gamma
    colours = colormaps["inferno"](heat)[..., :3]
    weight = alpha * heat[..., None]
    mixed = (1 - weight) * np.asarray(base, dtype=np.float32) / 255 + weight * colours
    return Image.fromarray((mixed * 255).clip(0, 255).astype(np.uint8))


def _shade(score: float) -> tuple[int, int, int]:
    r, g, b, _ = colormaps["inferno"](0.15 + 0.8 * score)
    return int(255 * r), int(255 * g), int(255 * b)


def render(image: Image.Image, e: Explanation) -> Image.Image:
    """One picture of an explanation: title, heatmap, shaded tokens, per-word maps."""
    font = ImageFont.load_default()
    pad, line = 8, 16
    words_w = len(e.words) * (_WORD_SIDE + pad) if len(e.words) > 1 else 0
    width = max(_SIDE + 2 * pad + words_w, 360)
    # lay the tokens out in lines first, to know the height
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, x, y = [], pad, 0
    for tok, score in zip(e.tokens, e.token_scores):
        w = int(draw.textlength(tok, font=font)) + 6
        if x + w > width - pad:
            x, y = pad, y + line + 4
        placed.append((tok, score, x, y, w))
        x += w + 3
    text_h = (y + line + 8) if placed else 0
    top = 2 * line + pad
    canvas = Image.new("RGB", (width, top + _SIDE + pad + text_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), f"{e.method}: {e.target}", fill=(0, 0, 0), font=font)
    draw.text((pad, 4 + line), f"score {e.score:.3f}   {1000 * e.seconds:.0f} ms", fill=(90, 90, 90), font=font)
    # a pixel map is heavy-tailed (a few pixels near 1): its square root shows the shape it lights
    canvas.paste(overlay(image, e.grid, _SIDE, gamma=0.5 if e.method in PIXEL_METHODS else 1.0), (pad, top))
    if len(e.words) > 1:
        for k, (word, grid) in enumerate(e.words):
            x0 = _SIDE + 2 * pad + k * (_WORD_SIDE + pad)
            canvas.paste(overlay(image, grid, _WORD_SIDE), (x0, top))
            draw.text((x0, top + _WORD_SIDE + 2), word, fill=(0, 0, 0), font=font)
    y0 = top + _SIDE + pad
    for tok, score, x, y, w in placed:
        fill = _shade(score)
        draw.rectangle([x, y0 + y, x + w, y0 + y + line], fill=fill)
        draw.text((x + 3, y0 + y + 2), tok, fill=(255, 255, 255) if score < 0.6 else (0, 0, 0), font=font)
    return canvas


def save(image: Image.Image, e: Explanation, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render(image, e).save(path)
    return path
