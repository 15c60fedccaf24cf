"""Hard negative captions with swapped attributes (NegCLIP) for the dual encoder: what they change, that
they are false of their image, and that they reach the loss through the dataset, collate and model."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from conftest import tiny_overrides

from glimpse.data.formats import read_coco_captions
from glimpse.data.images import ImageTransform
from glimpse.data.negatives import swapped_negative
from glimpse.data.pairs import PairCollate, PairDataset
from glimpse.data.shapes_words import NOVEL_COMBOS, parse_caption
from glimpse.data.tokenizer import Tokenizer
from glimpse.errors import GlimpseError


def _captions(world, n=200):
    coco = json.loads((world / "annotations" / "captions_train.json").read_text())
    return [a["caption"] for a in coco["annotations"][:n]]


def test_negatives_are_false_of_their_scene_and_drawn_by_the_seed(world):
    swaps = replaced = 0
    for k, caption in enumerate(_captions(world)):
        negative = swapped_negative(caption, seed=k)
        assert negative == swapped_negative(caption, seed=k)  # the seed alone decides
        assert negative is not None and parse_caption(negative) is not None
        assert parse_caption(negative) != parse_caption(caption), (caption, negative)
        # never a colour-shape pair held out for test_novel: training must not see it even as a negative
        assert not {(c, s) for _, c, s, _ in parse_caption(negative)} & set(NOVEL_COMBOS)
        words, neg_words = re.findall(r"\w+", caption), re.findall(r"\w+", negative)
        changed = [(a, b) for a, b in zip(words, neg_words) if a != b]
        assert len(words) == len(neg_words) and changed
        if Counter(words) == Counter(neg_words):  # a swapped binding: the same words, on other objects
            assert len(changed) == 2 and changed[0] == changed[1][::-1]
            swaps += 1
        else:  # one attribute replaced by another of its kind
            assert len(changed) == 1
            replaced += 1
    assert swaps > 20 and replaced > 20
    assert len({swapped_negative(_captions(world)[0], seed=k) for k in range(20)}) > 3


def test_swapping_words_that_leave_the_scene_as_it_was_is_not_a_negative():
    # the two circles trade sizes with their places: the same scene; only replacements are false of it
    caption = "a small red circle on the left and a large red circle on the left"
    for seed in range(30):
        negative = swapped_negative(caption, seed, swap_share=1.0)
        assert negative is None or parse_caption(negative) != parse_caption(caption)
    assert swapped_negative("a dog on a sofa", 0) is None


def test_the_collate_pads_negatives_with_the_captions(world):
    items = read_coco_captions(world / "annotations" / "captions_train.json", world / "images" / "train")
    dataset = PairDataset(items[:8], ImageTransform(32), 10**8, negatives=True)
    samples = [dataset[(i, 7 * i)] for i in range(8)]
    assert [s["negative"] for s in samples] == [dataset[(i, 7 * i)]["negative"] for i in range(8)]
    tok = Tokenizer(world / "tokenizer.json")
    batch = PairCollate(tok, 48)(samples)
    assert batch["negative_ids"].shape == batch["input_ids"].shape
    for s, ids, mask in zip(samples, batch["negative_ids"], batch["negative_mask"]):
        assert ids[mask.bool()].tolist() == tok.tower_ids(s["negative"], 48)
    assert "negative_ids" not in PairCollate(tok, 48)([{**s, "negative": None} for s in samples])


def test_a_dual_encoder_trains_with_hard_negatives(world, tmp_path):
    from glimpse import families
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    recipe = load_recipe("shapes-clip", tiny_overrides(world, **{"model.hard_negatives": "true",
                                                                 "train.max_steps": 3}))
    family = families.get(recipe.family)(recipe, world, Tokenizer(world / "tokenizer.json"))
    dataset, collate = family.train_data()
    batch = collate([dataset[(i, i)] for i in range(6)])
    model = family.build_model()
    out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["negative_ids"],
                batch["negative_mask"])
    # the negatives went through the same text tower as the captions, in one pass
    alone = model(batch["pixel_values"], batch["negative_ids"], batch["negative_mask"])["text_embeds"]
    torch.testing.assert_close(out["negative_embeds"], alone, atol=1e-5, rtol=1e-5)
    assert family.loss(model, batch) > family.loss(model, {k: v for k, v in batch.items() if "negative" not in k})
    train(recipe, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_hard_negatives_need_the_shapes_world_in_memory(world):
    from glimpse.config import load_recipe

    with pytest.raises(GlimpseError, match="model.hard_negatives"):
        load_recipe("shapes-clip", tiny_overrides(world, **{"model.hard_negatives": "true", "data.stream": "true"}))
