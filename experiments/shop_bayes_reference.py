"""What a model could reach on the shapes shop from what it sees: a Bayes estimate of each user's drifted
taste from their own history, knowing how the world is made (the drift at the middle of a history, the
Dirichlet prior over colours, shapes and sizes) but not the user's hidden taste or bias.

For each test user: the purchases after the drift point give posterior counts; an item scores
E[log colour taste] + E[log shape taste] + E[log size taste] + 0.75 * log(training purchases) (cold
items: the log of the mean warm count; 0.75 is the mean of the users' popularity bias).  It sits
between the models (which must learn all of this) and the oracle (which knows the hidden tastes).

    python experiments/shop_bayes_reference.py WORLD_FOLDER
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.special import digamma

from glimpse.data import shapes_shop
from glimpse.data.shop import read_recbole

ALPHA, MEAN_BIAS, K = 0.4, 0.75, 20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("world")
    root = Path(p.parse_args().world)
    truth = json.loads((root / "truth.json").read_text())
    shop = read_recbole(root / "shop.inter", root / "shop.item")
    ci, si, zi, _ = shapes_shop.item_arrays(truth["items"])
    counts = np.bincount([i for h in shop.train for i in h], minlength=len(ci)).astype(float)
    pop = MEAN_BIAS * np.where(shop.warm, np.log(np.maximum(counts, 1.0)), np.log(counts[shop.warm].mean()))
    hits: dict[bool, list] = {True: [], False: []}
    for u in range(len(shop.user_ids)):
        history, target = shop.history(u, "test"), shop.test[u][0]
        after_drift = history[(len(history) + 1) // 2:]
        scores = pop.copy()
        for attr, n in ((ci, 6), (si, 4), (zi, 2)):
            scores += digamma(ALPHA + np.bincount(attr[after_drift], minlength=n))[attr]
        scores[history] = -np.inf
        hits[bool(shop.warm[target])].append((scores > scores[target]).sum() < K)
    print(f"Bayes from the history: Recall@{K} warm {np.mean(hits[True]):.4f} ({len(hits[True])} users), "
          f"cold {np.mean(hits[False]):.4f} ({len(hits[False])} users)")


if __name__ == "__main__":
    main()
