"""A deterministic scene parser for the shapes world: which objects an image shows, read off its pixels.

It judges real world images (every test scene is recovered exactly) and images that a model made
(a decoder's reconstructions, a generator's samples), so it never assumes clean pixels: it reports
what does not look like a world object instead of guessing or failing.

How it works, for a square image of S pixels (lengths are fractions of S, as in `glimpse.data.shapes`,
so any S >= 16 works):

1. Background: a plane per channel (the world's backgrounds are flat, noisy or a linear gradient),
   least-squares fitted to the pixels near the median colour, then to those near the plane; the
   noise sigma comes from the median absolute deviation.
2. Regions: each anchor owns the pixels within a window of half-width max radius + jitter + margin
   around it that are nearer to it than to any other anchor.  They are parsed strongest first, and
   each object found is rendered and subtracted from the residual image, so the blurred edge of a
   large shape never passes for a faint object in the next region.
3. Colour: the region's pixels far from the background are explained as blends
   ``background + alpha * (colour - background)`` of each palette colour; the colour with the least
   misfit wins.  Its alpha, soft-thresholded above the noise, is the object's mask; a region whose
   mask holds enough area holds an object.
4. Shape and size: the 8 (size, shape) candidates are rendered as masks by the world's own drawing
   code (`shapes.draw_shape`, 4x supersampled then LANCZOS-downsampled, as the generator does),
   placed so their centroid meets the observed one (a triangle's centroid lies below its anchor
   point).  The best soft IoU (sum of minima over sum of maxima) wins.  If no sharp template fits
   well, Gaussian-blurred ones compete too (a decoder's output is blurry); close calls try subpixel
   shifts.
5. Doubts become ``reasons`` and set ``extra``: foreground outside every window, a faint blob,
   several palette colours in one blob, a colour off the palette, an object away from its anchor,
   a best IoU below the floor (`MIN_IOU` - 0.8 / S), or a runner-up of another size or shape
   within `_AMBIGUOUS` of it (a low-confidence call is reported, not trusted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from glimpse.data.shapes import (
    _ANCHORS,
    _JITTER,
    _RADIUS,
    _RGB,
    _SUPERSAMPLE,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    draw_shape,
    scene_key,
)

MIN_IOU = 0.8  # a best template IoU below MIN_IOU - 0.8 / S (0.7875 at 64 px, 0.775 at 32) is no world object
_AMBIGUOUS = 0.02  # a runner-up of another size or shape this close makes the match low-confidence
_SHARP = 0.9  # below this best IoU with sharp templates, blurred templates are tried too
_BLURS = (0.5, 0.8, 1.2, 1.7, 2.4)  # their Gaussian sigmas, in pixels of a 64-pixel image (scaled with S)
_MARGIN = 0.02  # window margin beyond the largest shape's reach (and at least 1.5 pixels)
_SMALLEST = 1.8 * min(_RADIUS.values()) ** 2  # the smallest shape's area: a small triangle's
_PRESENT = 0.35 * _SMALLEST  # mask area (fraction of S^2) from which a region holds an object
_FAINT = 0.1 * _SMALLEST  # below _PRESENT but above this, with a solid core, a region holds a faint blob
_STRONG = 50.0  # distance from the background (0-255 units) of pixels that decide the colour, plus 4 noise sigmas
_CLEARLY = 25.0  # a pixel fits another palette colour clearly better by this much (0-255 units)
_CLEAR = 0.08  # a best IoU this far above the runner-up needs no subpixel refinement
_SHIFTS = [(dx, dy) for dx in (-0.25, 0, 0.25) for dy in (-0.25, 0, 0.25) if dx or dy]
_CANDIDATES = [(size, shape) for size in SIZES for shape in SHAPES]
_PALETTE = np.array([_RGB[c] for c in COLOURS], dtype=float)


@dataclass
class SceneParse:
    """What `parse_scene` saw: ``objects`` as the annotations write them (size, colour, shape,
    position), ``extra`` when the image also holds something that is not a world object, and
    ``reasons`` saying what (empty when ``extra`` is False).  ``ious`` holds each object's best
    template IoU and ``blurs`` the Gaussian sigma (pixels) of its best template, 0 for the world's
    own sharpness, in the order of ``objects``; ``noise`` is the background's noise sigma (0-255)."""

    objects: list[dict] = field(default_factory=list)
    extra: bool = False
    reasons: list[str] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    blurs: list[float] = field(default_factory=list)
    noise: float = 0.0

    @property
    def key(self) -> tuple:
        """`scene_key` of the objects, to compare with ``scene_key(annotation_scene)``."""
        return scene_key(self.objects)


