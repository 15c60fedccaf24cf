"""The figures of an image tokenizer on a split.

- `recon_exact`, `recon_per_object`: the shapes-world scene parser (glimpse.data.scene_parser) on the
  reconstructions, against the generator's scene: every object right and nothing extra; the share of
  objects found.  `real_exact` is the parser on the original images: the ceiling (it should be 1).
- `psnr` (dB, pixels in [0, 1]) and `l1` of the reconstructions.
- `codebook_usage`: the share of codes used at least once over the whole split (not per batch, which
  understates usage: bshall/VectorQuantizedVAE#3); `perplexity`: exp of the entropy of the codes'
  frequencies over the split (K when all are used equally).  With codebook groups (product
  quantisation) every group's K codes count apart: usage over G * K codes, perplexity up to G * K.
Unreadable images are skipped and counted (`skipped`); `n` images were scored.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from glimpse.data.images import decode_each, to_uint8
from glimpse.data.scene_parser import parse_scene, scene_accuracy
from glimpse.data.world import read_scenes


@torch.no_grad()
def evaluate_tokenizer(vq, transform, root: Path, splits: list[str], batch_size: int, limit: int = 0,
                       max_pixels: int = 40_000_000) -> dict[str, float]:
    device = next(vq.parameters()).device
    K = vq.cfg.num_vq_embeddings * vq.cfg.codebook_groups  # every group's codes, counted apart
    results: dict[str, float] = {}
    for split in splits:
        scenes = read_scenes(root, split)
        scenes = scenes[:limit] if limit else scenes
        counts = torch.zeros(K, dtype=torch.long)
        recon_parses, real_parses, truth, skipped, sq_err, abs_err = [], [], [], 0, [], []
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start:start + batch_size]
            good, images, failures = decode_each([s.path for s in chunk], max_pixels)
            skipped += len(failures)
            if not images:
                continue
            pixels = torch.stack([transform(im) for im in images]).to(device)
            indices = vq.tokens(pixels)
            counts += torch.bincount(vq.quantize.global_ids(indices).reshape(-1).cpu(), minlength=K)
            recon = to_uint8(vq.decode_tokens(indices))
            real = to_uint8(pixels)
            diff = recon.astype(np.float32) / 255 - real.astype(np.float32) / 255
            sq_err.append((diff ** 2).reshape(len(diff), -1).mean(1))
            abs_err.append(np.abs(diff).reshape(len(diff), -1).mean(1))
            recon_parses += [parse_scene(im) for im in recon]
            real_parses += [parse_scene(im) for im in real]
            truth += [chunk[i].scene for i in good]
        if not truth:
            results.update({f"{split}/n": 0, f"{split}/skipped": skipped})
            continue
        recon_acc, real_acc = scene_accuracy(recon_parses, truth), scene_accuracy(real_parses, truth)
        mse = np.concatenate(sq_err)
        p = counts.double() / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        figures = {"recon_exact": recon_acc["exact"], "recon_per_object": recon_acc["per_object"],
                   "real_exact": real_acc["exact"],
                   "psnr": float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))),
                   "l1": float(np.concatenate(abs_err).mean()),
                   "codebook_usage": (counts > 0).float().mean().item(), "perplexity": math.exp(entropy),
                   "n": len(truth), "skipped": skipped}
        results.update({f"{split}/{k}": v for k, v in figures.items()})
    return results
