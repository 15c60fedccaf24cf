"""Metrics and evaluation tasks.  The caption and VQA metrics match pycocoevalcap and the
official VQAv2 scorer (checked against them in the tests), with no Java."""

from glimpse.eval.captions import bleu, cider, tokenize
from glimpse.eval.vqa import exact_match, normalize_answer, vqa_accuracy

__all__ = ["bleu", "cider", "tokenize", "exact_match", "normalize_answer", "vqa_accuracy"]
