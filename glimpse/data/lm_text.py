"""Text for language-model pretraining, chosen by `data.lm_text`.

- ``captions``: one caption per sample.
- ``world``: documents of 1 to 3 training images' text.  Each image is a caption followed, in
  most documents, by up to two of its questions in the Frozen paper's few-shot format
  ("Question: q Answer: a").  Within a document the answers are either all short (the VQA
  annotators' answer) or all full sentences ("the square is red."), as web text holds both:
  the LM has to read the style off the document itself, the in-context skill that Frozen's
  few-shot prompts rely on.  The LM never sees an image; it learns how the world is talked
  about, as a real LM learns language before Frozen or LLaVA meets it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from torch.utils.data import Dataset

from glimpse.data.formats import ImageText

STYLES = ("caption", "short", "sentence")  # a document's kind: captions only, or questions answered so


def qa_line(question: str, answer: str) -> str:
    return f"Question: {question} Answer: {answer}"


class CaptionTexts(Dataset):
    """The captions alone; keys as PairDataset's (image index, caption choice)."""

    def __init__(self, items: list[ImageText]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        idx, choice = key
        captions = self.items[idx].captions
        return {"text": captions[choice % len(captions)]}


class WorldTexts(Dataset):
    """Documents of captions and questions (module docstring); keys as CaptionTexts', each key
    one deterministic document."""

    def __init__(self, items: list[ImageText], vqa: list[dict], max_images: int = 3, max_questions: int = 2):
        self.items, self.max_images, self.max_questions = items, max_images, max_questions
        by_image: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for q in vqa:
            by_image[str(Path(q["image"]))].append((q["question"], q["answer"], q.get("sentence") or q["answer"]))
        self.questions = [by_image.get(str(Path(it.image)), []) if isinstance(it.image, str) else []
                          for it in items]

    def __len__(self) -> int:
        return len(self.items)

    def document(self, idx: int, choice: int) -> str:
        rng = random.Random(idx * 1_000_003 + choice)
        style = STYLES[rng.randrange(len(STYLES))]
        blocks = []
        for b in range(rng.randint(1, self.max_images)):
            j = (idx + b * 7919) % len(self.items)  # other images, spread over the split
            lines = [rng.choice(self.items[j].captions)]
            if style != "caption":
                qas = self.questions[j]
                for q, short, sentence in rng.sample(qas, min(self.max_questions, len(qas))):
                    lines.append(qa_line(q, short if style == "short" else sentence))
            blocks.append("\n".join(lines))
        return "\n".join(blocks)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return {"text": self.document(*key)}
