"""VQA accuracy and answer normalization, checked against the official vqaEval.py behaviour."""

from __future__ import annotations

from fractions import Fraction

import pytest

from glimpse.metrics.vqa import (
    CONTRACTIONS,
    exact_match,
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
    vqa_accuracy_corpus,
)


def test_number_word_prediction_matches_digit_answers():
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0


def _leave_one_out(matches: int, total: int = 10) -> Fraction:
    """Exact official value: humans who gave the answer see matches-1 others, the rest see matches."""
    return (matches * min(1, Fraction(matches - 1, 3)) + (total - matches) * min(1, Fraction(matches, 3))) / total


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_average(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    # 3 matches: 3 annotators left out see 2 others (2/3), 7 see 3 (1) -> (3*2/3 + 7)/10 = 9/10
    assert _leave_one_out(matches) == Fraction(expected).limit_denominator(100)
    assert vqa_accuracy("2", answers) == expected  # the official float arithmetic lands exactly here


def test_leave_one_out_is_positional_even_for_duplicates():
    # the official code leaves out one answer dict (distinct answer_ids), never all equal strings:
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6, not the 0.8 * 2/3 that dropping both "cat"s would give
    assert vqa_accuracy("cat", ["cat", "cat"] + ["dog"] * 8) == pytest.approx(float(_leave_one_out(2)), abs=1e-12)


@pytest.mark.parametrize("raw, expected", [
    ("yes.", "yes"),
    ("Yes", "yes"),
    ("a dog", "dog"),
    ("The Dog", "dog"),
    ("an apple", "apple"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("ten", "10"),
    ("none", "0"),
    ("one two three", "1 2 3"),
    ("black/white", "black white"),
    ("t-shirt", "t shirt"),
    ("red, white", "red white"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("5.", "5"),
    ("what?!", "what"),
    ("  yes\n", "yes"),
    ("tab\there", "tab here"),
    ("center", "center"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_rules():
    # next to a space a mark is deleted, inside a word it becomes a space
    assert process_punctuation("yes , no") == "yes  no"
    assert process_punctuation("yes,no") == "yes no"
    # any digit,digit comma switches every mark to deletion
    assert process_punctuation("1,000 (approx)") == "1000 approx"
    # apostrophes are not in the official list
    assert process_punctuation("don't") == "don't"


def test_accuracy_with_normalization():
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("A dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("ten", ["10"] * 10) == 1.0
    assert vqa_accuracy("centre", ["center"] * 10) == 0.0
    assert vqa_accuracy("center", ["centre"] * 10) == 0.0
    assert vqa_accuracy("no", ["yes"] * 10) == 0.0


def test_official_quirks_for_human_answers():
    # human answers get processPunctuation only, never digit/article/contraction mapping...
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("dog", ["a dog"] * 5 + ["cat"] * 5) == 0.0
    # ...and only when they are not unanimous
    assert vqa_accuracy("yes", ["yes."] * 5 + ["no"] * 5) == 1.0
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0


def test_contractions_table_is_complete():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["dont"] == "don't" and CONTRACTIONS["yall'd've"] == "y'all'd've"


def test_corpus_accuracy():
    preds = ["Two", "yes", "cat"]
    answers = [["2"] * 10, ["yes"] * 3 + ["no"] * 7, ["dog"] * 10]
    assert vqa_accuracy_corpus(preds, answers) == pytest.approx((1.0 + 0.9 + 0.0) / 3, abs=1e-12)
    with pytest.raises(ValueError):
        vqa_accuracy_corpus(preds, answers[:2])
    with pytest.raises(ValueError):
        vqa_accuracy_corpus([], [])
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_exact_match():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("two", "2") == 1.0
    assert exact_match("the red one", "red 1") == 1.0
    assert exact_match("red", "blue") == 0.0
    assert exact_match("center", "centre") == 0.0
    assert isinstance(exact_match("a", "a"), float)
