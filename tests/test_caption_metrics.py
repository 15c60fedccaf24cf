"""BLEU / CIDEr-D against pycocoevalcap (test-only dependency), plus the Java-free tokenizer."""

from __future__ import annotations

import random

import pytest

from glimpse.metrics.captions import PUNCTUATIONS, bleu, cider, tokenize

TOL = {"rel": 1e-9, "abs": 1e-12}

# ~20 images, 3-5 references each; candidates: exact copies, partial overlaps, one-word and
# empty ones, longer and shorter than the references, repeated words (clipping), unseen words.
HAND_GTS = {
    1: ["a man riding a wave on top of a surfboard", "a surfer rides a large wave in the ocean",
        "a person on a surfboard riding a wave"],
    2: ["two dogs playing with a frisbee in the grass", "a pair of dogs chase a frisbee",
        "dogs playing in a grassy field", "two brown dogs run after a red frisbee"],
    3: ["a plate of food with broccoli and rice", "a white plate topped with rice and vegetables",
        "broccoli and rice on a plate", "a healthy meal of rice and broccoli", "food on a plate"],
    4: ["a red bus driving down a city street", "a double decker bus on the road",
        "a bus is parked next to the sidewalk"],
    5: ["a cat sleeping on a laptop keyboard", "a cat lying on a computer",
        "a grey cat naps on the keys of a laptop", "cat on laptop"],
    6: ["a kitchen with white cabinets and a stove", "a clean kitchen with a window",
        "an empty kitchen with wooden floors"],
    7: ["a giraffe standing next to a tree", "a tall giraffe eating leaves from a tree",
        "a giraffe in a zoo enclosure", "giraffe near trees on a sunny day"],
    8: ["a man holding a tennis racket on a court", "a tennis player swings at the ball",
        "a man playing tennis", "a player hits a tennis ball with his racket", "tennis match in progress"],
    9: ["a clock tower in the middle of a town", "a tall clock tower under a blue sky",
        "a building with a large clock"],
    10: ["a woman cutting a cake with a knife", "a lady slicing a birthday cake",
         "a woman serves cake at a party", "a person cutting into a cake"],
    11: ["a train traveling down tracks next to a forest", "a green train on the railway",
         "a passenger train passes through the countryside"],
    12: ["a bowl of fruit on a wooden table", "apples and bananas in a bowl",
         "a fruit bowl with oranges apples and bananas", "fruit sits in a bowl on a table"],
    13: ["a skateboarder doing a trick on a ramp", "a boy jumps with his skateboard",
         "a person skateboarding at a skate park", "a kid on a skateboard in the air", "skateboard trick"],
    14: ["an airplane flying in the blue sky", "a jet plane in flight", "a large passenger plane in the sky"],
    15: ["a bathroom with a toilet and a sink", "a small white bathroom", "a toilet next to a sink",
         "the bathroom has a mirror above the sink"],
    16: ["people walking on a beach with umbrellas", "a crowded beach on a summer day",
         "many people and umbrellas on the sand"],
    17: ["a horse pulling a cart down a dirt road", "a brown horse and a wagon",
         "a man drives a horse drawn carriage", "horse and cart on a road"],
    18: ["a pizza with cheese and pepperoni on a pan", "a large pizza on a table",
         "a pepperoni pizza ready to eat", "a whole pizza with many toppings", "pizza"],
    19: ["a stop sign on the corner of a street", "a red stop sign near a building",
         "a street sign at an intersection"],
    20: ["an elephant walking through tall grass", "a large elephant in the wild",
         "an elephant standing in a field", "the elephant walks in the grass"],
    21: ["a child flying a kite in a park", "a young boy with a colorful kite",
         "a kid plays with a kite on a windy day"],
}
HAND_RES = {
    1: ["a man riding a wave on top of a surfboard"],            # exact match of a reference
    2: ["two dogs playing with a frisbee"],                      # shorter prefix
    3: ["a plate"],                                              # very short
    4: ["a red bus driving down a city street next to a tall building with many windows and people"],
    5: [""],                                                     # empty candidate
    6: ["a kitchen"],
    7: ["a giraffe a giraffe a giraffe a giraffe"],              # repeated n-grams -> clipping
    8: ["a man playing tennis on a court with a racket"],
    9: ["zebra"],                                                # nothing in common
    10: ["a woman cutting a birthday cake at a party"],
    11: ["a train"],
    12: ["a bowl of fruit on a wooden table with apples bananas and oranges in it"],
    13: ["a skateboarder doing a trick"],
    14: ["an airplane flying in the blue sky"],
    15: ["a toilet and a sink in a small white bathroom"],
    16: ["people on the beach"],
    17: ["horse"],
    18: ["a pepperoni pizza"],
    19: ["a stop sign on the corner of a street near a red building"],
    20: ["an elephant in grass"],
    21: ["the the the the the"],
}


