"""Hard negative captions with swapped attributes, after NegCLIP (Yuksekgonul et al., "When and why
vision-language models behave like bags-of-words", ICLR 2023): a caption whose words are changed so
that it no longer describes its image, while keeping every word a bag-of-words model would look at.

Two kinds, over the shapes world's attribute words (sizes, colours, shapes):
- a swapped binding: two different words of one kind trade places ("a red circle and a blue square"
  -> "a blue circle and a red square"), the same words, bound to other objects;
- a replaced attribute: one word becomes another of its kind ("a red circle" -> "a green circle").
A candidate that still describes the same scene (two red circles swapping "small" and "large" at the
same place, say) is redrawn: the negative must be false of the image, which `parse_caption` decides.
So is one that names a colour-shape pair the world holds out for test_novel (NOVEL_COMBOS): training
would otherwise see those pairs only as negatives, and learn that they never match (the first run of
`model.hard_negatives` lost 0.08 of test_novel R@1 before this rule).
"""

from __future__ import annotations

import random
import re

from glimpse.data.shapes_words import COLOURS, NOVEL_COMBOS, SHAPES, SIZES, parse_caption

WORD_KINDS = (tuple(SIZES), tuple(COLOURS), tuple(SHAPES))
_TRIES = 8
_HELD_OUT = set(NOVEL_COMBOS)


def swapped_negative(caption: str, seed: int, swap_share: float = 0.5) -> str | None:
    """A hard negative of `caption` drawn by `seed` (so a resumed run draws the same ones): a swapped
    binding with probability `swap_share` when the caption has two different words of a kind, else a
    replaced attribute.  None when the caption holds no attribute word."""
    rng = random.Random(seed)
    parts = re.split(r"(\w+)", caption)  # odd places hold the words, even ones what lies between
    kinds = [[i for i in range(1, len(parts), 2) if parts[i].lower() in kind] for kind in WORD_KINDS]
    if not any(kinds):
        return None
    truth = parse_caption(caption)
    for _ in range(_TRIES):
        changed = list(parts)
        swaps = [k for k, where in enumerate(kinds) if len({parts[i].lower() for i in where}) > 1]
        if swaps and rng.random() < swap_share:
            where = kinds[rng.choice(swaps)]
            i = rng.choice(where)
            j = rng.choice([w for w in where if parts[w].lower() != parts[i].lower()])
            changed[i], changed[j] = parts[j], parts[i]
        else:
            k = rng.choice([k for k, where in enumerate(kinds) if where])
            i = rng.choice(kinds[k])
            changed[i] = rng.choice([w for w in WORD_KINDS[k] if w != parts[i].lower()])
        negative = "".join(changed)
        if negative == caption:
            continue
        if truth is None:
            return negative
        scene = parse_caption(negative)  # a swap or a replacement keeps the caption readable
        if scene is not None and scene != truth and not any((c, s) in _HELD_OUT for _, c, s, _ in scene):
            return negative
    return None
