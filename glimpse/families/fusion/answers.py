"""VQA as classification: the answer vocabulary of a training split, and (image, question,
soft answer scores) samples for a fusion encoder's answer head.

An answer's target score for a question is its official VQA accuracy against the question's
human answers (glimpse.metrics.vqa), so training optimises the metric's own notion of a right
answer, as the bottom-up/top-down VQA models do with min(1, #humans / 3).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils.data import Dataset

from glimpse.data.images import ImageError, ImageTransform, load_image
from glimpse.data.pairs import PairCollate
from glimpse.metrics.vqa import normalize_answer, vqa_accuracy


def answer_vocabulary(items: list[dict], max_answers: int = 0) -> list[str]:
    """The training questions' (normalised) most common answers, most frequent first, ties by name."""
    counts = Counter(normalize_answer(it["answer"]) for it in items if it.get("answer"))
    ranked = sorted(counts, key=lambda a: (-counts[a], a))
    return ranked[:max_answers] if max_answers else ranked


def answer_scores(answers: list[str], human: list[str]) -> torch.Tensor:
    """[A] VQA accuracy of each vocabulary answer given the human answers (0 for most)."""
    out = torch.zeros(len(answers))
    index = {a: i for i, a in enumerate(answers)}
    for cand in {normalize_answer(h) for h in human}:
        if cand in index:
            out[index[cand]] = vqa_accuracy(cand, human)
    return out


class VQADataset(Dataset):
    """Keys are (index, choice) pairs as PairDataset's; the choice is unused (one question per item).
    Questions none of whose answers is in the vocabulary are kept out (nothing to learn from them)."""

    def __init__(self, items: list[dict], answers: list[str], transform: ImageTransform, max_pixels: int):
        scored = [(it, answer_scores(answers, it["answers"])) for it in items]
        self.items = [(it, s) for it, s in scored if s.sum() > 0]
        self.transform, self.max_pixels = transform, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        item, scores = self.items[key[0]]
        try:
            pixels = self.transform(load_image(item["image"], max_pixels=self.max_pixels))
        except ImageError as e:
            return {"error": e.reason, "message": str(e)}
        return {"pixel_values": pixels, "question": item["question"], "scores": scores}


class VQACollate(PairCollate):
    """A PairCollate over questions that also stacks each good sample's answer scores."""

    text_key = "question"

    def __call__(self, samples: list[dict]) -> dict:
        batch = super().__call__(samples)
        good = [s for s in samples if "error" not in s]
        if good:
            batch["answer_scores"] = torch.stack([s["scores"] for s in good])
        return batch
