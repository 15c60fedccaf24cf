"""Measures of generated images that read them through a CLIP-like model's embeddings.

- `r_precision`: R-precision as AttnGAN defines it (Xu et al. 2018) and CLIP-R-precision (Park et al.
  2021, "Benchmark for compositional text-to-image synthesis"): each generated image ranks its own
  prompt against `negatives` other captions (99 in the papers, drawn from the other prompts); it
  scores 1 when its prompt ranks first, and the mean over images is averaged over `repeats` draws
  of the negatives (5 in DALL-Eval's `retrieval/rprecision.py`).
- `hard_r_precision`: the same, against given negatives per prompt (here: captions that differ in one
  attribute or swap a binding between two objects).
- `clip_score`: the mean cosine of image and prompt embeddings (what text-to-image papers and
  minDALL-E's `clip_score` report; Hessel et al.'s CLIPScore rescales it as 2.5 max(cos, 0)).
- `frechet_distance`: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to
  two sets of features (Heusel et al. 2017's FID formula).  On CLIP features it is not FID, whose
  features are Inception's (clean-fid's `clip_vit_b_32` mode is the same idea).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def r_precision(image_embeds: torch.Tensor, text_embeds: torch.Tensor, negatives: int = 99, repeats: int = 5,
                seed: int = 0) -> float:
    """image_embeds [N, E] generated from text_embeds [N, E] (row i from prompt i)."""
    N = len(image_embeds)
    if N < 2:
        raise ValueError("R-precision needs at least two prompts")
    negatives = min(negatives, N - 1)
    img, txt = F.normalize(image_embeds.float(), dim=-1), F.normalize(text_embeds.float(), dim=-1)
    sims = img @ txt.T  # [N, N]
    own = sims.diagonal()
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(repeats):
        # negatives of row i: a random draw from the other rows (offsets 1..N-1 from i, so never i itself)
        offsets = np.stack([rng.choice(N - 1, size=negatives, replace=False) + 1 for _ in range(N)])
        cols = torch.from_numpy((np.arange(N)[:, None] + offsets) % N)
        scores.append((own > sims.gather(1, cols).max(1).values).float().mean().item())
    return float(np.mean(scores))


def hard_r_precision(image_embeds: torch.Tensor, text_embeds: torch.Tensor, negative_embeds: torch.Tensor) -> float:
    """image_embeds [N, E], text_embeds [N, E], negative_embeds [N, M, E]: the share of images whose
    prompt outranks all M of its own negatives."""
    img = F.normalize(image_embeds.float(), dim=-1)
    own = (img * F.normalize(text_embeds.float(), dim=-1)).sum(-1)
    neg = torch.einsum("ne,nme->nm", img, F.normalize(negative_embeds.float(), dim=-1))
    return (own > neg.max(1).values).float().mean().item()


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    return F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1).mean().item()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Between features a [N, E] and b [M, E], in float64.  Tr((S_a S_b)^(1/2)) is the sum of the square
    roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric (no complex sqrtm)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross).item()
