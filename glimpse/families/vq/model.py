"""The image tokenizer being trained: a VQ-VAE (glimpse/models/vq.py) with the state its training
tricks keep, and those tricks.

- k-means initialisation: before the first step the codebook is set to k-means centres of the
  encoder's outputs on training images, so every code starts where the data is.
- Dead-code restart: a code no batch has chosen for `restart_after` steps is moved onto the latent
  its batch quantises worst (deterministic, so a resumed run restarts the same codes).
- Autoencoder warm-up (`quantize_after` batches): the first batches train encoder and decoder with no
  quantiser between them, keeping their latents in a bank; the k-means then runs on the bank, so the
  codes start where a trained encoder puts its outputs, not where a random one does.
The first two keep the codebook in use (codebook collapse: lucidrains/vector-quantize-pytorch#170,
bytedance/1d-tokenizer#27).  Their state lives in buffers, saved with the weights, so resuming is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from glimpse.models.vq import VQConfig, VQModel


@dataclass
class VQTokenizerConfig:
    vq: VQConfig = field(default_factory=VQConfig)
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kmeans_init: bool = True
    kmeans_images: int = 1024  # training images whose latents the k-means sees
    kmeans_iters: int = 20
    restart_after: int = 50  # steps a code may go unchosen before it is restarted (0: never)
    # reconstruction weight of a pixel: 1 + foreground_weight * its colour saturation (max - min of its
    # RGB in the target, from 0 to 1); 0 weighs every pixel alike.  On a world of small saturated shapes on
    # near-grey backgrounds it puts the codebook's capacity on the shapes, not on background texture.
    foreground_weight: float = 0.0
    quantize_after: int = 0  # training batches run as a plain autoencoder before quantising (0: quantise at once)


class VQTokenizer(nn.Module):
    def __init__(self, cfg: VQTokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.vq = VQModel(cfg.vq)
        K = cfg.vq.num_vq_embeddings * cfg.vq.codebook_groups  # every group's codebook, one after another
        self.register_buffer("idle_steps", torch.zeros(K, dtype=torch.long))  # steps since each code was chosen
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))  # k-means done
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))  # codes restarted so far
        if cfg.quantize_after:  # (only then: runs without a warm-up have no such buffers)
            # the warm-up's latents for the k-means: the last batches', up to kmeans_images images' worth
            hw = (cfg.vq.sample_size // cfg.vq.downsample) ** 2
            self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
            self.register_buffer("latent_bank", torch.zeros(cfg.kmeans_images * hw, cfg.vq.embed_dim))
            self.register_buffer("bank_filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def kmeans_init(self, latents: torch.Tensor, seed: int = 0) -> None:
        """Codebook := k-means centres of latent vectors [N, C] (with codebook groups, each group's codebook
        the centres of its slice of the latents): Lloyd's algorithm started from k-means++ seeds (Arthur &
        Vassilvitskii 2007: each next seed drawn with probability proportional to its squared distance
        from the seeds so far), which a plain random start is not: it can leave two codes in one cluster
        and none in another, for good."""
        quantize = self.vq.quantize
        slices = latents.float().reshape(len(latents), quantize.groups, -1)
        for g in range(quantize.groups):
            quantize.codebook(g).copy_(self._kmeans(slices[:, g], seed + g))
        self.initialised.fill_(True)

    def _kmeans(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        K, iters = self.cfg.vq.num_vq_embeddings, self.cfg.kmeans_iters
        g = torch.Generator().manual_seed(seed)
        centres = x.new_empty(K, x.shape[1])
        centres[0] = x[torch.randint(len(x), (1,), generator=g)]
        nearest = (x - centres[0]).pow(2).sum(1)
        for k in range(1, K):
            weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)  # all points taken: uniform
            centres[k] = x[torch.multinomial(weights, 1, generator=g)]
            nearest = torch.minimum(nearest, (x - centres[k]).pow(2).sum(1))
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=K).to(x.dtype)
            moved = counts > 0
            centres[moved] = sums[moved] / counts[moved, None]
        return centres

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Count this batch's choices; move codes idle for `restart_after` steps onto the batch's worst-
        quantised latents (with codebook groups, a group's codes onto its worst-quantised slices).
        Returns the indices, recomputed when codes moved."""
        after = self.cfg.restart_after
        quantize = self.vq.quantize
        K = len(self.idle_steps)
        rows = quantize.global_ids(indices).reshape(-1)
        used = torch.bincount(rows, minlength=K) > 0
        self.idle_steps.add_(1).masked_fill_(used, 0)
        dead = (self.idle_steps >= after).nonzero().flatten() if after > 0 else indices.new_zeros(0)
        if len(dead) == 0:
            return indices
        slices = quantize.slices(z)  # [N, G, C / G]
        chosen = quantize.embedding.weight[rows].view_as(slices)
        error = (slices - chosen).pow(2).sum(2)  # [N, G]
        codes = quantize.embedding.weight
        for g in range(quantize.groups):
            dead_g = dead[dead // quantize.num_embeddings == g]
            if len(dead_g) == 0:
                continue
            worst = error[:, g].argsort(descending=True)[: len(dead_g)]
            worst = worst.repeat(len(dead_g) // len(worst) + 1)[: len(dead_g)]
            codes[dead_g] = slices[worst, g].to(codes.dtype)
        self.idle_steps[dead] = 0
        self.restarts.add_(len(dead))
        return quantize.indices(z)

    @torch.no_grad()
    def bank_latents(self, z: torch.Tensor) -> None:
        """Keep a warm-up batch's latents in the ring bank (a buffer: a resumed run has the same bank)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])[: len(self.latent_bank)]
        start = int(self.bank_filled) % len(self.latent_bank)
        where = (torch.arange(len(flat), device=flat.device) + start) % len(self.latent_bank)
        self.latent_bank[where] = flat.to(self.latent_bank.dtype)
        self.bank_filled.add_(len(flat))

    def loss(self, pixels: torch.Tensor) -> torch.Tensor:
        """L1 + L2 reconstruction plus the VQ loss (legacy=False), dead codes restarted first in training;
        during the autoencoder warm-up, reconstruction of the unquantised latents alone."""
        z = self.vq.encode(pixels)
        if self.training and self.cfg.quantize_after:
            if int(self.batches_seen) < self.cfg.quantize_after:
                self.batches_seen.add_(1)
                self.bank_latents(z.detach())
                return self.reconstruction_loss(self.vq.decode_latents(z), pixels)
            if self.cfg.kmeans_init and not bool(self.initialised):  # the warm-up is over: codes from its latents
                self.kmeans_init(self.latent_bank[: int(self.bank_filled)], seed=int(self.batches_seen))
        indices = self.vq.quantize.indices(z.detach())
        if self.training:
            indices = self.restart_dead_codes(z.detach(), indices)
        z_q, vq_loss, _ = self.vq.quantize_latents(z, indices)
        return self.reconstruction_loss(self.vq.decode_latents(z_q), pixels) + vq_loss

    def reconstruction_loss(self, recon: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        err = recon - pixels
        if c.foreground_weight:
            saturation = (pixels.amax(1, keepdim=True) - pixels.amin(1, keepdim=True)) / 2  # pixels in [-1, 1]
            weight = 1 + c.foreground_weight * saturation
            err = err * weight / weight.mean((1, 2, 3), keepdim=True)  # the same total weight per image
        return c.l1_weight * err.abs().mean() + c.l2_weight * err.pow(2).mean()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.loss(pixels)
