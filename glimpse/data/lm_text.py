"""Text for language-model pretraining, chosen by `data.lm_text`.

- ``captions``: one caption per sample.
- ``world``: documents of 1 to 3 training images' text.  Each image is a caption followed, in
  most documents, by up to two of its questions in the Frozen paper's few-shot format
  ("Question: q Answer: a").  Within a document the answers are either all short (the VQA
  annotators' answer) or all full sentences ("the square is red."), as web text holds both:
  the LM has to read the style off the document itself, the in-context skill that Frozen's
  few-shot prompts rely on.  The LM never sees an image; it learns how the world is talked
  about, as a real LM learns language before Frozen or LLaVA meets it.
- ``world_binding``: ``world``, and in `binding_share` of the documents a binding episode in text:
  three of the world's colours get made-up words ("dakim") for this document only, lines
  "red dakim" name them, and a line's word can only be copied from an earlier line with its colour.
  This is the in-context skill (an induction: find the earlier line with the same key, copy what
  followed it) that a real LM brings to Flamingo; Flamingo's binding episodes put an image where
  the colour word is here.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

from torch.utils.data import Dataset

from glimpse.data.formats import ImageText

STYLES = ("caption", "short", "sentence")  # a document's kind: captions only, or questions answered so


@lru_cache(maxsize=4)
def nonce_words(split: str, n: int = 400) -> tuple[str, ...]:
    """Made-up words of two consonant-vowel syllables and a final consonant ("dakim"): a fixed pool per
    `split`, the two pools disjoint, none a word of the shapes world.  "test" holds `n` words; "train"
    holds every other word of the half the test words are not drawn from (34,300), so that a model
    trained on episodes cannot learn the words themselves: with a pool of 400 the LM learned them and
    completed a new word's first letters into a training word's ending ("sorib" -> "soman"), and copying
    a word from the examples was what it failed at (docs/results.md, 2026-11-27, session 14)."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    words = ["".join(p) for p in itertools.product(cons, vows, cons, vows, cons)]
    random.Random(1234).shuffle(words)
    half = len(words) // 2
    return tuple(words[half:half + n] if split == "test" else words[:half])


def binding_lines(rng: random.Random, colours: list[str], words: list[str], n_colours: int = 3,
                  max_lines: int = 9) -> str:
    """A text binding episode: 2 to `max_lines` lines "colour word", one word per colour.  The word
    follows its key directly: the plain induction pattern (A B ... A -> B) a small LM learns."""
    chosen = rng.sample(colours, n_colours)
    word_of = dict(zip(chosen, rng.sample(words, n_colours)))
    return "\n".join(f"{c} {word_of[c]}" for c in (rng.choice(chosen) for _ in range(rng.randint(2, max_lines))))


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

    def __init__(self, items: list[ImageText], vqa: list[dict], max_images: int = 3, max_questions: int = 2,
                 binding_share: float = 0.0, colours: list[str] = ()):
        self.items, self.max_images, self.max_questions = items, max_images, max_questions
        self.binding_share, self.colours, self.words = binding_share, list(colours), nonce_words("train")
        by_image: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for q in vqa:
            by_image[str(Path(q["image"]))].append((q["question"], q["answer"], q.get("sentence") or q["answer"]))
        self.questions = [by_image.get(str(Path(it.image)), []) if isinstance(it.image, str) else []
                          for it in items]

    def __len__(self) -> int:
        return len(self.items)

    def document(self, idx: int, choice: int) -> str:
        rng = random.Random(idx * 1_000_003 + choice)
        if self.binding_share and rng.random() < self.binding_share:
            return binding_lines(rng, self.colours, self.words)
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
