"""Caption metrics: corpus BLEU-1..4 and CIDEr-D, ported from the COCO caption evaluation code.

Port of `pycocoevalcap` (github.com/tylin/coco-caption, pip `pycocoevalcap` 1.2):
`bleu/bleu_scorer.py` (David Chiang's scorer as run by `Bleu(4)`, option "closest") and
`cider/cider_scorer.py` (the CIDEr-D variant that `Cider()` computes).  Both reproduce the
reference arithmetic step by step (same operation order, NumPy where it used NumPy), so scores
are bit-identical on the tested corpora; the tests check them against pycocoevalcap itself.  `tokenize` is a Java-free approximation of the PTBTokenizer step.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

import numpy as np

# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens dropped after PTB tokenization.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# PTB escapes brackets; `-lowerCase` then lowercases the escapes, so they no longer match the
# upper-case entries of PUNCTUATIONS and survive in the official pipeline.  We keep that quirk.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_UNICODE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                          "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... "})
_PAD = re.compile(r"""\.\.\.+|-{2,}|[()\[\]{}"`?!;$%#]|(?<!\d)[,:]|[,:](?!\d)""")
_ABBREV = re.compile(r"^(?:[a-z]\.){2,}$|^(?:mr|mrs|ms|dr|st|jr|sr|vs|etc|mt|inc|ltd|co|corp)\.$")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")
_CLITICS = frozenset(["'s", "'m", "'d", "'ll", "'re", "'ve"])
_ASSIMILATION = re.compile(r"^(can)(not)$|^(gon|wan)(na)$|^(got)(ta)$|^(gim|lem)(me)$")


def _split_word(word: str) -> list[str]:
    """PTB rules for one whitespace-free chunk: quotes, final period, clitics, assimilations."""
    head: list[str] = []
    tail: list[str] = []
    while len(word) > 1 and word.startswith("'") and word not in _CLITICS:
        head.append("`")  # an opening single quote (PTB writes it as a backtick)
        word = word[1:]
    while len(word) > 1 and word[-1] in ".'" and not _ABBREV.match(word):
        tail.insert(0, word[-1])  # sentence-final period or closing quote ("dogs'" -> dogs ')
        word = word[:-1]
    m = _CLITIC.match(word) or _ASSIMILATION.match(word)
    if m:
        return head + [g for g in m.groups() if g] + tail
    if re.fullmatch(r"-{2,}", word):
        word = "--"
    return head + [word] + tail


def tokenize(text: str) -> str:
    """Approximate the COCO `PTBTokenizer` (Stanford CoreNLP 3.4.1, `-lowerCase`) without Java.

    Lowercases, splits off punctuation, splits clitics as PTB does ("don't" -> "do n't",
    "can't" -> "ca n't", "dog's" -> "dog 's", "cannot" -> "can not", "gonna" -> "gon na"),
    then drops the tokens in pycocoevalcap's PUNCTUATIONS.  Known differences from the Java
    lexer: its abbreviation list and sentence-final period logic are reduced to single-letter
    abbreviations ("u.s.") and a few titles ("mr.", "st."); the lexer's options for British
    spellings (americanize), "/" and "*" escaping, fractions, entities, "&"/"@"/URLs/emoticons
    are not reproduced;
    it keeps "$", "%", "#" as tokens, keeps hyphenated words and digit groups ("1,000", "4:30")
    whole, and emits brackets as "-lrb-", "-rrb-", ... exactly as the Java pipeline does (they
    are lowercased before the punctuation filter, which only lists "-LRB-" etc.).
    """
    text = text.replace("\n", " ").translate(_UNICODE).lower()
    text = _PAD.sub(lambda m: f" {m.group(0)} ", text)
    tokens: list[str] = []
    for chunk in text.split():
        if chunk in _BRACKETS:
            tokens.append(_BRACKETS[chunk])
        elif chunk == '"':
            tokens.append("''")  # PTB turns double quotes into `` / '' -- both dropped below
        else:
            tokens.extend(_split_word(chunk))
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def _check(gts: dict, res: dict) -> None:
    if gts.keys() != res.keys():
        missing, extra = sorted(map(str, gts.keys() - res.keys())), sorted(map(str, res.keys() - gts.keys()))
        raise ValueError(f"gts and res must have the same ids; only in gts: {missing[:5]}, "
                         f"only in res: {extra[:5]}")
    if not gts:
        raise ValueError("empty corpus: gts and res have no ids")
    for key in gts:
        hyp, refs = res[key], gts[key]
        if not isinstance(hyp, list) or len(hyp) != 1 or not isinstance(hyp[0], str):
            raise ValueError(f"res[{key!r}] must be a one-element list with the candidate string, got {hyp!r}")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"gts[{key!r}] must be a non-empty list of reference strings, got {refs!r}")


