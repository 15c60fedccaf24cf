"""Multimodal recommendation: a two-tower recommender on glimpse's image and text towers (items), with a
SASRec user tower, and the ID baselines BPR-MF and VBPR; full-ranking Recall@K and NDCG@K over warm and
cold items, against popularity and the shapes shop's oracle.

    model.py      Recommender (RecommenderConfig): two_tower | bpr | vbpr, and their losses
    data.py       the shop a recipe names, the items' frozen content features, the training sets
    evaluate.py   full ranking of a split, warm and cold apart, with popularity, shuffled and oracle rankings
    pipeline.py   what glimpse.load returns: recommend(histories), recommend_users(users)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.data.shop import FORMATS, Catalogue
from glimpse.errors import GlimpseError
from glimpse.families import checks
from glimpse.families.base import Family, recipe_transform
from glimpse.families.recommender.data import (
    HistoryCollate,
    HistoryDataset,
    InteractionDataset,
    ItemInputs,
    content_features,
    interaction_collate,
    log_popularity,
    read_shop,
    shop_root,
)
from glimpse.families.recommender.evaluate import calibrate_cold, evaluate
from glimpse.families.recommender.model import (
    CONTENT,
    KINDS,
    Recommender,
    RecommenderConfig,
)
from glimpse.families.recommender.pipeline import RecommenderPipeline
from glimpse.families.registry import register
from glimpse.models.sequential import MODES
from glimpse.schema import check, choice

CATALOGUE = "items.json"  # the run folder's copy of its items (ids, titles, pictures)


@register
class RecommenderFamily(Family):
    name = "recommender"
    config = RecommenderConfig
    data_formats = FORMATS

    @classmethod
    def validate(cls, recipe) -> None:
        m = recipe.model
        choice("model.kind", m.kind, KINDS)
        choice("model.content", m.content, CONTENT)
        choice("model.user", m.user, MODES)
        choice("data.source", recipe.data.source, ("shapes-shop", *FORMATS))
        check(recipe.data.source == "shapes-shop" or recipe.data.source == recipe.data.format, "data.format",
              recipe.data.format, f"must be the source's format ({recipe.data.source})")
        check(m.kind == "two_tower" or m.content in ("none", "image_text"), "model.content", m.content,
              "is the two-tower model's setting (bpr reads no content, vbpr the pictures)")
        for k in ("dim", "max_history", "negatives"):
            check(getattr(m, k) >= 1, f"model.{k}", getattr(m, k), "must be at least 1")
        check(m.dim % m.heads == 0, "model.heads", m.heads, f"must divide model.dim ({m.dim})")
        check(0.0 <= m.id_dropout < 1.0 and 0.0 <= m.dropout < 1.0, "model.id_dropout/dropout",
              (m.id_dropout, m.dropout), "must be in [0, 1)")
        check(0.0 < m.target_share <= 1.0, "model.target_share", m.target_share, "must be in (0, 1]")
        if m.kind == "vbpr" or (m.kind == "two_tower" and m.content != "none"):
            checks.check_towers(m.item_encoder)
        else:
            for key, value in (("freeze", recipe.freeze), ("init_parts", recipe.init_parts)):
                check("item_encoder" not in value, key, value, "names item_encoder, but this model reads no content "
                      "(model.content: none, or bpr): leave it out")
        check(m.kind != "vbpr" or "item_encoder" in recipe.freeze, "freeze", recipe.freeze,
              "must hold item_encoder: VBPR reads fixed picture features")

    def __init__(self, recipe, root: Path, tokenizer):
        super().__init__(recipe, root, tokenizer)
        m = recipe.model
        m.item_encoder.text.vocab_size = m.item_encoder.text.vocab_size or tokenizer.vocab_size
        self.transform = recipe_transform(recipe, m.item_encoder.vision)
        self.shop, self.items = None, None
        if not m.num_items:  # a new run: the data decides the sizes (a loaded run has them in its recipe)
            self.shop = read_shop(recipe.data, root)
            m.num_items, m.num_users = len(self.shop.item_ids), len(self.shop.user_ids)

    def run_files(self) -> dict[str, str]:
        return {CATALOGUE: self._shop().to_json()}

    def _catalogue(self):
        """The run's items: from its folder when it has them (a loaded run), else from its data."""
        path = self.root / CATALOGUE
        return Catalogue.from_json(path) if path.is_file() and self.shop is None else self._shop()

    def _shop(self):
        if self.shop is None:
            self.shop = read_shop(self.recipe.data, self.root if (self.root / "world.json").is_file() else None)
        return self.shop

    def build_model(self) -> nn.Module:
        return Recommender(self.recipe.model)

    def tunes_items(self, model: Recommender) -> bool:
        """Whether training goes through the item tower (not frozen) rather than its cached features."""
        return model.reads_content and any(p.requires_grad for p in model.item_encoder.parameters())

    def prepare(self, model: Recommender, device: torch.device, progress: bool = True) -> None:
        """The item tower's features of every item (cached: all a frozen tower gives), which items are warm,
        and training popularity."""
        shop = self._shop()
        model.warm.copy_(torch.as_tensor(shop.warm))
        model.log_pop.copy_(log_popularity(shop))
        if model.reads_content:
            self.items = ItemInputs(shop, self.tokenizer, self.transform, self.recipe.data.max_pixels,
                                    model.cfg.item_encoder.text.context_length)
            if self.items.bad and progress:
                print(f"recommender: {sum(self.items.bad.values())} items read from their titles alone "
                      f"({dict(self.items.bad)})")
            model.features.copy_(content_features(model, self.items, device, self.recipe.eval.batch_size))
            if not self.tunes_items(model):
                self.items = None  # the cached features are all training needs

    def finish(self, model: Recommender, device: torch.device) -> None:
        if self.items is not None:  # a trained tower: cache its features as they are now
            model.features.copy_(content_features(model, self.items, device, self.recipe.eval.batch_size))
        if model.cfg.kind == "two_tower" and model.reads_content:
            offset = calibrate_cold(model, self._shop(), self.recipe.eval.batch_size)
            if offset is not None:
                print(f"recommender: cold items' offset {offset:+.2f}, fitted on the validation purchases")

    def train_data(self):
        m, shop = self.recipe.model, self._shop()
        if m.kind == "two_tower":
            return HistoryDataset(shop, m.max_history), HistoryCollate(m.max_history, self.items, m.target_share)
        return InteractionDataset(shop, m.negatives), interaction_collate

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**{k: v for k, v in batch.items() if torch.is_tensor(v)})

    def evaluate(self, model: Recommender, splits: list[str]) -> dict[str, float]:
        for s in splits:
            if s not in ("val", "test"):
                raise GlimpseError(f"eval split {s!r}: a recommender is evaluated on val or test")
        shop = self._shop()
        if self.items is not None:  # the tower trains: evaluate with its features as they are now
            model.features.copy_(content_features(model, self.items, model.features.device,
                                                  self.recipe.eval.batch_size))
        return evaluate(model, shop, splits, shop_root(self.recipe.data, self.root), model.log_pop.cpu(),
                        self.recipe.eval.batch_size, self.recipe.train.seed)

    def pipeline(self, model: Recommender) -> RecommenderPipeline:
        return RecommenderPipeline(model, self._catalogue, self._shop, self.tokenizer, self.transform,
                                   self.recipe.data.max_pixels)


__all__ = ["RecommenderFamily", "Recommender", "RecommenderConfig", "RecommenderPipeline"]
