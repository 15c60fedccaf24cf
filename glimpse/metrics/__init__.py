"""The measures: retrieval R@K and zero-shot accuracy (retrieval.py), BLEU and CIDEr-D (captions.py), VQAv2
accuracy (vqa.py).  The caption and VQA metrics match pycocoevalcap and the official VQAv2 scorer
(checked against them in the tests), with no Java.  Which figures a family reports is the family's
evaluation (glimpse/families/*/evaluate.py)."""

from glimpse.metrics.captions import bleu, cider, tokenize
from glimpse.metrics.vqa import exact_match, normalize_answer, vqa_accuracy

__all__ = ["bleu", "cider", "tokenize", "exact_match", "normalize_answer", "vqa_accuracy"]
