"""The figures of a captioner on a split: CIDEr-D and BLEU-1..4 of greedy captions against the split's
references (PTB-style tokenised, as the COCO caption evaluation), `exact`, the share of captions equal
to one of their image's references word for word, `scene_exact` (shapes world), the share of captions
that describe their image's scene exactly (every object's size, colour, shape and place, nothing more:
`glimpse.data.shapes_words.parse_caption` reads caption and references alike; the world words a scene in
20 or more ways and each image has 5 references, so `exact` stays far below it even for a perfect
captioner), and `shuffled_cider`, the control: each image's
caption scored against another image's references (the captions permuted with a fixed seed).  A model
that reads its images scores far below its CIDEr-D there; one that writes the same caption whatever
it sees scores about the same.  Unreadable images are skipped and counted (`skipped`); `caption_n`
images were captioned.
"""

from __future__ import annotations

import random
from pathlib import Path

from glimpse.data.images import decode_each
from glimpse.data.pairs import load_pairs
from glimpse.data.shapes_words import parse_caption
from glimpse.metrics.captions import bleu, cider, tokenize


def caption_figures(captions: list[str], references: list[list[str]], seed: int = 0) -> dict[str, float]:
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize(c)] for i, c in enumerate(captions)}
    b = bleu(gts, res)
    exact = sum(res[i][0] in gts[i] for i in res) / len(res)
    truth = [parse_caption(refs[0]) if refs else None for refs in references]
    scene = {"scene_exact": sum(parse_caption(c) == t for c, t in zip(captions, truth) if t is not None)
             / max(sum(t is not None for t in truth), 1)} if any(t is not None for t in truth) else {}
    order = list(res)
    random.Random(seed).shuffle(order)
    shuffled = {i: res[j] for i, j in zip(res, order)}
    return {"cider": cider(gts, res), **{f"bleu_{n + 1}": b[n] for n in range(4)}, "exact": exact, **scene,
            "shuffled_cider": cider(gts, shuffled), "caption_n": len(res)}


def evaluate_captioner(pipe, data_cfg, root: Path, splits: list[str], eval_cfg) -> dict[str, float]:
    results: dict[str, float] = {}
    for split in splits:
        pairs = load_pairs(data_cfg, root, split)
        captions, refs, skipped = [], [], 0
        for start in range(0, len(pairs), eval_cfg.batch_size):
            chunk = pairs[start:start + eval_cfg.batch_size]
            good, images, failures = decode_each([p.image for p in chunk], pipe.max_pixels)
            skipped += len(failures)
            if images:
                captions += pipe.caption(images, max_new_tokens=eval_cfg.max_new_tokens)
                refs += [chunk[i].captions for i in good]
        figures = caption_figures(captions, refs) if captions else {"caption_n": 0}
        results.update({f"{split}/{k}": v for k, v in {**figures, "skipped": skipped}.items()})
    return results
