"""Full-ranking metrics of recommendation: every item is ranked, the user's known purchases left out.

Definitions as RecBole's (recbole/evaluator/metrics.py) with one ranked list per user:
    Recall@K = |relevant in the top K| / |relevant|
    NDCG@K   = sum over relevant items in the top K of 1/log2(rank + 2), divided by the same sum for the
               ideal list (the min(|relevant|, K) relevant items first); rank counts from 0.
Ties are broken at their middle: an item tied with m others is placed after half of them, the rank that
random tie-breaking gives on average (an untrained model that scores every item 0 is at chance, not first).
"""

from __future__ import annotations

import math

import torch


def target_ranks(scores: torch.Tensor, exclude: list[list[int]], targets: list[list[int]]) -> list[list[int]]:
    """scores [U, N]; per user, the 0-based rank of each target among the items not excluded."""
    scores = scores.float().clone()
    out = []
    for u, (ex, ts) in enumerate(zip(exclude, targets)):
        row = scores[u]
        ex = sorted(set(ex) - set(ts))  # a repeat purchase stays rankable
        if ex:
            row[torch.as_tensor(ex, dtype=torch.long)] = -math.inf
        ranks = []
        for t in ts:
            s = row[t]
            greater = int((row > s).sum())
            ties = int((row == s).sum()) - 1
            ranks.append(greater + ties // 2)
        out.append(ranks)
    return out


def recall_at_k(ranks: list[int], n_relevant: int, k: int) -> float:
    return sum(r < k for r in ranks) / n_relevant if n_relevant else 0.0


def ndcg_at_k(ranks: list[int], n_relevant: int, k: int) -> float:
    dcg = sum(1.0 / math.log2(r + 2) for r in ranks if r < k)
    ideal = sum(1.0 / math.log2(j + 2) for j in range(min(n_relevant, k)))
    return dcg / ideal if ideal else 0.0