def parse_scene(image) -> SceneParse:
    """Parse a PIL image or an HxWx3 uint8 array (square, at least 16 pixels) into a `SceneParse`."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] != pixels.shape[1] or pixels.shape[0] < 16 \
            or pixels.dtype != np.uint8:
        raise ValueError("parse_scene needs a square RGB uint8 image of at least 16 pixels, "
                         f"not {pixels.dtype} of shape {pixels.shape}")
    size = pixels.shape[0]
    pixels = pixels.astype(float)
    background, noise = _background(pixels)
    residual = pixels - background  # what the objects found so far do not explain
    parse, found = SceneParse(noise=round(noise, 2)), []
    regions, covered = _regions(size)
    strength = [np.linalg.norm(residual[y0:y1, x0:x1], axis=2)[own].sum() for x0, y0, x1, y1, own in regions]
    for k in np.argsort(strength, kind="stable")[::-1]:  # strongest first: its leakage is explained first
        x0, y0, x1, y1, own = regions[k]
        fit = _parse_region(parse, POSITIONS[k], residual[y0:y1, x0:x1], background[y0:y1, x0:x1], own,
                            (x0, y0), size, noise)
        if fit is not None:
            found.append((k, fit))
            _explain(residual, background, *fit[:5], size)
    # Outside the windows, blobs (not single noisy pixels: the residual is 3x3-averaged first) count
    # from 0 (background) to 1 (a solid palette colour) per pixel.
    smooth = np.pad(residual, ((1, 1), (1, 1), (0, 0)), mode="edge")
    smooth = sum(smooth[i:i + size, j:j + size] for i in range(3) for j in range(3)) / 9
    outside = np.clip((np.linalg.norm(smooth, axis=2)[~covered] - 30.0 - 2 * noise) / 120.0, 0, 1).sum()
    if outside > max(_FAINT * size**2, 1.0):
        parse.reasons.append(f"foreground outside every anchor window ({outside:.1f} px)")
    for k, (colour, cand, _, _, sigma, score) in sorted(found, key=lambda f: f[0]):
        parse.objects.append({"size": cand[0], "colour": COLOURS[colour], "shape": cand[1], "position": POSITIONS[k]})
        parse.ious.append(round(score, 4))
        parse.blurs.append(round(sigma, 2))
    parse.extra = bool(parse.reasons)
    return parse


def scene_accuracy(parses: Sequence[SceneParse], scenes: Sequence) -> dict:
    """How well parses match their true scenes (annotation scene lists), as a dict:

    - ``exact``: the fraction of images parsed exactly: ``parse.key == scene_key(scene)`` and not
      ``parse.extra`` (every object right, none missing, none made up, nothing else seen);
    - ``per_object``: the fraction of all true objects that the parse of their image holds with the
      same size, colour, shape and position (extra or made-up objects do not lower it);
    - ``extra``: the fraction of parses with ``extra`` set;
    - ``n``: the number of images."""
    if len(parses) != len(scenes):
        raise ValueError(f"{len(parses)} parses but {len(scenes)} scenes")
    exact = found = total = extra = 0
    for parse, scene in zip(parses, scenes):
        truth = scene_key(scene)
        exact += parse.key == truth and not parse.extra
        found += sum(o in set(parse.key) for o in truth)
        total += len(truth)
        extra += parse.extra
    n = len(parses)
    return {"exact": exact / n if n else 0.0, "per_object": found / total if total else 0.0,
            "extra": extra / n if n else 0.0, "n": n}


def _background(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """The background under every pixel (a plane per channel, least-squares fitted to the pixels
    near the current estimate, twice) and its noise sigma (from the median absolute deviation)."""
    size = pixels.shape[0]
    ramp = np.arange(size) / size - 0.5
    design = np.stack(np.broadcast_arrays(np.ones((size, size)), ramp[None, :], ramp[:, None]), -1).reshape(-1, 3)
    flat = pixels.reshape(-1, 3)
    plane = np.broadcast_to(np.median(flat, axis=0), flat.shape)
    noise = 1.4826 * float(np.median(np.abs(flat - plane)))
    for _ in range(2):
        near = np.linalg.norm(flat - plane, axis=1) < 25 + 3.5 * noise
        if near.sum() < 16:  # hardly any background: keep the estimate so far
            break
        plane = design @ np.linalg.lstsq(design[near], flat[near], rcond=None)[0]
        noise = 1.4826 * float(np.median(np.abs(flat - plane)[near]))
    return plane.reshape(pixels.shape), noise


@lru_cache(maxsize=16)
def _regions(size: int) -> tuple[list, np.ndarray]:
    """Per anchor (in POSITIONS order) its window (x0, y0, x1, y1) and the window's pixels it owns
    (nearer to it than to any other anchor); and the image's pixels inside some window."""
    half = (max(_RADIUS.values()) + _JITTER) * size + max(_MARGIN * size, 1.5)
    centres = (np.arange(size) + 0.5)
    anchors = np.array([_ANCHORS[p] for p in POSITIONS]) * size
    d2 = (centres[None, None, :] - anchors[:, 0, None, None]) ** 2 + (centres[None, :, None] - anchors[:, 1, None, None]) ** 2
    nearest = d2.argmin(0)
    regions, covered = [], np.zeros((size, size), bool)
    for k, (ax, ay) in enumerate(anchors):
        x0, y0 = max(int(np.floor(ax - half)), 0), max(int(np.floor(ay - half)), 0)
        x1, y1 = min(int(np.ceil(ax + half)), size), min(int(np.ceil(ay + half)), size)
        own = nearest[y0:y1, x0:x1] == k
        covered[y0:y1, x0:x1] |= own
        regions.append((x0, y0, x1, y1, own))
    return regions, covered


