"""Tower features of every training image, computed once before training.

A frozen vision tower gives the same features for an image at every epoch (the training transform
is deterministic), so LLaVA stage 2, Flamingo and other frozen-tower recipes (`train.cache_vision_features`)
can encode each image once instead of decoding and encoding it again at every step.  Shared by the
families whose models have a `vision` tower and a `tower_features(pixels)` method.  The cache
holds [images, tokens, width] float32 in memory: 0.66 GB for the shapes world's 20,000 training
images at 64 tokens x 128; a 336 px CLIP-L tower (576 x 1024) would need 2.4 MB per image.

The last tower's features stay in memory for the next run in the same process: LLaVA stage 1 and
stage 2 (as `glimpse demo` runs them) encode the same images with the same frozen tower, so stage
2 encodes only what stage 1 did not.  The tower is recognised by a hash of its weights and of
everything else that decides its features (layer, selection, preprocessing), a rewritten image
file by its modification time and size.  The price: the last cache stays in memory until the
process ends or another tower's cache replaces it.
"""

from __future__ import annotations

import hashlib
import os

import torch
from tqdm import tqdm

from glimpse.data.conversations import image_key
from glimpse.data.images import ImageError, ImageTransform, load_image

_last: dict = {"key": None, "rows": {}, "cache": None, "stamps": {}}  # the last tower's features (module docstring)


def _stamp(image) -> tuple | None:
    """What says a file is unchanged: its modification time and size (None for bytes and missing files)."""
    if not isinstance(image, str):
        return None
    try:
        st = os.stat(image)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def tower_fingerprint(model, settings, transform: ImageTransform, max_pixels: int) -> str:
    """Equal for two calls exactly when the tower would give every image the same features; `settings`:
    whatever else of the model's config decides them (the feature layer, the tokens kept)."""
    h = hashlib.sha1(repr((model.cfg.vision, settings, transform.to_dict(), max_pixels)).encode())
    # parameters as the module holds them now, not state_dict(): under FSDP (gathered) that gives shards
    towers = model.feature_towers() if hasattr(model, "feature_towers") else [model.vision]
    tensors = [(f"{i}.{n}", t) for i, tower in enumerate(towers) for n, t in [*tower.named_parameters(),
                                                                                 *tower.named_buffers()]]
    for name, t in sorted(tensors, key=lambda x: x[0]):
        h.update(name.encode())
        # a copy: numpy's view would pin the parameter's storage, which FSDP frees after gathering it
        h.update(t.detach().cpu().clone().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_pixels(src, transform: ImageTransform, max_pixels: int) -> torch.Tensor:
    """An image (a path or bytes) as the tower's input; raises ImageError.  A family whose samples are
    not single images (video frames) passes its own loader to `cache_tower_features`."""
    return transform(load_image(src, max_pixels=max_pixels, name="an image" if isinstance(src, bytes) else None))


def _encode(model, images: list, loader, device: torch.device, batch_size: int,
            progress: bool) -> tuple[dict, torch.Tensor | None]:
    rows: dict = {}
    chunks: list[torch.Tensor] = []
    n_rows = 0
    for start in tqdm(range(0, len(images), batch_size), desc="cache vision features", disable=not progress,
                      mininterval=1.0):
        pixels, keys = [], []
        for key in images[start:start + batch_size]:
            try:
                pixels.append(loader(key))
                keys.append(key)
            except ImageError as e:  # the samples that show it are dropped and counted, as without a cache
                rows[key] = e
        if pixels:
            chunks.append(model.tower_features(torch.stack(pixels).to(device)).float())
            rows.update({k: n_rows + i for i, k in enumerate(keys)})
            n_rows += len(keys)
    return rows, torch.cat(chunks) if chunks else None


@torch.no_grad()
def cache_tower_features(model, images: list, transform: ImageTransform, max_pixels: int, device: torch.device,
                         batch_size: int = 256, progress: bool = True, settings=(),
                         loader=None) -> tuple[dict, torch.Tensor]:
    """(image_key -> row of the cache, or the ImageError that made the image unusable; the cache
    [rows, ...] on `device`) for `images` (paths or bytes).  Each distinct image is read and encoded
    once; `settings` as in `tower_fingerprint`; `loader(src)` reads one (default: `load_pixels`)."""
    images = list(dict.fromkeys(image_key(img) for img in images))
    key = tower_fingerprint(model, settings, transform, max_pixels)
    stamps = {k: _stamp(k) for k in images}
    # the last run's rows, if it had this tower; a file rewritten since (same path, other bytes) is encoded again
    known = {k: r for k, r in _last["rows"].items() if k not in stamps or _last["stamps"].get(k) == stamps[k]} \
        if _last["key"] == key else {}
    was_training = model.training
    model.eval()
    loader = loader or (lambda src: load_pixels(src, transform, max_pixels))
    new_rows, new_cache = _encode(model, [k for k in images if k not in known], loader, device, batch_size, progress)
    model.train(was_training)
    old_cache = _last["cache"].to(device) if known else None
    offset = 0 if old_cache is None else len(old_cache)
    all_rows = {**known, **{k: r + offset if isinstance(r, int) else r for k, r in new_rows.items()}}
    parts = [c for c in (old_cache, new_cache) if c is not None]
    all_cache = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(0, device=device)
    _last.update(key=key, rows=all_rows, cache=all_cache,
                 stamps={**(_last["stamps"] if known else {}), **stamps})
    # this call's images only, in their order
    good = [k for k in images if isinstance(all_rows[k], int)]
    rows = {k: all_rows[k] for k in images if not isinstance(all_rows[k], int)}
    rows.update({k: i for i, k in enumerate(good)})
    if len(good) == len(all_cache) and all(all_rows[k] == i for i, k in enumerate(good)):
        return rows, all_cache
    return rows, all_cache[[all_rows[k] for k in good]] if good else torch.empty(0, device=device)
