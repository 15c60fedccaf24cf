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


PIXEL_CACHE_BYTES = 2 << 30  # decoded item pictures kept in memory up to this; beyond it, decoded per batch


class ItemInputs:
    """Every item's tower input: pixels (decoded once and kept while they fit PIXEL_CACHE_BYTES, else decoded
    per batch) with has_picture False and zeros for an item whose picture is missing or unreadable (counted
    by reason in `bad`), and tokenized titles."""

    def __init__(self, shop: Shop, tokenizer, transform: ImageTransform, max_pixels: int, context_length: int):
        self.images, self.transform, self.max_pixels = shop.images, transform, max_pixels
        n, size = len(shop.item_ids), transform.image_size
        self.has_picture = torch.zeros(n, dtype=torch.bool)
        keep = n * 3 * size * size * 4 <= PIXEL_CACHE_BYTES
        self.pixels = torch.zeros(n, 3, size, size) if keep else None
        self.bad: Counter = Counter()
        for i in range(n):
            picture = self._decode(i)
            if picture is not None and keep:
                self.pixels[i] = picture
        self.input_ids, self.attention_mask = tokenizer.batch(shop.titles, context_length)

    def _decode(self, i: int, count: bool = True) -> torch.Tensor | None:
        if self.images[i] is None:
            reason = "no picture"
        else:
            try:
                picture = self.transform(load_image(self.images[i], max_pixels=self.max_pixels))
                self.has_picture[i] = True
                return picture
            except ImageError as e:
                reason = e.reason
        if count:
            self.bad[reason] += 1
        return None

    def batch(self, items: torch.Tensor) -> dict:
        if self.pixels is not None:
            pixels = self.pixels[items]
        else:
            size = self.transform.image_size
            pixels = torch.stack([p if (p := self._decode(int(i), count=False)) is not None
                                  else torch.zeros(3, size, size) for i in items])
        return {"item_index": items, "item_pixels": pixels, "item_has_picture": self.has_picture[items],
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

    def __init__(self, max_history: int, items: ItemInputs | None = None, target_share: float = 1.0):
        self.max_history, self.items, self.target_share = max_history, items, target_share

    def __call__(self, samples: list[dict]) -> dict:
        seq = left_pad([s["items"] for s in samples], self.max_history + 1)
        inputs, targets = seq[:, :-1], seq[:, 1:].masked_fill(seq[:, :-1] < 0, -1)  # nothing to predict from nothing
        if self.target_share < 1.0:  # only each history's newest targets carry loss
            n = (targets >= 0).sum(1, keepdim=True)
            keep = (n * self.target_share).ceil().clamp(min=1)
            slot = torch.arange(targets.shape[1] - 1, -1, -1)  # slots counted from the newest
            targets = targets.masked_fill(slot[None] >= keep, -1)
        batch = {"status": [None] * len(samples), "messages": [], "inputs": inputs, "targets": targets}
        if self.items is not None:
            batch |= self.items.batch(torch.unique(seq[seq >= 0]))
        return batch


class InteractionDataset(Dataset):
    def __init__(self, shop: Shop, negatives: int):
        self.pairs = np.array([(u, i) for u, h in enumerate(shop.train) for i in h], dtype=np.int64).reshape(-1, 2)
        self.bought = [set(h) for h in shop.train]
        self.warm_items = np.flatnonzero(shop.warm)
        self.negatives = negatives

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        u, i = self.pairs[key[0]]
        # the sampler's choice is uniform over [0, 2**31): its residues pick the negatives (an RNG made per
        # sample would cost more than the model's step)
        n, negatives, step = len(self.warm_items), [], key[1]
        for _ in range(64 * self.negatives):  # items the user bought are not negatives (as MMRec samples)
            j = int(self.warm_items[step % n])
            step += 0x9E3779B1
            if j not in self.bought[u]:
                negatives.append(j)
                if len(negatives) == self.negatives:
                    break
        negatives += [int(self.warm_items[key[1] % n])] * (self.negatives - len(negatives))  # a user who bought nearly all
        return {"user": int(u), "item": int(i), "negatives": np.array(negatives)}


def interaction_collate(samples: list[dict]) -> dict:
    return {"status": [None] * len(samples), "messages": [],
            "users": torch.tensor([s["user"] for s in samples]), "positives": torch.tensor([s["item"] for s in samples]),
            "negatives": torch.as_tensor(np.stack([s["negatives"] for s in samples]))}
