"""Tower features of every training image, computed once before training.

A frozen vision tower gives the same features for an image at every epoch (the training transform
is deterministic), so LLaVA stage 2 and other frozen-tower recipes (`train.cache_vision_features`)
can encode each image once instead of decoding and encoding it again at every step.  The cache
holds [images, tokens, width] float32 in memory: 0.66 GB for the shapes world's 20,000 training
images at 64 tokens x 128; a 336 px CLIP-L tower (576 x 1024) would need 2.4 MB per image.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from glimpse.data.conversations import image_key
from glimpse.data.images import ImageError, ImageTransform, load_image
from glimpse.models.vlm import VisionLanguageModel


@torch.no_grad()
def cache_tower_features(model: VisionLanguageModel, records: list[dict], transform: ImageTransform,
                         max_pixels: int, device: torch.device, batch_size: int = 256,
                         progress: bool = True) -> tuple[dict, torch.Tensor]:
    """(image_key -> row of the cache, or the ImageError that made the image unusable; the cache
    [rows, ...] on `device`).  Each distinct image is read and encoded once."""
    images = list(dict.fromkeys(image_key(img) for r in records for img in r["images"]))
    rows: dict = {}
    chunks: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    n_rows = 0
    for start in tqdm(range(0, len(images), batch_size), desc="cache vision features", disable=not progress,
                      mininterval=1.0):
        pixels, keys = [], []
        for key in images[start:start + batch_size]:
            try:
                pixels.append(transform(load_image(key, max_pixels=max_pixels,
                                                   name="an image" if isinstance(key, bytes) else None)))
                keys.append(key)
            except ImageError as e:  # the samples that show it are dropped and counted, as without a cache
                rows[key] = e
        if pixels:
            chunks.append(model.tower_features(torch.stack(pixels).to(device)).float())
            rows.update({k: n_rows + i for i, k in enumerate(keys)})
            n_rows += len(keys)
    model.train(was_training)
    cache = torch.cat(chunks) if chunks else torch.empty(0, device=device)
    return rows, cache
