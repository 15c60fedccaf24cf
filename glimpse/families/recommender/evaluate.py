"""Full-ranking evaluation of a recommender on a split (val or test), with its references and controls.

Every item is ranked for every user, the user's earlier purchases left out (glimpse/metrics/ranking.py).
Figures are given over all targets and over warm and cold targets apart (cold: never bought in
training), for the model and for:
    popularity  the training purchase counts (one ranking for everyone)
    shuffled    the two-tower model on each history in a random order (the order control: a SASRec user
                encoder should lose to its own unshuffled self, a mean-pooled one not at all)
    oracle      the shapes shop only: the generator's own probabilities of the next purchase under each
                user's hidden (drifted) taste: the Bayes ceiling
    blind_oracle  the same, not knowing cold items' popularity (which nothing a model sees reveals): the
                ceiling of a model that places cold items by their content
    chance      K over the number of items a user could be shown
"""

from __future__ import annotations

import numpy as np
import torch

from glimpse.data import shapes_shop
from glimpse.data.shop import Shop
from glimpse.families.recommender.data import left_pad
from glimpse.metrics.ranking import ndcg_at_k, recall_at_k, target_ranks

KS = (10, 20)


@torch.no_grad()
def model_scores(model, shop: Shop, users: list[int], split: str, shuffle_seed: int | None = None,
                 item_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """[len(users), N] scores of every item for each user before the split's targets (`item_embeds`: the
    two-tower model's item_embeddings(), computed once for many batches)."""
    device = model.warm.device
    if model.cfg.kind != "two_tower":
        return model.score_users(torch.as_tensor(users, device=device)).float().cpu()
    histories = [shop.history(u, split) for u in users]
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        histories = [list(rng.permutation(h)) for h in histories]
    return model.score_histories(left_pad(histories, model.cfg.max_history).to(device), item_embeds).float().cpu()


@torch.no_grad()
def calibrate_cold(model, shop: Shop, batch_size: int = 512) -> float | None:
    """Fit the two-tower model's cold offset (the bias added to items without an ID) by maximum likelihood
    of the validation purchases under a softmax over every item a user has not bought: one number, for
    the one thing training cannot learn (no cold item is bought in training).  None when validation has
    no cold purchase to fit it on."""
    model.eval()
    model.cold_offset.zero_()
    users = [u for u in range(len(shop.user_ids)) if shop.val[u]]
    if not any(not shop.warm[t] for u in users for t in shop.val[u]):
        return None
    no_id = (~model.warm).float().cpu()  # model_scores answers on the CPU
    grid = torch.arange(-2.0, 4.0001, 0.1)
    nll = torch.zeros(len(grid))
    items = model.item_embeddings()
    for i in range(0, len(users), batch_size):
        b = users[i : i + batch_size]
        scores = model_scores(model, shop, b, "val", item_embeds=items)
        for r, u in enumerate(b):
            scores[r, [h for h in shop.history(u, "val") if h not in shop.val[u]]] = float("-inf")  # bought before
        rows = torch.as_tensor([r for r, u in enumerate(b) for _ in shop.val[u]])
        cols = torch.as_tensor([t for u in b for t in shop.val[u]])
        for g, delta in enumerate(grid):
            s = scores + delta * no_id
            nll[g] += -(s[rows, cols] - s[rows].logsumexp(1)).sum()
    best = float(grid[int(nll.argmin())])
    model.cold_offset.fill_(best)
    return best


def oracle_scores(truth: dict, users: list[int], warm: np.ndarray | None = None) -> torch.Tensor:
    """The generator's log-probability of each item as a user's next purchase.  With `warm`, the oracle
    that does not know cold items' popularity: it gives each the expected popularity term of an item it
    has not seen sold, log E[popularity^bias] over the warm items, what a perfect content model could do."""
    ci, si, zi, log_pop = shapes_shop.item_arrays(truth["items"])
    rows = []
    for u in users:
        user = truth["users"][u]  # the shop's users are the generator's, in order (u00000, u00001, ...)
        lp = log_pop
        if warm is not None:
            g = user["bias"]
            lp = np.where(warm, log_pop, np.log(np.mean(np.exp(g * log_pop[warm]))) / g)
        rows.append(shapes_shop.log_weights(user, (ci, si, zi, lp)))
    return torch.as_tensor(np.stack(rows))


def ranking_figures(prefix: str, ranks: list[list[int]], targets: list[list[int]], warm: np.ndarray) -> dict:
    """Recall@K and NDCG@K over all targets, warm targets and cold targets (users without any: left out)."""
    out = {}
    for part, keep in (("", lambda t: True), ("_warm", lambda t: warm[t]), ("_cold", lambda t: not warm[t])):
        rows = [[r for r, t in zip(rs, ts) if keep(t)] for rs, ts in zip(ranks, targets)]
        sizes = [sum(1 for t in ts if keep(t)) for ts in targets]
        pairs = [(r, n) for r, n in zip(rows, sizes) if n]
        for k in KS:
            out[f"{prefix}recall@{k}{part}"] = float(np.mean([recall_at_k(r, n, k) for r, n in pairs])) if pairs else 0.0
            out[f"{prefix}ndcg@{k}{part}"] = float(np.mean([ndcg_at_k(r, n, k) for r, n in pairs])) if pairs else 0.0
    return out


def evaluate(model, shop: Shop, splits: list[str], root=None, log_pop: torch.Tensor | None = None,
             batch_size: int = 512, seed: int = 0) -> dict[str, float]:
    model.eval()
    truth = shapes_shop.read_truth(root) if root is not None and (root / "truth.json").is_file() else None
    warm = shop.warm
    out: dict[str, float] = {}
    with torch.no_grad():  # once, for every batch
        items = model.item_embeddings() if model.cfg.kind == "two_tower" else None
    for split in splits:
        users = [u for u in range(len(shop.user_ids)) if shop.targets(u, split)]
        targets = [shop.targets(u, split) for u in users]
        exclude = [shop.history(u, split) for u in users]
        scorers = {"": lambda b, split=split: model_scores(model, shop, b, split, item_embeds=items)}
        if model.cfg.kind == "two_tower":
            scorers["shuffled_"] = lambda b, split=split: model_scores(model, shop, b, split, seed + b[0], items)
        if log_pop is not None:
            scorers["popularity_"] = lambda b: log_pop.expand(len(b), -1)
        if truth is not None:
            scorers["oracle_"] = lambda b: oracle_scores(truth, b)
            scorers["blind_oracle_"] = lambda b: oracle_scores(truth, b, warm)
        for prefix, score in scorers.items():
            ranks = []
            for i in range(0, len(users), batch_size):
                b = users[i : i + batch_size]
                ranks += target_ranks(score(b), exclude[i : i + batch_size], targets[i : i + batch_size])
            out |= {f"{split}/{k}": v for k, v in ranking_figures(prefix, ranks, targets, warm).items()}
        n_items = len(shop.item_ids)
        out[f"{split}/chance_recall@20"] = float(np.mean([min(1.0, 20 / (n_items - len(set(e)))) for e in exclude]))
        out[f"{split}/n"] = len(users)
        out[f"{split}/n_warm"] = int(sum(warm[t] for ts in targets for t in ts))
        out[f"{split}/n_cold"] = int(sum(not warm[t] for ts in targets for t in ts))
    return out