def _reference_scores(gts, res):
    bleu_ref = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_ref = pytest.importorskip("pycocoevalcap.cider.cider")
    b, _ = bleu_ref.Bleu(4).compute_score(gts, res, verbose=0)
    c, _ = cider_ref.Cider().compute_score(gts, res)
    return b, c


def _random_corpus(seed: int, n_images: int):
    rng = random.Random(seed)
    vocab = "a the dog cat man woman red blue big small runs sits on in with near ball park street".split()

    def sentence(lo, hi):
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))

    gts = {f"img{i}": [sentence(3, 12) for _ in range(rng.randint(1, 5))] for i in range(n_images)}
    res = {}
    for key, refs in gts.items():
        roll = rng.random()
        if roll < 0.15:
            res[key] = [rng.choice(refs)]  # copy of a reference
        elif roll < 0.3:
            words = rng.choice(refs).split()
            res[key] = [" ".join(words[: rng.randint(0, len(words))])]  # truncated, maybe empty
        else:
            res[key] = [sentence(1, 16)]
    return gts, res


def _assert_matches(gts, res):
    ref_bleu, ref_cider = _reference_scores(gts, res)
    ours = bleu(gts, res)
    assert len(ours) == 4
    for k in range(4):  # BLEU-1..4 one by one, so a failure names the order
        assert ours[k] == pytest.approx(ref_bleu[k], **TOL), f"BLEU-{k + 1}"
    assert cider(gts, res) == pytest.approx(float(ref_cider), **TOL)


def test_hand_made_corpus_matches_pycocoevalcap():
    _assert_matches(HAND_GTS, HAND_RES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_corpus_matches_pycocoevalcap(seed):
    _assert_matches(*_random_corpus(seed, n_images=60))


def test_single_image_and_brevity_penalty_cases():
    # one image (CIDEr idf is log(1) = 0 -> score 0), and a corpus shorter than its references
    _assert_matches({"x": ["a dog on a couch", "a brown dog"]}, {"x": ["a dog"]})
    _assert_matches({1: ["a b c d e f"], 2: ["a b"]}, {1: ["a b c"], 2: ["a b c d e"]})


def test_bleu_other_orders_match_pycocoevalcap():
    bleu_ref = pytest.importorskip("pycocoevalcap.bleu.bleu")
    for n in (1, 2, 3):  # the reference only supports n <= 4 (it always pre-cooks 4-grams)
        expected, _ = bleu_ref.Bleu(n).compute_score(HAND_GTS, HAND_RES, verbose=0)
        assert bleu(HAND_GTS, HAND_RES, n=n) == pytest.approx(expected, **TOL)


def test_perfect_candidates():
    gts = {i: [f"caption number {i} about a thing", "something else entirely"] for i in range(5)}
    res = {i: [gts[i][0]] for i in range(5)}
    assert bleu(gts, res) == pytest.approx([1.0] * 4, rel=1e-6)
    assert cider(gts, res) > 0


def test_input_validation():
    gts = {1: ["a cat"], 2: ["a dog"]}
    with pytest.raises(ValueError, match="same ids"):
        bleu(gts, {1: ["a cat"]})
    with pytest.raises(ValueError, match="same ids"):
        cider(gts, {1: ["a cat"], 3: ["a dog"]})
    with pytest.raises(ValueError, match="one-element list"):
        bleu(gts, {1: ["a cat", "a dog"], 2: ["a dog"]})
    with pytest.raises(ValueError, match="one-element list"):
        cider(gts, {1: "a cat", 2: ["a dog"]})
    with pytest.raises(ValueError, match="non-empty list"):
        bleu({1: [], 2: ["a dog"]}, {1: ["a cat"], 2: ["a dog"]})
    with pytest.raises(ValueError, match="empty corpus"):
        cider({}, {})


@pytest.mark.parametrize("text, expected", [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Two dogs, a cat; and a bird!", "two dogs a cat and a bird"),
    ("I don't think it's a cat.", "i do n't think it 's a cat"),
    ("Can't stop, won't stop", "ca n't stop wo n't stop"),
    ("The dog's bone -- isn't it 'great'?", "the dog 's bone is n't it great"),
    ('A "quoted" word...', "a quoted word"),
    ("A cat (sleeping) on a bed", "a cat -lrb- sleeping -rrb- on a bed"),
    ("1,000 people at 4:30 in the U.S.", "1,000 people at 4:30 in the u.s."),
    ("A black-and-white photo", "a black-and-white photo"),
    ("Don\u2019t \u201cquote\u201d me\u2026", "do n't quote me"),
    ("We cannot go, we're gonna stay", "we can not go we 're gon na stay"),
    ("  Multiple   spaces\nand lines ", "multiple spaces and lines"),
])
def test_tokenize(text, expected):
    assert tokenize(text) == expected


def test_punctuation_table_matches_pycocoevalcap():
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")  # importing runs no Java
    assert PUNCTUATIONS == frozenset(ptb.PUNCTUATIONS)
    assert tokenize(" ".join(ptb.PUNCTUATIONS[:4] + ptb.PUNCTUATIONS[8:])) == ""
