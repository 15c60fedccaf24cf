"""Full-ranking metrics of recommendation: every item is ranked, the user's known purchases left out.

Definitions as RecBole's (recbole/evaluator/metrics.py) with one ranked list per user:
    Recall@K = |relevant in the top K| / |relevant|
    NDCG@K   = sum over relevant items in the top K of 1/log2(rank + 2), divided by the same sum for the
               ideal list (the min(|relevant|, K) relevant items first); rank counts from 0.
Ties are broken at random, in expectation: a target tied with m other items takes each of the m + 1
places it could have with equal probability, and a metric averages over them (an untrained model that
scores every item alike is at chance, not first or last).  A NaN score ranks below every other.
"""

from __future__ import annotations

import math

import torch

Rank = tuple[int, int]  # (the first place a target could take, how many other items tie with it)


def target_ranks(scores: torch.Tensor, exclude: list[list[int]], targets: list[list[int]]) -> list[list[Rank]]:
    """scores [U, N]; per user, each target's (first possible 0-based rank, ties) among the items not
    excluded.  A target that is also in `exclude` (a repeat purchase) stays rankable."""
    scores = torch.nan_to_num(scores.float(), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    out = []
    for u, (ex, ts) in enumerate(zip(exclude, targets)):
        row = scores[u]
        keep = torch.ones_like(row, dtype=torch.bool)
        ex = sorted(set(ex) - set(ts))
        if ex:
            keep[torch.as_tensor(ex, dtype=torch.long)] = False
        ranks = []
        for t in ts:
            s = row[t]
            ranks.append((int(((row > s) & keep).sum()), int(((row == s) & keep).sum()) - 1))
        out.append(ranks)
    return out


def _places(rank: Rank | int) -> range:
    first, ties = (rank, 0) if isinstance(rank, int) else rank
    return range(first, first + ties + 1)


def recall_at_k(ranks: list[Rank | int], n_relevant: int, k: int) -> float:
    hits = sum(sum(r < k for r in _places(rank)) / len(_places(rank)) for rank in ranks)
    return hits / n_relevant if n_relevant else 0.0


def ndcg_at_k(ranks: list[Rank | int], n_relevant: int, k: int) -> float:
    dcg = sum(sum(1.0 / math.log2(r + 2) for r in _places(rank) if r < k) / len(_places(rank)) for rank in ranks)
    ideal = sum(1.0 / math.log2(j + 2) for j in range(min(n_relevant, k)))
    return dcg / ideal if ideal else 0.0
