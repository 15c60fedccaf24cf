"""Retrieval Recall@K (both directions) and zero-shot classification accuracy.

Protocol as in CLIP/COCO: text->image counts a hit when a caption's own image is in the
top K; image->text when any of the image's captions is.  Ties are counted against the
model (a score equal to the right one ranks above it), so a constant model scores 0.
"""

from __future__ import annotations

import torch


def ranks_of_targets(sim: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sim [Q, N]; target [Q] column index -> 0-based rank of each target."""
    true = sim.gather(1, target[:, None])  # [Q, 1]
    others = sim.clone()
    others.scatter_(1, target[:, None], float("-inf"))
    return (others >= true).sum(1)


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """image_embeds [N, E], text_embeds [M, E] (normalised); text_image [M] = index of each caption's image."""
    return recall_from_scores(text_embeds.float() @ image_embeds.float().T, text_image, ks)


def recall_from_scores(sim: torch.Tensor, text_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K both ways from any text-image score matrix sim [M, N] (similarities, or re-ranked scores)."""
    t2i = ranks_of_targets(sim, text_image)
    # image -> text: the best-ranked of the image's own captions
    sim_i = sim.T  # [N, M]
    own = torch.zeros_like(sim_i, dtype=torch.bool)
    own[text_image, torch.arange(len(text_image))] = True
    best_own = sim_i.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
    i2t = (sim_i.masked_fill(own, float("-inf")) >= best_own).sum(1)
    out = {}
    for k in ks:
        out[f"t2i_r{k}"] = (t2i < k).float().mean().item()
        out[f"i2t_r{k}"] = (i2t < k).float().mean().item()
    return out


def zeroshot_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """scores [N, L] of each image against each class; labels [N]."""
    return (scores.argmax(1) == labels).float().mean().item()


def expected_recall(sim: torch.Tensor, target: torch.Tensor, k: int = 1) -> float:
    """Recall@k with ties broken at random, in expectation: with g scores above the target's and e others
    equal to it, the target lands uniformly among places g..g+e, so it is in the top k with probability
    clamp(k - g, 0, e + 1) / (e + 1).  A model that cannot tell two items apart scores 1/2 on the pair,
    where `ranks_of_targets` (ties against the model) would give it 0."""
    true = sim.gather(1, target[:, None])
    others = sim.clone()
    others.scatter_(1, target[:, None], float("-inf"))
    greater = (others > true).sum(1).float()
    equal = (others == true).sum(1).float()
    return ((k - greater).clamp(min=0).minimum(equal + 1) / (equal + 1)).mean().item()
