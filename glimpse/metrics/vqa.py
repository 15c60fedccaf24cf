"""VQA accuracy, ported from the official VQAv2 evaluation (GT-Vision-Lab/VQA on GitHub).

Source: `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (class VQAEval): the contractions,
manualMap, articles and punctuation tables, `processPunctuation`, `processDigitArticle` and the
per-question accuracy in `evaluate`, reproduced including their quirks (documented below).

What `evaluate` does per question, and so what `vqa_accuracy` does:
  * the prediction gets "\\n"/"\\t" -> " ", strip, processPunctuation, processDigitArticle
    (that is `normalize_answer`), always;
  * the human answers get processPunctuation only -- no digit/article/contraction step -- and
    only when they are not all identical (the dataset's answers are pre-normalized, so the
    official code only cleans punctuation, and skips even that for unanimous answers);
  * each of the (10) human answers is left out in turn and the prediction scores
    min(1, #matches among the others / 3); the question's accuracy is the mean.  Answers are
    left out by position: the official code compares answer dicts that carry distinct
    answer_ids, so exactly one answer is removed even when several have the same text.
Some ports (e.g. the Cloud-CV challenge/LAVIS variants) instead normalize the gt answers fully
and the prediction only for non-unanimous questions; this module follows GT-Vision-Lab/VQA.
"""

from __future__ import annotations

import re

# vqaEval.py's table, verbatim.  Keys with capitals ("Im", "Ive", "Id've") can never match,
# since processDigitArticle lowercases first -- kept for fidelity.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
         ">", "<", "@", "`", ",", "?", "!"]

# Verbatim.  "(?!<=\d)" was meant as a lookbehind but is a negative *lookahead* for "<=<digit>",
# so in effect a period is removed whenever it is not followed by a digit ("5." -> "5").
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): the flag lands in the `count`
# argument, so at most re.UNICODE == 32 periods are removed.  Reproduced.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark next to a space (or any text with a digit,digit comma)
    is deleted, otherwise replaced by a space ("black/white" -> "black white"); the conditions
    are tested on the input text while replacements accumulate, as in the original."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lowercase, number words -> digits, drop a/an/the, then
    restore apostrophes of known contractions ("dont" -> "don't")."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The official processing of a predicted answer (whitespace, punctuation, digits/articles)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers (normally 10)."""
    if isinstance(answers, str) or not answers:
        raise ValueError("answers must be a non-empty list of human answer strings")
    pred = normalize_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:  # official: gt punctuation is cleaned only for non-unanimous answers
        gts = [process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        accs.append(min(1, float(matches) / 3))
    return float(sum(accs)) / len(accs)


def vqa_accuracy_corpus(predictions: list[str], answers: list[list[str]]) -> float:
    """Mean per-question accuracy in [0, 1] (the official 'overall' is this x100, rounded to 2 dp)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    accs = [vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    return float(sum(accs)) / len(accs)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when both strings are equal after `normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def vqa_summary(predictions: list[str], items: list[dict]) -> dict[str, float]:
    """vqa_acc, vqa_exact and vqa_acc_{yes_no,number,other} of predictions for VQA items
    (dicts with "answers" (the 10 human answers), "answer" and "answer_type")."""
    accs = [vqa_accuracy(p, it["answers"]) for p, it in zip(predictions, items)]
    out = {"vqa_acc": sum(accs) / len(accs),
           "vqa_exact": sum(exact_match(p, it["answer"]) for p, it in zip(predictions, items)) / len(items)}
    for kind in ("yes/no", "number", "other"):
        of_kind = [a for a, it in zip(accs, items) if it["answer_type"] == kind]
        if of_kind:
            out[f"vqa_acc_{kind.replace('/', '_')}"] = sum(of_kind) / len(of_kind)
    return out
