"""Evaluating a video LLaVA on a split of the moving-shapes world: question answering by type, the
controls that show whether frame order is used, and captioning.

    temporal_acc, static_acc     exact-match accuracy of the greedy answer (lower case, no final stop; of
                                 a traced answer, what follows the trace)
    acc_TYPE                     per question type (direction, bounces, appear_order, ..., colour, count)
    chance_temporal              the accuracy of always giving each type's most common training answer
    shuffled_temporal_acc        every clip's frames in a fixed random order
    shuffled_acc_TYPE,           ... per temporal question type, beside that type's chance: which answers
    chance_TYPE                  survive a shuffle
    single_frame_temporal_acc,   the middle frame repeated T times: what one frame tells (ATP)
    single_frame_static_acc
    reversed_flip                the clips played backwards, asked the direction and order questions whose
                                 answer then changes: the share answered as the reversed clip shows
    cider                        CIDEr-D of the greedy description against the 5 captions (pycocoevalcap's)

Clips that cannot be read are skipped and counted in `skipped`.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from glimpse.data.images import ImageError
from glimpse.data.shapes_video import read_clips
from glimpse.data.shapes_video_text import TEMPORAL_TYPES, answer_of, reverse_tracks
from glimpse.data.shapes_video_traces import final_answer, traced_answer_tokens
from glimpse.families.video_llava.data import hold_middle
from glimpse.metrics.captions import cider

FLIP_TYPES = ("direction", "appear_order", "disappear_order")


def _norm(text: str) -> str:
    return final_answer(text.strip().lower().rstrip(".").strip())


def _chance(root: Path) -> dict[str, str]:
    """Each question type's most common training answer."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for q in json.loads((root / "annotations" / "qa_train.json").read_text()):
        counts[q["question_type"]][q["answer"]] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def evaluate_split(pipe, root: Path, split: str, batch_size: int = 64, limit: int = 0,
                   seed: int = 0) -> dict[str, float]:
    root = Path(root)
    clips = {c.video_id: c for c in read_clips(root / "annotations" / f"captions_{split}.json",
                                               root / "videos" / split)}
    qa = json.loads((root / "annotations" / f"qa_{split}.json").read_text())
    if limit:  # the first `limit` questions, and their clips
        qa = qa[:limit]
        keep = {q["video_id"] for q in qa}
        clips = {k: v for k, v in clips.items() if k in keep}
    pixels, failures = {}, Counter()
    for vid, clip in clips.items():
        try:
            pixels[vid] = pipe.load_pixels(clip.path)
        except ImageError as e:
            failures[e.reason] += 1
    qa = [q for q in qa if q["video_id"] in pixels]
    out: dict[str, float] = {f"{split}/n": len(pixels), f"{split}/skipped": sum(failures.values()),
                             f"{split}/qa_n": len(qa)}
    if not qa:
        return out
    rng = np.random.default_rng(seed)
    T = next(iter(pixels.values())).shape[0]
    shuffle = {vid: torch.from_numpy(rng.permutation(T)) for vid in pixels}

    cfg = pipe.model.cfg
    new_tokens = traced_answer_tokens(cfg.num_frames) if cfg.answer_traces else 8

    def answers(view, items) -> list[str]:
        got = []
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            got += pipe.ask([view(q["video_id"]) for q in chunk], [q["question"] for q in chunk], max_new_tokens=new_tokens)
        return [_norm(a) for a in got]

    def accuracy(pred, items, kind) -> float | None:
        hits = [p == q["answer"] for p, q in zip(pred, items) if q["answer_type"] == kind]
        return float(np.mean(hits)) if hits else None

    pred = answers(lambda v: pixels[v], qa)
    for kind in ("temporal", "static"):
        acc = accuracy(pred, qa, kind)
        if acc is not None:
            out[f"{split}/{kind}_acc"] = acc
    def per_type(prefix, pred, items) -> dict[str, float]:
        by_type: dict[str, list[bool]] = defaultdict(list)
        for p, q in zip(pred, items):
            by_type[q["question_type"]].append(p == q["answer"])
        return {f"{split}/{prefix}_{t}": float(np.mean(h)) for t, h in sorted(by_type.items())}

    out.update(per_type("acc", pred, qa))
    majority = _chance(root)
    temporal = [q for q in qa if q["question_type"] in TEMPORAL_TYPES]
    if temporal:
        guesses = [majority.get(q["question_type"]) for q in temporal]
        out[f"{split}/chance_temporal"] = float(np.mean([g == q["answer"] for g, q in zip(guesses, temporal)]))
        out.update(per_type("chance", guesses, temporal))
        shuffled = answers(lambda v: pixels[v][shuffle[v]], temporal)
        out[f"{split}/shuffled_temporal_acc"] = accuracy(shuffled, temporal, "temporal")
        out.update(per_type("shuffled_acc", shuffled, temporal))
    single = answers(lambda v: hold_middle(pixels[v]), qa)
    for kind in ("temporal", "static"):
        acc = accuracy(single, qa, kind)
        if acc is not None:
            out[f"{split}/single_frame_{kind}_acc"] = acc

    # reversed clips: the direction and order questions whose answer changes when the clip plays backwards
    flips = []
    for q in qa:
        clip = clips[q["video_id"]]
        if q["question_type"] in FLIP_TYPES:
            back = answer_of(q["question_type"], q["shapes"], reverse_tracks(clip.tracks), not clip.reversed)
            if back is not None and back != q["answer"]:  # None: the reversal ties them, no answer
                flips.append({**q, "answer": back})
    if flips:
        got = answers(lambda v: pixels[v].flip(0), flips)
        out[f"{split}/reversed_flip"] = float(np.mean([p == q["answer"] for p, q in zip(got, flips)]))
        out[f"{split}/reversed_flip_n"] = len(flips)

    vids = list(pixels)
    captions = []
    for i in range(0, len(vids), batch_size):
        captions += pipe.caption([pixels[v] for v in vids[i:i + batch_size]])
    out[f"{split}/cider"] = cider({v: clips[v].captions for v in vids}, {v: [c] for v, c in zip(vids, captions)})
    return out


def evaluate(pipe, root: Path, splits: list[str], batch_size: int = 64, limit: int = 0) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in splits:
        out.update(evaluate_split(pipe, root, split, batch_size, limit))
    return out