def _ngrams(sentence: str, n: int) -> Counter:
    """precook(): counts of all 1..n-grams of the whitespace-split sentence."""
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(gts: dict, res: dict, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as `pycocoevalcap.bleu.Bleu(n).compute_score(gts, res)[0]`.

    Clipped n-gram matches and guesses are summed over the corpus; the effective reference
    length of each sentence is the "closest" one (ties -> the shorter), and the brevity penalty
    uses the summed lengths.  The 1e-15 / 1e-9 constants are the reference's guards against
    zero divisions; they also make a zero-match order score ~0 rather than exactly 0.
    n > 4 extends the same definition (the reference itself fails there).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check(gts, res)
    small, tiny = 1e-9, 1e-15
    testlen_sum = reflen_sum = 0
    guess, correct = [0] * n, [0] * n
    for key in gts:
        ref_counts = [_ngrams(r, n) for r in gts[key]]
        maxcounts: dict = {}
        for counts in ref_counts:
            for gram, c in counts.items():
                maxcounts[gram] = max(maxcounts.get(gram, 0), c)
        hyp = res[key][0]
        testlen = len(hyp.split())
        reflens = [len(r.split()) for r in gts[key]]
        # "closest": min over (|diff|, length) pairs, so a tie picks the shorter reference
        reflen_sum += min((abs(ln - testlen), ln) for ln in reflens)[1]
        testlen_sum += testlen
        for k in range(n):
            guess[k] += max(0, testlen - k)
        for gram, c in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(maxcounts.get(gram, 0), c)

    # same accumulation order as BleuScorer.compute_score: a running product of precisions
    bleus, prod = [], 1.0
    for k in range(n):
        prod *= float(correct[k] + tiny) / (guess[k] + small)
        bleus.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen_sum + tiny) / (reflen_sum + small)
    if ratio < 1:
        bleus = [b * math.exp(1 - 1 / ratio) for b in bleus]
    return [float(b) for b in bleus]


def cider(gts: dict, res: dict) -> float:
    """CIDEr-D as `pycocoevalcap.cider.Cider().compute_score(gts, res)[0]` (n=4, sigma=6).

    Document frequencies (and the log corpus size in the idf) come from the references of the
    evaluated corpus only, so the score depends on which images are scored together.  Faithful
    to the reference, the Gaussian length penalty uses the number of *bigrams* of each sentence
    as its "length" (cider_scorer's `if n == 1` counts 2-grams), hypothesis tf-idf weights are
    clipped by the reference's (min(vec_hyp, vec_ref) * vec_ref), and per-image scores are the
    mean over n-gram orders, averaged over references and multiplied by 10.
    """
    _check(gts, res)
    n, sigma = 4, 6.0
    crefs = [[_ngrams(r, n) for r in gts[key]] for key in gts]
    ctest = [_ngrams(res[key][0], n) for key in gts]

    doc_freq: defaultdict = defaultdict(float)
    for refs in crefs:
        for gram in {g for ref in refs for g in ref}:
            doc_freq[gram] += 1
    ref_len = np.log(float(len(crefs)))

    def counts2vec(cnts: Counter):
        vec = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in cnts.items():
            # unseen n-grams get df 1 (idf log(N)); .get avoids growing doc_freq as the reference does
            df = np.log(max(1.0, doc_freq.get(gram, 0.0)))
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (ref_len - df)
            norm[k] += pow(vec[k][gram], 2)
            if k == 1:
                length += tf
        return vec, [np.sqrt(x) for x in norm], length

    def sim(vec_hyp, vec_ref, norm_hyp, norm_ref, length_hyp, length_ref):
        delta = float(length_hyp - length_ref)
        val = np.zeros(n)
        for k in range(n):
            for gram, w in vec_hyp[k].items():
                r = vec_ref[k].get(gram, 0.0)
                val[k] += min(w, r) * r
            if norm_hyp[k] != 0 and norm_ref[k] != 0:
                val[k] /= norm_hyp[k] * norm_ref[k]
            val[k] *= np.e ** (-(delta ** 2) / (2 * sigma ** 2))
        return val

    scores = []
    for test, refs in zip(ctest, crefs):
        vec, norm, length = counts2vec(test)
        score = np.zeros(n)
        for ref in refs:
            vec_ref, norm_ref, length_ref = counts2vec(ref)
            score += sim(vec, vec_ref, norm, norm_ref, length, length_ref)
        score_avg = np.mean(score)
        score_avg /= len(refs)
        score_avg *= 10.0
        scores.append(score_avg)
    return float(np.mean(np.array(scores)))
