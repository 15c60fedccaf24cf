"""Evaluating a vision-language decoder on what it generates: VQA accuracy and captions.

Keys, per split: `vqa_acc` (official VQAv2 accuracy), `vqa_exact` (exact match with the most
common answer, after the official normalisation), `vqa_acc_{yes_no,number,other}` by answer type,
`cider` (CIDEr-D) and `bleu_1..4` of greedy captions against the split's references (PTB-style
tokenised, as the COCO caption evaluation does), and with `eval.few_shot`, `vqa_acc_{k}shot`:
VQA after k solved examples from the training split (other images, drawn with a fixed seed), as
in the Frozen paper.  Greedy decoding throughout, so the figures are reproducible.  An image that
cannot be read is skipped, as in training: `vqa_n` questions and `caption_n` images were scored,
and `skipped` images could not be read.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from glimpse.data.conversations import vqa_items
from glimpse.data.images import decode_each
from glimpse.data.pairs import load_pairs
from glimpse.families.vlm.pipeline import VisionLanguagePipeline
from glimpse.metrics.captions import bleu, cider, tokenize
from glimpse.metrics.vqa import vqa_summary

VQA_MAX_NEW_TOKENS = 8  # a word or a phrase


def _decode(sources, decoded: dict, bad: dict, max_pixels: int) -> None:
    """Decode each source not seen yet into `decoded`, or its failure reason into `bad`."""
    new = [s for s in dict.fromkeys(sources) if s not in decoded and s not in bad]
    good, images, failures = decode_each(new, max_pixels)
    decoded.update((new[i], im) for i, im in zip(good, images))
    bad.update((new[i], reason) for i, reason in failures.items())


def vqa_answers(pipe: VisionLanguagePipeline, items: list[dict], batch_size: int,
                shots: list[list[tuple]] | None = None, bad: dict | None = None) -> tuple[list[str], list[int]]:
    """Greedy short answers to `items` (read_vqa's), optionally each after its own solved examples.
    A question whose image (or a solved example's) cannot be read is skipped, as training skips bad
    samples: returns (the answers, the indices of the items answered); `bad` collects the unreadable
    images with their reasons."""
    preds, answered, bad = [], [], {} if bad is None else bad
    for start in range(0, len(items), batch_size):
        rows = range(start, min(start + batch_size, len(items)))
        needs = {i: [items[i]["image"], *(s[0] for s in (shots[i] if shots else ()))] for i in rows}
        decoded: dict = {}  # this batch's images, decoded once however many questions they have
        _decode([im for i in rows for im in needs[i]], decoded, bad, pipe.max_pixels)
        rows = [i for i in rows if all(im in decoded for im in needs[i])]
        prompts = [pipe.question_prompt(items[i]["question"], decoded[items[i]["image"]],
                                        [(decoded[im], q, a) for im, q, a in shots[i]] if shots else (), short=True)
                   for i in rows]
        if prompts:
            preds += pipe.generate(prompts, VQA_MAX_NEW_TOKENS)
            answered += rows
    return preds, answered


def vqa_scores(pipe: VisionLanguagePipeline, items: list[dict], batch_size: int,
               shots: list[list[tuple]] | None = None, bad: dict | None = None) -> dict[str, float]:
    """VQA accuracy over the readable `items` (`vqa_n` of them), optionally each after its own solved
    examples; `bad` collects the unreadable images."""
    preds, answered = vqa_answers(pipe, items, batch_size, shots, bad)
    if not answered:
        return {"vqa_n": 0}
    return {**vqa_summary(preds, [items[i] for i in answered]), "vqa_n": len(answered)}


def caption_scores(pipe: VisionLanguagePipeline, data_cfg, root: Path, split: str, prompt: str, batch_size: int,
                   max_new_tokens: int, limit: int = 0, bad: dict | None = None) -> dict[str, float]:
    """CIDEr-D and BLEU of greedy captions of the split's readable images (`caption_n` of them); `bad`
    collects the unreadable ones."""
    if data_cfg.format == "llava":  # conversations train; the references are the split's COCO captions
        data_cfg = dataclasses.replace(data_cfg, format="coco")
    pairs = load_pairs(data_cfg, root, split)[: limit or None]
    text = prompt.replace("<image>", "").strip()  # caption() puts the image first itself
    gts, res, bad = {}, {}, {} if bad is None else bad
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        decoded: dict = {}
        _decode([p.image for p in chunk], decoded, bad, pipe.max_pixels)
        rows = [k for k, p in enumerate(chunk) if p.image in decoded]
        captions = pipe.caption([decoded[chunk[k].image] for k in rows], text, max_new_tokens) if rows else []
        for k, c in zip(rows, captions):
            gts[start + k] = [tokenize(r) for r in chunk[k].captions]
            res[start + k] = [tokenize(c)]
    if not res:
        return {"caption_n": 0}
    b = bleu(gts, res)
    return {"cider": cider(gts, res), **{f"bleu_{n + 1}": b[n] for n in range(4)}, "caption_n": len(res)}


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
        bad: dict = {}  # the split's unreadable images, each counted once
        figures = vqa_scores(pipe, items, bs, bad=bad)
        for k in eval_cfg.few_shot:
            shots = few_shot_examples(pool, items, k) if k else None
            figures[f"vqa_acc_{k}shot"] = vqa_scores(pipe, items, bs, shots).get("vqa_acc", 0.0)
        figures.update(caption_scores(pipe, data_cfg, root, split, eval_cfg.caption_prompt, bs, eval_cfg.max_new_tokens,
                                      limit // 4 if limit else 0, bad), skipped=len(bad))
        results.update({f"{split}/{k}": v for k, v in figures.items()})
    return results
