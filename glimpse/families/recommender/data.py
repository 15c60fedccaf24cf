"""The recommender's data: the shop a recipe names, its items' content features, and the training sets.

HistoryDataset (two_tower): one sample per user, the training history's newest max_history + 1 purchases,
each predicting the next.  InteractionDataset (bpr, vbpr): one sample per training purchase, with
negatives drawn uniformly from the warm items (the sampler's per-sample choice seeds them, so a resumed
run draws the same ones).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from glimpse.data.images import ImageError, ImageTransform, load_image
from glimpse.data.shop import Shop, load_shop
from glimpse.data.world import ensure_shapes_shop


def shop_root(data_cfg, root: Path | None = None) -> Path:
    """Where the recipe's shop lives: the generated world (made now if missing), else data.root."""
    if data_cfg.source == "shapes-shop":
        return ensure_shapes_shop(data_cfg, progress=False) if root is None or not (root / "world.json").is_file() \
            else root
    return Path(data_cfg.root or ".") if root is None else root


def read_shop(data_cfg, root: Path | None = None) -> Shop:
    return load_shop(data_cfg, shop_root(data_cfg, root))


@torch.no_grad()
def content_features(encoder, shop: Shop, tokenizer, transform: ImageTransform, max_pixels: int,
                     device: torch.device, batch_size: int = 256) -> tuple[torch.Tensor, Counter]:
    """[N, 2E]: each item's picture and title embedding by the frozen dual encoder, each L2-normalised.
    A missing or unreadable picture leaves zeros there, counted by reason."""
    encoder.eval()
    E = encoder.cfg.embed_dim
    feats = torch.zeros(len(shop.item_ids), 2 * E)
    bad: Counter = Counter()
    for start in range(0, len(shop.item_ids), batch_size):
        rows, pixels = [], []
        for i in range(start, min(start + batch_size, len(shop.item_ids))):
            if shop.images[i] is None:
                bad["no picture"] += 1
                continue
            try:
                pixels.append(transform(load_image(shop.images[i], max_pixels=max_pixels)))
                rows.append(i)
            except ImageError as e:
                bad[e.reason] += 1
        if rows:
            emb = encoder.get_image_features(torch.stack(pixels).to(device)).float()
            feats[rows, :E] = F.normalize(emb, dim=-1).cpu()
        titles = shop.titles[start : start + batch_size]
        ids, mask = tokenizer.batch(titles, encoder.cfg.text.context_length)
        emb = encoder.get_text_features(ids.to(device), mask.to(device)).float()
        feats[start : start + len(titles), E:] = F.normalize(emb, dim=-1).cpu()
    return feats, bad


def log_popularity(shop: Shop) -> torch.Tensor:
    """log of each item's share of the training purchases (cold items: the log of half a purchase)."""
    counts = np.full(len(shop.item_ids), 0.5)
    for h in shop.train:
        np.add.at(counts, h, 1.0)
    counts[shop.warm] -= 0.5
    return torch.as_tensor(np.log(counts / counts.sum()), dtype=torch.float32)


def left_pad(histories: list[list[int]], length: int) -> torch.Tensor:
    """[B, length] item indices, the newest in the last slot, -1 before the oldest."""
    out = torch.full((len(histories), length), -1, dtype=torch.long)
    for b, h in enumerate(histories):
        h = h[-length:]
        if h:
            out[b, length - len(h):] = torch.as_tensor(h)
    return out


class HistoryDataset(Dataset):
    def __init__(self, shop: Shop, max_history: int):
        self.histories = [h for h in shop.train if len(h) >= 2]
        self.max_history = max_history

    def __len__(self) -> int:
        return len(self.histories)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return {"items": self.histories[key[0]][-(self.max_history + 1):]}


class HistoryCollate:
    def __init__(self, max_history: int):
        self.max_history = max_history

    def __call__(self, samples: list[dict]) -> dict:
        seq = left_pad([s["items"] for s in samples], self.max_history + 1)
        return {"status": [None] * len(samples), "messages": [], "inputs": seq[:, :-1], "targets": seq[:, 1:]}


class InteractionDataset(Dataset):
    def __init__(self, shop: Shop, negatives: int):
        self.pairs = np.array([(u, i) for u, h in enumerate(shop.train) for i in h], dtype=np.int64).reshape(-1, 2)
        self.warm_items = np.flatnonzero(shop.warm)
        self.negatives = negatives

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        u, i = self.pairs[key[0]]
        # the sampler's choice is uniform over [0, 2**31): its residues pick the negatives (an RNG made per
        # sample would cost more than the model's step)
        steps = key[1] + 0x9E3779B1 * np.arange(self.negatives, dtype=np.int64)
        return {"user": int(u), "item": int(i), "negatives": self.warm_items[steps % len(self.warm_items)]}


def interaction_collate(samples: list[dict]) -> dict:
    return {"status": [None] * len(samples), "messages": [],
            "users": torch.tensor([s["user"] for s in samples]), "positives": torch.tensor([s["item"] for s in samples]),
            "negatives": torch.as_tensor(np.stack([s["negatives"] for s in samples]))}
