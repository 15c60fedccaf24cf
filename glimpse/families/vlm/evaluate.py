"""Evaluating a vision-language decoder on what it generates: VQA accuracy and captions.

Keys, per split: `vqa_acc` (official VQAv2 accuracy), `vqa_exact` (exact match with the most
common answer, after the official normalisation), `vqa_acc_{yes_no,number,other}` by answer type,
`cider` (CIDEr-D) and `bleu_1..4` of greedy captions against the split's references (PTB-style
tokenised, as the COCO caption evaluation does), and with `eval.few_shot`, `vqa_acc_{k}shot`:
VQA after k solved examples from the training split (other images, drawn with a fixed seed), as
in the Frozen paper.  Greedy decoding throughout, so the figures are reproducible.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from glimpse.data.conversations import vqa_items
from glimpse.data.pairs import load_pairs
from glimpse.families.vlm.pipeline import VisionLanguagePipeline
from glimpse.metrics.captions import bleu, cider, tokenize
from glimpse.metrics.vqa import vqa_summary

VQA_MAX_NEW_TOKENS = 8  # a word or a phrase


def vqa_answers(pipe: VisionLanguagePipeline, items: list[dict], batch_size: int,
                shots: list[list[tuple]] | None = None) -> list[str]:
    """Greedy short answers to `items` (read_vqa's), optionally each after its own solved examples."""
    preds = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = [pipe.question_prompt(it["question"], it["image"], shots[start + i] if shots else (), short=True)
                   for i, it in enumerate(chunk)]
        preds += pipe.generate(prompts, VQA_MAX_NEW_TOKENS)
    return preds


def vqa_scores(pipe: VisionLanguagePipeline, items: list[dict], batch_size: int,
               shots: list[list[tuple]] | None = None) -> dict[str, float]:
    """VQA accuracy over `items`, optionally each after its own solved examples."""
    return vqa_summary(vqa_answers(pipe, items, batch_size, shots), items)


def caption_scores(pipe: VisionLanguagePipeline, data_cfg, root: Path, split: str, prompt: str, batch_size: int,
                   max_new_tokens: int, limit: int = 0) -> dict[str, float]:
    if data_cfg.format == "llava":  # conversations train; the references are the split's COCO captions
        data_cfg = dataclasses.replace(data_cfg, format="coco")
    pairs = load_pairs(data_cfg, root, split)[: limit or None]
    text = prompt.replace("<image>", "").strip()  # caption() puts the image first itself
    gts, res = {}, {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        for k, c in enumerate(pipe.caption([p.image for p in chunk], text, max_new_tokens)):
            gts[start + k] = [tokenize(r) for r in chunk[k].captions]
            res[start + k] = [tokenize(c)]
    b = bleu(gts, res)
    return {"cider": cider(gts, res), **{f"bleu_{n + 1}": b[n] for n in range(4)}}


def few_shot_examples(pool: list[dict], queries: list[dict], k: int, seed: int = 0) -> list[list[tuple]]:
    """For each query, k solved (image, question, answer) examples on other images."""
    rng = random.Random(seed)
    out = []
    for q in queries:
        shots = []
        while len(shots) < k:
            ex = pool[rng.randrange(len(pool))]
            if ex["image"] != q["image"]:
                shots.append((ex["image"], ex["question"], ex["answer"]))
        out.append(shots)
    return out


def evaluate_vlm(pipe: VisionLanguagePipeline, data_cfg, root: Path, splits: list[str], eval_cfg) -> dict[str, float]:
    results: dict[str, float] = {}
    bs, limit = eval_cfg.batch_size, eval_cfg.vqa_limit
    pool = vqa_items(data_cfg, root, "train") if eval_cfg.few_shot else []
    for split in splits:
        items = vqa_items(data_cfg, root, split)[: limit or None]
        results.update({f"{split}/{k}": v for k, v in vqa_scores(pipe, items, bs).items()})
        for k in eval_cfg.few_shot:
            shots = few_shot_examples(pool, items, k) if k else None
            results[f"{split}/vqa_acc_{k}shot"] = vqa_scores(pipe, items, bs, shots)["vqa_acc"]
        caps = caption_scores(pipe, data_cfg, root, split, eval_cfg.caption_prompt, bs, eval_cfg.max_new_tokens,
                              limit // 4 if limit else 0)
        results.update({f"{split}/{k}": v for k, v in caps.items()})
    return results