def _render(size_name: str, shape: str, cx: float, cy: float, box: tuple, size: int, sigma: float = 0.0) -> np.ndarray:
    """The soft mask (0..1) of one shape centred on (cx, cy) in image pixels, over the window ``box``
    (x0, y0, w, h), drawn as the generator draws it (supersampled, then LANCZOS-downsampled), then
    blurred by a Gaussian of ``sigma`` pixels."""
    x0, y0, w, h = box
    k = _SUPERSAMPLE
    canvas = Image.new("L", (w * k, h * k), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, (cx - x0) * k, (cy - y0) * k, _RADIUS[size_name] * size * k, 255)
    return _blur(np.asarray(canvas.resize((w, h), Image.LANCZOS), dtype=float) / 255.0, sigma)


def _blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """``mask`` convolved with a Gaussian of ``sigma`` pixels (separable; rows and columns renormalised)."""
    if sigma <= 0:
        return mask
    rows, cols = (_gaussian(n, sigma) for n in mask.shape)
    return rows @ mask @ cols.T


@lru_cache(maxsize=256)
def _gaussian(n: int, sigma: float) -> np.ndarray:
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    g = np.exp(-0.5 * (d / sigma) ** 2)
    return g / g.sum(1, keepdims=True)


def _soft(alpha: np.ndarray, tau: float) -> np.ndarray:
    """A soft threshold: alpha below tau is noise (0), above 1 - tau solid (1), linear between."""
    return np.clip((alpha - tau) / (1 - 2 * tau), 0, 1)


@lru_cache(maxsize=64)
def _centroid_offset(size_name: str, shape: str, size: int) -> tuple[float, float]:
    """How far a shape's mask centroid lies from its anchor point, in pixels (averaged over phases)."""
    reach = int(np.ceil(max(_RADIUS.values()) * size)) + 4
    grid = np.arange(2 * reach) + 0.5
    offsets = []
    for phase in (0.0, 0.25, 0.5, 0.75):
        mask = np.clip(_render(size_name, shape, reach + phase, reach + phase, (0, 0, 2 * reach, 2 * reach), size), 0, 1)
        offsets.append(((mask.sum(0) @ grid) / mask.sum() - reach - phase, (mask.sum(1) @ grid) / mask.sum() - reach - phase))
    return tuple(np.mean(offsets, axis=0))


