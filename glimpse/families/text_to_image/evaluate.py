"""The figures of a text-to-image run on a split of the shapes world.

The prompts are the split's images' first captions (each names every object: size, colour, shape,
place).  Images are generated once per prompt (`*_1`: one sample) and once as the best of
`model.rerank` samples by CLIP (`*_rerank`, over the first `model.rerank_prompts` prompts: `n_rerank`).  Each figure is given for both, because the re-ranker and
the CLIP judge are the same model (Park et al. warn that this flatters the CLIP figures; the scene
parser is an independent judge).

- `exact`, `per_object`: the scene parser (glimpse.data.scene_parser) reads each image back into
  objects; exact: all objects right and nothing extra; per object: the share of the prompt's objects
  found.  On test_novel, `novel_object` is the share of the novel colour-shape objects found.
- `clip_rprec`: CLIP-R-precision, the prompt against 99 other prompts, 5 draws (glimpse.metrics.generation).
- `hard_rprec`: the prompt against 9 captions that change one attribute of one object or swap two
  objects' colours or shapes.
- `clip_score_ratio`: the mean CLIP cosine of generated images and prompts over that of the real images.
- `fd_gclip`: the Fréchet distance between glimpse-CLIP image features of generated and real images;
  `fd_gclip_real` is that of the two halves of the real images, the floor (not FID: no Inception weights).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from glimpse.data.images import decode_each
from glimpse.data.scene_parser import parse_scene, scene_accuracy
from glimpse.data.shapes_words import COLOURS, NOVEL_COMBOS, POSITIONS, SHAPES, SIZES, scene_caption
from glimpse.data.world import read_scenes
from glimpse.metrics.generation import clip_score, frechet_distance, hard_r_precision, r_precision

HARD_NEGATIVES = 9


def hard_negatives(objects: list[dict], rng: random.Random, k: int = HARD_NEGATIVES) -> list[str]:
    """k distinct captions that differ from the scene's in one attribute of one object, or (two objects or
    more) in which object has which colour or shape (a swapped binding)."""
    truth = scene_caption(objects)
    choices = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
    out: list[str] = []
    for _ in range(200):
        changed = [dict(o) for o in objects]
        if len(objects) > 1 and rng.random() < 0.3:
            a, b = rng.sample(range(len(objects)), 2)
            attr = rng.choice(["colour", "shape"])
            changed[a][attr], changed[b][attr] = objects[b][attr], objects[a][attr]
        else:
            o = rng.choice(changed)
            attr = rng.choice(list(choices))
            taken = {x["position"] for x in objects}
            options = [v for v in choices[attr] if v != o[attr] and (attr != "position" or v not in taken)]
            if not options:
                continue
            o[attr] = rng.choice(options)
        caption = scene_caption(changed)
        if caption != truth and caption not in out:
            out.append(caption)
        if len(out) == k:
            break
    return out


def _novel_found(parses, scenes) -> float:
    found = total = 0
    for parse, scene in zip(parses, scenes):
        got = {tuple(o[f] for f in ("size", "colour", "shape", "position")) for o in parse.objects}
        for o in scene:
            if (o["colour"], o["shape"]) in NOVEL_COMBOS:
                total += 1
                found += (o["size"], o["colour"], o["shape"], o["position"]) in got
    return found / total if total else float("nan")


def evaluate_text_to_image(pipe, root: Path, splits: list[str], limit: int, rerank: int, rerank_prompts: int = 0,
                           seed: int = 0, max_pixels: int = 40_000_000) -> dict[str, float]:
    results: dict[str, float] = {}
    for split in splits:
        scenes = read_scenes(root, split)
        scenes = scenes[:limit] if limit else scenes
        good, real, failures = decode_each([s.path for s in scenes], max_pixels)
        real = np.stack([np.asarray(im.resize((pipe.image_size,) * 2)) for im in real]) if real else None
        scenes = [scenes[i] for i in good]
        figures: dict[str, float] = {"n": len(scenes), "skipped": len(failures)}
        if len(scenes) < 2:
            results.update({f"{split}/{k}": v for k, v in figures.items()})
            continue
        prompts = [s.captions[0] for s in scenes]
        truth = [s.scene for s in scenes]
        text = pipe.text_embeds(prompts)
        rng = random.Random(seed)
        negatives = [hard_negatives(s.scene, rng) for s in scenes]
        width = min(len(n) for n in negatives)
        negative_embeds = pipe.text_embeds([c for n in negatives for c in n[:width]]).view(len(scenes), width, -1)
        real_embeds = pipe.image_embeds(real)
        half = len(real) // 2
        figures["clip_score_real"] = clip_score(real_embeds, text)
        figures["clip_rprec_real"] = r_precision(real_embeds, text)
        figures["hard_rprec_real"] = hard_r_precision(real_embeds, text, negative_embeds)
        figures["fd_gclip_real"] = frechet_distance(real_embeds[:half], real_embeds[half:])
        for tag, candidates in (("1", 1), ("rerank", rerank)):
            if candidates < 2 and tag == "rerank":
                continue
            # best-of-N costs N samples a prompt: its figures are over the first `rerank_prompts` prompts
            k = len(prompts) if tag == "1" or not rerank_prompts else min(rerank_prompts, len(prompts))
            if k < 2:
                continue
            images = pipe.generate_arrays(prompts[:k], 1, seed, candidates=candidates)[:, 0]
            parses = [parse_scene(im) for im in images]
            acc = scene_accuracy(parses, truth[:k])
            embeds = pipe.image_embeds(images)
            figures.update({f"exact_{tag}": acc["exact"], f"per_object_{tag}": acc["per_object"],
                            f"clip_rprec_{tag}": r_precision(embeds, text[:k]),
                            f"hard_rprec_{tag}": hard_r_precision(embeds, text[:k], negative_embeds[:k]),
                            f"clip_score_ratio_{tag}": clip_score(embeds, text[:k]) / clip_score(real_embeds[:k], text[:k]),
                            f"fd_gclip_{tag}": frechet_distance(embeds, real_embeds), f"n_{tag}": k})
            if split == "test_novel":
                figures[f"novel_object_{tag}"] = _novel_found(parses, truth[:k])
        results.update({f"{split}/{k}": v for k, v in figures.items()})
    return results
