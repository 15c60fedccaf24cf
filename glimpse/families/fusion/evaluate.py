"""Evaluating a fusion encoder on a split.

Retrieval (pretrain and retrieval runs): R@K of ITC alone (`t2i_r1`, ...), and re-ranked
among ITC's top k (`rerank_k`), as ALBEF evaluates: by log P_ITM(match) + the ITC logit
(`t2i_r1_rerank`, ...; see FusionPipeline.combine) and by ITM alone (`t2i_r1_itm`, ...).
Re-ranked recall is only reported for K <= k (a target outside the candidates is a miss).
VQA (vqa runs): the official VQAv2 accuracy of the best answer of the answer list (`vqa_acc`),
exact match with the most common human answer (`vqa_exact`), and accuracy by answer type.
An image that cannot be read is skipped, as in training: `n` images (retrieval) or questions (VQA)
were scored, and `skipped` images could not be read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glimpse.data.conversations import vqa_items
from glimpse.data.images import decode_each
from glimpse.data.pairs import load_pairs
from glimpse.families.fusion.pipeline import FusionPipeline
from glimpse.metrics.retrieval import recall_from_scores
from glimpse.metrics.vqa import vqa_summary


def retrieval_split(pipe: FusionPipeline, data_cfg, root: Path, split: str, k: int) -> dict[str, float]:
    items = load_pairs(data_cfg, root, split)
    good, pixels, bad = decode_each([it.image for it in items], pipe.max_pixels, pipe.transform)
    items = [items[i] for i in good]
    if not items:
        return {f"{split}/n": 0, f"{split}/skipped": len(bad)}
    patches, pooled = pipe.image_features(torch.stack(pixels))
    captions = [c for it in items for c in it.captions]
    text_image = torch.tensor([i for i, it in enumerate(items) for _ in it.captions])
    states, mask = pipe.text_states(captions)
    sim = (pipe.embed_states(states) @ pipe.embed_pooled(pooled).T).cpu()  # [M, N]
    out = recall_from_scores(sim, text_image)
    t2i, i2t = pipe.rerank(sim, k, states, mask, patches, pooled)
    variants = {"rerank": (pipe.combine(t2i, sim), pipe.combine(i2t, sim.T)), "itm": (t2i, i2t)}
    for name, (t2i_scores, i2t_scores) in variants.items():
        by_t2i, by_i2t = recall_from_scores(t2i_scores, text_image), recall_from_scores(i2t_scores.T, text_image)
        for key in [key for key in out if "_" not in key[4:]]:  # the ITC keys
            if int(key.rsplit("_r", 1)[1]) <= k:
                out[f"{key}_{name}"] = (by_t2i if key.startswith("t2i") else by_i2t)[key]
    out.update(n=len(items), skipped=len(bad))
    return {f"{split}/{key}": v for key, v in out.items()}


def vqa_split(pipe: FusionPipeline, data_cfg, root: Path, split: str, batch_size: int,
              limit: int = 0) -> dict[str, float]:
    items = vqa_items(data_cfg, root, split)[: limit or None]
    answers = pipe.model.cfg.answers
    images = sorted({it["image"] for it in items})  # an image has several questions: decoded once
    good, pixels, bad = decode_each(images, pipe.max_pixels, pipe.transform)
    pixel_of = {images[i]: p for i, p in zip(good, pixels)}
    items = [it for it in items if it["image"] in pixel_of]
    preds = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        logits = pipe.answer_logits(torch.stack([pixel_of[it["image"]] for it in chunk]), [it["question"] for it in chunk])
        preds += [answers[i] for i in logits.argmax(-1).tolist()]
    out = {**(vqa_summary(preds, items) if items else {}), "n": len(items), "skipped": len(bad)}
    return {f"{split}/{key}": v for key, v in out.items()}


def evaluate_fusion(pipe: FusionPipeline, data_cfg, root: Path, splits: list[str], eval_cfg) -> dict[str, float]:
    results: dict[str, float] = {}
    for split in splits:
        if pipe.model.cfg.objective == "vqa":
            results.update(vqa_split(pipe, data_cfg, root, split, eval_cfg.batch_size, eval_cfg.vqa_limit))
        else:
            results.update(retrieval_split(pipe, data_cfg, root, split, pipe.model.cfg.rerank_k))
    return results