def _parse_region(parse: SceneParse, position: str, diff, background, own, origin, size: int, noise: float):
    """Find the object (if any) in one anchor's region, given the region's residual ``diff`` (pixels
    minus background minus the objects found so far): its (colour index, (size, shape), cx, cy,
    blur sigma, IoU), or None.  Doubts go to ``parse.reasons``."""
    dist = np.linalg.norm(diff, axis=2)
    strong = own & (dist > _STRONG + 4 * noise)
    if not strong.any():
        return None
    spans = _PALETTE[None] - background[strong][:, None]  # (n, colours, 3): colour - background per pixel
    alphas = np.clip(np.einsum("nc,nkc->nk", diff[strong], spans) / (spans**2).sum(-1), 0, 1)
    misfit = np.linalg.norm(diff[strong][:, None] - alphas[..., None] * spans, axis=-1)
    colour = int((misfit**2).sum(0).argmin())
    span = _PALETTE[colour] - background
    # alpha's noise is about noise / |span|; the soft threshold keeps it out of the mask
    tau = float(np.clip(3 * noise / np.linalg.norm(span, axis=-1).mean(), 0.1, 0.4))
    alpha = _soft((diff * span).sum(-1) / (span**2).sum(-1), tau) * own
    mass = alpha.sum()
    if mass < _PRESENT * size**2:
        if mass >= _FAINT * size**2 and alpha.max() > 0.6:
            parse.reasons.append(f"a faint blob at the {position} ({mass:.1f} px)")
        return None
    core = alphas[:, colour] > 0.5  # another colour must fit a core pixel clearly better to count
    if core.sum() >= 3 and (misfit[core].min(1) < misfit[core, colour] - _CLEARLY).mean() > 0.25:
        parse.reasons.append(f"mixed colours in the blob at the {position}")
    if misfit[:, colour].sum() > 0.3 * dist[strong].sum():
        parse.reasons.append(f"a colour off the palette at the {position}")
    ranked = _best_shape(alpha, own, origin, size, tau)
    score, cand, cx, cy, sigma = ranked[0]
    ax, ay = np.array(_ANCHORS[position]) * size
    if max(abs(cx - ax), abs(cy - ay)) > _JITTER * size + max(0.5, 0.008 * size):
        parse.reasons.append(f"the {position} object is away from its anchor")
    if score < MIN_IOU - 0.8 / size:
        parse.reasons.append(f"the blob at the {position} matches no shape well (IoU {score:.2f})")
    elif score - ranked[1][0] < _AMBIGUOUS:
        parse.reasons.append(f"the blob at the {position} is as much a {ranked[1][1][0]} {ranked[1][1][1]} "
                             f"as a {cand[0]} {cand[1]}")
    return colour, cand, cx, cy, sigma, score


def _explain(residual: np.ndarray, background: np.ndarray, colour: int, cand: tuple, cx: float, cy: float,
             sigma: float, size: int) -> None:
    """Subtract a fitted object, rendered as the generator draws it, from ``residual`` (in place)."""
    reach = _RADIUS[cand[0]] * size + 4 + 3 * sigma  # the shape plus the LANCZOS kernel's and the blur's reach
    x0, y0 = max(int(cx - reach), 0), max(int(cy - reach), 0)
    x1, y1 = min(int(np.ceil(cx + reach)), size), min(int(np.ceil(cy + reach)), size)
    template = np.clip(_render(*cand, cx, cy, (x0, y0, x1 - x0, y1 - y0), size, sigma), 0, 1)
    residual[y0:y1, x0:x1] -= template[..., None] * (_PALETTE[colour] - background[y0:y1, x0:x1])


def _best_shape(alpha: np.ndarray, own: np.ndarray, origin: tuple, size: int, tau: float) -> list:
    """The (size, shape) candidates as (IoU, (size, shape), cx, cy, sigma), best first, for the soft
    mask ``alpha`` of a region whose window starts at ``origin``.  Each candidate is centred so its
    mask centroid meets the observed one and scored sharp; if none scores `_SHARP`, blurred too
    (each keeps its best sigma).  When the best two are less than `_CLEAR` apart, both also try
    subpixel shifts."""
    h, w = alpha.shape
    box, mass = (origin[0], origin[1], w, h), alpha.sum()
    mx = (alpha.sum(0) @ (np.arange(w) + 0.5)) / mass + origin[0]
    my = (alpha.sum(1) @ (np.arange(h) + 0.5)) / mass + origin[1]

    def score(cand: tuple, cx: float, cy: float, sigmas: tuple) -> tuple:
        sharp, best = _render(*cand, cx, cy, box, size), (-1.0, 0.0)
        for sigma in sigmas:
            t = _soft(_blur(sharp, sigma), tau) * own
            best = max(best, (float(np.minimum(alpha, t).sum() / max(np.maximum(alpha, t).sum(), 1e-9)), sigma))
        return best[0], cand, cx, cy, best[1]

    centres = {cand: (mx - _centroid_offset(*cand, size)[0], my - _centroid_offset(*cand, size)[1])
               for cand in _CANDIDATES}
    sigmas = (0.0,)
    scored = sorted((score(cand, *centres[cand], sigmas) for cand in _CANDIDATES), key=lambda s: -s[0])
    if scored[0][0] < _SHARP:
        sigmas = (0.0, *(b * size / 64 for b in _BLURS))
        scored = sorted((score(cand, *centres[cand], sigmas) for cand in _CANDIDATES), key=lambda s: -s[0])
    if scored[0][0] - scored[1][0] < _CLEAR:
        for k in range(2):
            _, cand, cx, cy, sigma = scored[k]
            for dx, dy in _SHIFTS:
                scored[k] = max(scored[k], score(cand, cx + dx, cy + dy, (sigma,)), key=lambda s: s[0])
        scored.sort(key=lambda s: -s[0])
    return scored
