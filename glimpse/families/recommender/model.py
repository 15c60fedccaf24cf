"""Recommenders over one catalogue: the glimpse two-tower model and its baselines.

two_tower  item = MLP(frozen glimpse dual-encoder features of picture and title) + ID embedding (warm items
           only), as a direction and a bias; user = a SequenceEncoder (SASRec, or the mean) over the
           history's item directions; score = scale * cos(user, item) + bias.  Trained with in-batch
           sampled softmax and the logQ correction.
bpr        BPR matrix factorisation (Rendle et al. 2009): user and item ID embeddings and an item bias.
vbpr       VBPR (He & McAuley 2016): BPR plus a user's visual factor against a projection of the frozen
           picture features, and a visual bias.

Cold items (never bought in training) have no ID embedding: BPR and VBPR give them none (`warm` zeroes
it), the two-tower model the learned unknown item's, so an ID-only model scores every cold item alike, and
only content can tell them apart.  The frozen features, `warm` and the
training popularity are buffers saved with the weights, so a loaded run recommends without its data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.models.dual_encoder import DualEncoder, DualEncoderConfig
from glimpse.models.layers import init_weights
from glimpse.models.sequential import SequenceEncoder

KINDS = ("two_tower", "bpr", "vbpr")
CONTENT = ("image_text", "image", "text", "none")


@dataclass
class RecommenderConfig:
    kind: str = "two_tower"  # two_tower | bpr | vbpr
    # the frozen item tower: a glimpse dual encoder (init_parts: {item_encoder: RUN}) reading each item's
    # picture and title; its embeddings are computed once before training
    item_encoder: DualEncoderConfig = field(default_factory=DualEncoderConfig)
    content: str = "image_text"  # what of an item the two-tower model reads: image_text | image | text | none (IDs)
    dim: int = 64
    user: str = "sasrec"  # the two-tower user encoder: sasrec | mean (order-blind)
    layers: int = 2
    heads: int = 2
    dropout: float = 0.1
    max_history: int = 50  # the newest purchases a user encoder reads
    from_start: bool = False  # sasrec: positions counted from the oldest purchase too, not only from the newest
    # the share of training items seen without their ID embedding each step, so that the content path
    # alone places an item (which is all a cold item has)
    id_dropout: float = 0.5
    # the share of each training history's newest next-purchase targets that carry loss (1: every one, as
    # SASRec trains); what is asked at evaluation is always the purchase after a whole history
    target_share: float = 1.0
    logq: bool = True  # subtract log popularity from in-batch logits (Yi et al. 2019): popular items are over-sampled negatives
    negatives: int = 1  # bpr, vbpr: sampled negatives per positive
    num_items: int = 0  # set from the data
    num_users: int = 0  # set from the data (bpr, vbpr: users are IDs)


class Recommender(nn.Module):
    def __init__(self, cfg: RecommenderConfig):
        super().__init__()
        self.cfg = cfg
        N, D = cfg.num_items, cfg.dim
        self.reads_content = cfg.kind == "vbpr" or (cfg.kind == "two_tower" and cfg.content != "none")
        feat = 2 * cfg.item_encoder.embed_dim
        # frozen content features (pictures then titles, each L2-normalised); an item without a picture has zeros there
        self.register_buffer("features", torch.zeros(N, feat if self.reads_content else 0))
        self.register_buffer("warm", torch.zeros(N, dtype=torch.bool))
        self.register_buffer("log_pop", torch.zeros(N))  # log of each item's share of training purchases
        self.item_encoder = DualEncoder(cfg.item_encoder) if self.reads_content else None
        self.id_embed = nn.Embedding(N, D)
        self.item_bias = nn.Parameter(torch.zeros(N))
        if cfg.kind == "two_tower":
            if self.reads_content:  # content -> a direction and a bias
                self.content = nn.Sequential(nn.Linear(feat, D), nn.GELU(), nn.Linear(D, D + 1))
            self.user_encoder = SequenceEncoder(D, cfg.user, cfg.layers, cfg.heads, cfg.max_history, cfg.dropout,
                                            cfg.from_start)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.unknown_id = nn.Parameter(torch.zeros(D))
            # added to the bias of items without an ID at inference, fitted on validation after training
            # (calibrate_cold): training has no cold purchases to learn it from
            self.register_buffer("cold_offset", torch.zeros(()))
            self.unknown_bias = nn.Parameter(torch.zeros(()))
        else:
            self.user_embed = nn.Embedding(cfg.num_users, D)
            if cfg.kind == "vbpr":
                half = cfg.item_encoder.embed_dim  # VBPR reads pictures only
                self.user_visual = nn.Embedding(cfg.num_users, D)
                self.visual_proj = nn.Linear(half, D, bias=False)
                self.visual_bias = nn.Linear(half, 1, bias=False)
        for name, m in self.named_children():
            if name != "item_encoder":
                init_weights(m)
        init_weights(self.id_embed)

    # -- the two-tower model ----------------------------------------------------------------------
    def content_mask(self) -> torch.Tensor:
        """Which content features the model reads (content: image | text drops the other half)."""
        half = self.features.shape[1] // 2
        keep = torch.ones(self.features.shape[1], device=self.features.device)
        if self.cfg.content == "image":
            keep[half:] = 0
        elif self.cfg.content == "text":
            keep[:half] = 0
        return keep

    def embed_content(self, features: torch.Tensor) -> torch.Tensor:
        """Item embeddings from content alone (a cold or new item): [M, 2 * embed_dim] -> [M, dim + 1]."""
        c = self.content(features * self.content_mask())
        v = F.normalize(c[:, :-1] + self.unknown_id, dim=-1)
        return torch.cat([v, c[:, -1:] + self.unknown_bias + self.cold_offset], dim=1)

    def encode_items(self, pixel_values: torch.Tensor, has_picture: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """Content features [M, 2 * embed_dim] of items through the item tower (what `features` caches):
        the picture's and the title's embeddings, each L2-normalised; zeros for an item without a picture."""
        enc = self.item_encoder
        image = F.normalize(enc.get_image_features(pixel_values).float(), dim=-1) * has_picture[:, None]
        return torch.cat([image, F.normalize(enc.get_text_features(input_ids, attention_mask).float(), dim=-1)], 1)

    def item_embeddings(self, id_keep: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """[N, dim + 1]: each item's direction (content plus the ID embedding of warm items, and only of those
        in `id_keep` when training drops some), L2-normalised, then its bias (popularity).  `features`:
        content features to use instead of the cached ones (training through the item tower)."""
        ids = (self.warm if id_keep is None else self.warm & id_keep)[:, None]
        # an item without its ID (cold, or dropped this step) has the learned unknown item's: what an
        # average ID adds, so that known items gain nothing over cold ones from merely having one
        v = torch.where(ids, self.id_embed.weight, self.unknown_id)
        b = torch.where(ids[:, 0], self.item_bias, self.unknown_bias)
        if self.reads_content:
            c = self.content((self.features if features is None else features) * self.content_mask())
            v, b = v + c[:, :-1], b + c[:, -1]
        if id_keep is None:
            b = b + self.cold_offset * ~ids[:, 0]
        return torch.cat([F.normalize(v, dim=-1), b[:, None]], dim=1)

    def user_states(self, history: torch.Tensor, item_embeds: torch.Tensor) -> torch.Tensor:
        """history [B, T] left-padded item indices -> [B, T, dim + 1], the state after each purchase: a
        direction times the learned logit scale, then 1 (which reads the item's bias), so that a score is
        one inner product (what an inner-product index searches)."""
        u = F.normalize(self.user_encoder(history, item_embeds[:, :-1]), dim=-1)
        scale = self.logit_scale.exp().clamp(max=100.0)
        return torch.cat([scale * u, torch.ones_like(u[..., :1])], dim=-1)

    # -- bpr, vbpr -------------------------------------------------------------------------------
    def score_users(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """[B] users -> scores [B, N] of every item, or [B, M] of `items` [B, M]."""
        idx = torch.arange(self.cfg.num_items, device=users.device) if items is None else items
        q = self.id_embed(idx) * self.warm[idx][..., None]
        b = self.item_bias[idx] * self.warm[idx]
        p = self.user_embed(users)
        if items is None:
            s = p @ q.T + b
        else:
            s = (p[:, None] * q).sum(-1) + b
        if self.cfg.kind == "vbpr":
            f = self.features[idx][..., : self.features.shape[1] // 2]
            theta = self.user_visual(users)
            e = self.visual_proj(f)
            vb = self.visual_bias(f).squeeze(-1)
            s = s + (theta @ e.T + vb if items is None else (theta[:, None] * e).sum(-1) + vb)
        return s

    def score_histories(self, history: torch.Tensor, item_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The two-tower model's scores of every item after each history's last purchase: [B, T] -> [B, N]
        (`item_embeds`: item_embeddings() computed once by a caller that scores many batches)."""
        v = self.item_embeddings() if item_embeds is None else item_embeds
        return self.user_states(history, v)[:, -1] @ v.T

    def forward(self, inputs=None, targets=None, item_index=None, item_pixels=None, item_has_picture=None,
                item_input_ids=None, item_attention_mask=None, users=None, positives=None, negatives=None):
        """The training loss of a batch (through forward, so that DDP synchronises its gradients): the
        in-batch softmax of the two-tower model (with its items through the tower when it trains too), or
        BPR's for bpr and vbpr."""
        if self.cfg.kind != "two_tower":
            return bpr_loss(self, users, positives, negatives)
        fresh = None
        if item_index is not None:  # the item tower trains too: the batch's items through it
            fresh = self.encode_items(item_pixels, item_has_picture, item_input_ids, item_attention_mask)
        return in_batch_softmax_loss(self, inputs, targets, fresh, item_index)


def in_batch_softmax_loss(model: Recommender, inputs: torch.Tensor, targets: torch.Tensor,
                          fresh: torch.Tensor | None = None, fresh_items: torch.Tensor | None = None) -> torch.Tensor:
    """Every next purchase of every history against the batch's other target items (sampled softmax).
    inputs, targets [B, T]: targets[b, t] is the item bought after inputs[b, :t+1]; -1 = none.  With the
    item tower trained too, `fresh` holds the content features of the batch's items (`fresh_items`),
    computed through the tower, in place of the cached ones."""
    c = model.cfg
    keep = torch.rand(c.num_items, device=inputs.device) >= c.id_dropout
    features = None
    if fresh is not None:
        features = model.features.index_put((fresh_items,), fresh)
    v = model.item_embeddings(keep, features)
    states = model.user_states(inputs, v)
    valid = targets >= 0
    s, t = states[valid], targets[valid]
    candidates, label = torch.unique(t, return_inverse=True)
    logits = s @ v[candidates].T
    if c.logq:
        logits = logits - model.log_pop[candidates]
    return F.cross_entropy(logits, label)


def bpr_loss(model: Recommender, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(x_ui - x_uj) over each positive and its sampled negatives ([B], [B], [B, n])."""
    pos = model.score_users(users, positives[:, None])
    neg = model.score_users(users, negatives)
    return -F.logsigmoid(pos - neg).mean()
