"""What glimpse.load returns for a recommender run: recommendations for known users and for new histories.

A history is a list of items, each an item id of the catalogue, or a new item given by its picture (a
path, bytes, a PIL image or a data URL) and optionally a title: {"image": ..., "title": ...}.  New items
have no ID embedding; the item tower places them from content alone, as it does cold items.  Top-k is
exact (torch.topk over every item) or, with search="faiss", a FAISS inner-product index over the item
embeddings (faiss-cpu, an optional extra; the exact ranking is its reference).
"""

from __future__ import annotations

import torch

from glimpse.data.images import load_image
from glimpse.errors import GlimpseError
from glimpse.families.recommender.data import left_pad

SEARCHES = ("exact", "faiss")


class RecommenderPipeline:
    def __init__(self, model, read_catalogue, read_shop, tokenizer, transform, max_pixels: int):
        self.model, self.tokenizer, self.transform, self.max_pixels = model, tokenizer, transform, max_pixels
        self._read_catalogue, self._read_shop = read_catalogue, read_shop
        self._catalogue, self._shop, self._items, self._index = None, None, None, None

    @property
    def device(self) -> torch.device:
        return self.model.warm.device

    @property
    def catalogue(self):
        """The items (ids, titles, pictures): from the run folder, read on first use."""
        if self._catalogue is None:
            self._catalogue = self._checked(self._read_catalogue())
        return self._catalogue

    @property
    def shop(self):
        """The items and the users' purchases (read from the run's data on first use: known users need it)."""
        if self._shop is None:
            self._shop = self._checked(self._read_shop())
        return self._shop

    def _checked(self, items):
        if len(items.item_ids) != self.model.cfg.num_items:
            raise GlimpseError(f"the data has {len(items.item_ids)} items; this run was trained on "
                               f"{self.model.cfg.num_items}")
        return items

    @torch.no_grad()
    def item_embeddings(self) -> torch.Tensor:
        """[N, dim] every catalogue item's embedding (two-tower runs)."""
        self._two_tower("item embeddings")
        if self._items is None:
            self.model.eval()
            self._items = self.model.item_embeddings().float()
        return self._items

    @torch.no_grad()
    def embed_new_items(self, items: list[dict]) -> torch.Tensor:
        """Content-only embeddings [M, dim] of items given by picture (and title): no ID embedding."""
        self._two_tower("new items")
        enc = self.model.item_encoder
        if enc is None:
            raise GlimpseError("this run reads no content (model.content: none): it knows items by id only")
        size = self.transform.image_size
        pixels = torch.stack([self.transform(load_image(it["image"], max_pixels=self.max_pixels))
                              if it.get("image") is not None else torch.zeros(3, size, size) for it in items])
        has_picture = torch.tensor([it.get("image") is not None for it in items])
        ids, mask = self.tokenizer.batch([it.get("title") or "" for it in items], enc.cfg.text.context_length)
        feats = self.model.encode_items(pixels.to(self.device), has_picture.to(self.device), ids.to(self.device),
                                        mask.to(self.device))
        titled = torch.tensor([bool(it.get("title")) for it in items], device=self.device)
        feats[:, enc.cfg.embed_dim:] *= titled[:, None]  # no title: the picture alone
        return self.model.embed_content(feats).float()

    def recommend(self, histories: list[list], k: int = 10, exclude_history: bool = True,
                  search: str = "exact") -> list[list[dict]]:
        """The top k items after each history (two-tower runs); items bought already are left out."""
        self._two_tower("recommendations from a history (bpr and vbpr know users by id: recommend_users)")
        table = self.item_embeddings()
        N = table.shape[0]
        new = [it for h in histories for it in h if isinstance(it, dict)]
        if new:
            table = torch.cat([table, self.embed_new_items(new)])
        rows, j = [], N
        for h in histories:
            row = []
            for it in h:
                if isinstance(it, dict):
                    row.append(j)
                    j += 1
                else:
                    row.append(self._item(it))
            rows.append(row)
        with torch.no_grad():
            states = self.model.user_states(left_pad(rows, self.model.cfg.max_history).to(self.device), table)[:, -1]
        exclude = [[i for i in r if i < N] if exclude_history else [] for r in rows]
        return self._top(states.float(), exclude, k, search)

    def recommend_users(self, users: list, k: int = 10, search: str = "exact") -> list[list[dict]]:
        """The top k items for known users, after everything they bought (training, validation and test)."""
        shop = self.shop
        idx = [shop.user_index(u) for u in users]
        bought = [shop.train[u] + shop.val[u] + shop.test[u] for u in idx]
        if self.model.cfg.kind == "two_tower":
            return self.recommend(bought, k, search=search)
        with torch.no_grad():
            scores = self.model.score_users(torch.as_tensor(idx, device=self.device)).float()
        return self._top_scores(scores, bought, k)

    def _two_tower(self, what: str) -> None:
        if self.model.cfg.kind != "two_tower":
            raise GlimpseError(f"{what}: a {self.model.cfg.kind} run has no item or user tower")

    def _item(self, item) -> int:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < self.model.cfg.num_items:
                raise GlimpseError(f"item index {item} is out of range (0 to {self.model.cfg.num_items - 1})")
            return item
        if isinstance(item, str):
            return self.catalogue.item_index(item)
        raise GlimpseError(f"a history item is an item id or {{'image': ..., 'title': ...}}, not {type(item).__name__}")

    def _top(self, states: torch.Tensor, exclude: list[list[int]], k: int, search: str) -> list[list[dict]]:
        if search not in SEARCHES:
            raise GlimpseError(f"search {search!r} must be one of {', '.join(SEARCHES)}")
        if search == "exact":
            return self._top_scores(states @ self.item_embeddings().T, exclude, k)
        import numpy as np
        scores, ids = self.faiss_index().search(np.ascontiguousarray(states.cpu().numpy(), dtype=np.float32),
                                                min(k + max(map(len, exclude), default=0), self.model.cfg.num_items))
        out = []
        for srow, irow, ex in zip(scores, ids, exclude):
            ex = set(ex)
            out.append([self._entry(int(i), float(s)) for s, i in zip(srow, irow) if i >= 0 and i not in ex][:k])
        return out

    def faiss_index(self):
        """A FAISS IndexFlatIP over the item embeddings (built once; faiss imported after torch, as it must be)."""
        if self._index is None:
            try:
                import faiss
            except ImportError:
                raise GlimpseError("search='faiss' needs faiss-cpu (pip install faiss-cpu)") from None
            table = self.item_embeddings().cpu().numpy().astype("float32")
            self._index = faiss.IndexFlatIP(table.shape[1])
            self._index.add(table)
        return self._index

    def _top_scores(self, scores: torch.Tensor, exclude: list[list[int]], k: int) -> list[list[dict]]:
        scores = scores.clone()
        for r, ex in enumerate(exclude):
            if ex:
                scores[r, torch.as_tensor(ex, dtype=torch.long)] = float("-inf")
        k = min(k, scores.shape[1])
        top = scores.topk(k, dim=1)
        return [[self._entry(int(i), float(s)) for s, i in zip(srow, irow) if s > float("-inf")]
                for srow, irow in zip(top.values.tolist(), top.indices.tolist())]

    def _entry(self, i: int, score: float) -> dict:
        c = self.catalogue
        return {"item": c.item_ids[i], "score": score, "title": c.titles[i], "image": c.images[i],
                "cold": not bool(self.model.warm[i])}
