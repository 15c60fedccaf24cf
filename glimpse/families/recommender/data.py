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


class ItemInputs:
    """Every item's tower input, decoded once: pixels [N, 3, S, S] (zeros and has_picture False for an item
    whose picture is missing or unreadable, counted by reason in `bad`) and tokenized titles."""

    def __init__(self, shop: Shop, tokenizer, transform: ImageTransform, max_pixels: int, context_length: int):
        n, size = len(shop.item_ids), transform.image_size
        self.pixels = torch.zeros(n, 3, size, size)
        self.has_picture = torch.zeros(n, dtype=torch.bool)
        self.bad: Counter = Counter()
        for i, src in enumerate(shop.images):
            if src is None:
                self.bad["no picture"] += 1
                continue
            try:
                self.pixels[i] = transform(load_image(src, max_pixels=max_pixels))
                self.has_picture[i] = True
            except ImageError as e:
                self.bad[e.reason] += 1
        self.input_ids, self.attention_mask = tokenizer.batch(shop.titles, context_length)

    def batch(self, items: torch.Tensor) -> dict:
        return {"item_index": items, "item_pixels": self.pixels[items], "item_has_picture": self.has_picture[items],
                "item_input_ids": self.input_ids[items], "item_attention_mask": self.attention_mask[items]}


@torch.no_grad()
def content_features(model, inputs: ItemInputs, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """[N, 2E]: every item's content features through the model's item tower, in eval mode."""
    was_training = model.item_encoder.training
    model.item_encoder.eval()
    out = []
    for start in range(0, len(inputs.pixels), batch_size):
        b = inputs.batch(torch.arange(start, min(start + batch_size, len(inputs.pixels))))
        out.append(model.encode_items(b["item_pixels"].to(device), b["item_has_picture"].to(device),
                                      b["item_input_ids"].to(device), b["item_attention_mask"].to(device)).cpu())
    model.item_encoder.train(was_training)
    return torch.cat(out)


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
    """Left-padded histories; with `items` (the item tower trained too), the tower inputs of every item the
    batch holds, for the loss to encode afresh."""

    def __init__(self, max_history: int, items: ItemInputs | None = None):
        self.max_history, self.items = max_history, items

    def __call__(self, samples: list[dict]) -> dict:
        seq = left_pad([s["items"] for s in samples], self.max_history + 1)
        batch = {"status": [None] * len(samples), "messages": [], "inputs": seq[:, :-1], "targets": seq[:, 1:]}
        if self.items is not None:
            batch |= self.items.batch(torch.unique(seq[seq >= 0]))
        return batch


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
