"""Image-caption pairs for contrastive training and retrieval evaluation, from any reader.

Bad samples (corrupt, truncated, oversized, missing images) are not fatal in training:
the dataset reports them, the collate drops them, and the trainer counts them by reason.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from glimpse.data.formats import (
    IMAGE_EXTS,
    ImageText,
    expand_shards,
    iter_webdataset,
    read_coco_captions,
    read_csv_captions,
    wds_sample,
)
from glimpse.data.images import ImageError, ImageTransform, load_image, split_failures
from glimpse.data.negatives import swapped_negative
from glimpse.data.stream import ShardSample, ShardStream, read_shard
from glimpse.errors import GlimpseError


def split_files(data_cfg, root: Path, split: str) -> tuple[str, str | None]:
    """The annotation file (or shard pattern) of `split` and, for COCO, its image folder."""
    fmt = data_cfg.format
    if data_cfg.source == "shapes":
        return {
            "coco": (str(root / "annotations" / f"captions_{split}.json"), str(root / "images" / split)),
            "csv": (str(root / f"{split}.csv"), str(root)),
            "wds": (str(root / "shards" / f"{split}-*.tar"), None),
        }[fmt]
    if split not in data_cfg.files:
        raise GlimpseError(f"no data.files.{split} in the recipe (set it with --set data.files.{split}=PATH)")
    path = Path(data_cfg.files[split])
    path = path if path.is_absolute() or not data_cfg.root else Path(data_cfg.root) / path
    images = data_cfg.images.get(split)
    if images and data_cfg.root and not Path(images).is_absolute():
        images = str(Path(data_cfg.root) / images)
    return str(path), images


def load_pairs(data_cfg, root: Path, split: str) -> list[ImageText]:
    fmt = data_cfg.format if data_cfg.source == "shapes" else data_cfg.source
    if fmt not in ("coco", "csv", "wds"):
        raise GlimpseError(f"unknown data format {fmt!r}; use coco, csv or wds")
    files, images = split_files(data_cfg, root, split)
    if fmt == "coco":
        return read_coco_captions(files, images or Path(files).parent)
    if fmt == "csv":
        return read_csv_captions(files, images)
    return list(iter_webdataset(files))


def stream_pairs(data_cfg, root: Path, transform: ImageTransform, seed: int) -> ShardStream:
    """The training split's shards as a stream (`data.stream`) of the items PairDataset gives."""
    files, _ = split_files(data_cfg, root, "train")
    return ShardStream(files, StreamPairs(transform, data_cfg.max_pixels, seed), seed=seed,
                       shuffle_buffer=data_cfg.shuffle_buffer)


class StreamPairs:
    """A stream's decoder: a shard sample -> {"pixel_values", "caption"}, as PairDataset gives, or the
    bad-sample record (a bad image, or what `stream_caption` refuses)."""

    def __init__(self, transform: ImageTransform, max_pixels: int, seed: int):
        self.transform, self.max_pixels, self.seed = transform, max_pixels, seed

    def __call__(self, s: ShardSample) -> dict:
        got = stream_caption(s, self.seed)
        if isinstance(got, dict):
            return got
        name, image, caption = got
        try:
            arr = self.transform.resized_array(load_image(image, max_pixels=self.max_pixels, name=name))
        except ImageError as e:
            return {"error": e.reason, "message": str(e)}
        return {"pixel_values": self.transform.normalize(arr), "caption": caption}


def image_usable(suffixes) -> bool:
    """Whether a shard sample holds an image: all an image tokenizer reads (ImageNet-style shards, KEY.jpg and
    KEY.cls, count as well as captioned ones).  The stream counts, skips and resumes by this."""
    return any(ext in suffixes for ext in IMAGE_EXTS)


def stream_images(data_cfg, root: Path, transform: ImageTransform, seed: int) -> ShardStream:
    """The training split's shards as a stream of images alone (`data.stream` for an image tokenizer)."""
    files, _ = split_files(data_cfg, root, "train")
    return ShardStream(files, StreamImages(transform, data_cfg.max_pixels), seed=seed,
                       shuffle_buffer=data_cfg.shuffle_buffer, usable=image_usable)


def first_images(data_cfg, root: Path, n: int) -> list[bytes]:
    """The first `n` images of the training split's shards, in shard order, read no further (a k-means
    initialisation's sample of a stream)."""
    files, _ = split_files(data_cfg, root, "train")
    out: list[bytes] = []
    for path in expand_shards(files):
        for key, members in read_shard(path, image_usable):
            out.append(ShardSample(path, key, members, 0).member(IMAGE_EXTS))
            if len(out) == n:
                return out
    return out


class StreamImages:
    """A stream's decoder: a shard sample -> {"pixel_values"} as PairDataset gives them, or the bad-sample record."""

    def __init__(self, transform: ImageTransform, max_pixels: int):
        self.transform, self.max_pixels = transform, max_pixels

    def __call__(self, s: ShardSample) -> dict:
        try:
            arr = self.transform.resized_array(load_image(s.member(IMAGE_EXTS), max_pixels=self.max_pixels,
                                                          name=s.name))
        except ImageError as e:
            return {"error": e.reason, "message": str(e)}
        return {"pixel_values": self.transform.normalize(arr)}


def stream_caption(s: ShardSample, seed: int) -> tuple[str, bytes, str] | dict:
    """(the sample's name, its image bytes, one of its captions) of a shard sample, or the bad-sample record (a
    .json that is broken or holds no caption).  The caption is drawn by (seed, epoch, key), so a replayed
    stream draws the same ones."""
    name = s.name
    try:
        item = wds_sample(s.shard, s.key, s.files)
    except GlimpseError as e:
        return {"error": "corrupt", "message": str(e)}
    if item is None:
        return {"error": "format", "message": f"{name}: no caption"}
    return name, item.image, s.pick(item.captions, seed)


# decoded training images a PairDataset keeps in memory (uint8, resized), when the whole set fits:
# 8,000 64 px images are 98 MB.  Each loader worker holds its own copy.
PIXEL_CACHE_BYTES = 1 << 30
TEXT_CACHE_LIMIT = 500_000  # captions a PairCollate keeps tokenized


class PairDataset(Dataset):
    """Items are (index, caption choice) pairs, so the sampler alone decides what is read:
    that is what makes a resumed run read exactly the samples an uninterrupted one would.

    The training transform is deterministic, so an image decoded once is kept (resized, as uint8)
    for the next epochs when the whole set fits in PIXEL_CACHE_BYTES; only normalising is repeated.
    """

    def __init__(self, items: list[ImageText], transform: ImageTransform, max_pixels: int,
                 descriptions: bool = False, negatives: bool = False):
        self.items, self.transform, self.max_pixels = items, transform, max_pixels
        self.descriptions = descriptions  # each sample carries all its image's captions (for description_keys)
        self.negatives = negatives  # each sample carries a hard negative of its caption (glimpse.data.negatives)
        fits = len(items) * 3 * transform.image_size ** 2 <= PIXEL_CACHE_BYTES
        self.pixels: dict[int, np.ndarray] | None = {} if fits else None  # index -> uint8 [S, S, 3]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        idx, choice = key
        item = self.items[idx]
        caption = item.captions[choice % len(item.captions)]
        arr = None if self.pixels is None else self.pixels.get(idx)
        if arr is None:
            name = item.image_id if isinstance(item.image, bytes) else None
            try:  # a bad image is not kept: it is read (and reported) again, as it would be uncached
                arr = self.transform.resized_array(load_image(item.image, max_pixels=self.max_pixels, name=name))
            except ImageError as e:
                return {"error": e.reason, "message": str(e)}
            if self.pixels is not None:
                self.pixels[idx] = arr
        sample = {"pixel_values": self.transform.normalize(arr), "caption": caption}
        if self.descriptions:
            sample["descriptions"] = item.captions
        if self.negatives:  # drawn by the sampler's key, which differs each epoch and repeats on resume
            sample["negative"] = swapped_negative(caption, idx << 31 | choice)
        return sample


def text_key(text: str) -> int:
    """A stable 63-bit key of a text (Python's hash() differs between loader processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def description_keys(samples: list[dict], text_key_name: str) -> dict:
    """"text_keys" [B] (each sample's text) and "image_keys" [B, K] (every text known to describe each
    sample's image, -1 padded): the batch's true matches beyond its diagonal, for contrastive and
    matching losses that must not treat another image the text also describes as a negative."""
    keys = [sorted({text_key(t) for t in s["descriptions"]}) for s in samples]
    image_keys = torch.full((len(samples), max(len(k) for k in keys)), -1, dtype=torch.long)
    for i, k in enumerate(keys):
        image_keys[i, :len(k)] = torch.tensor(k, dtype=torch.long)
    return {"text_keys": torch.tensor([text_key(s[text_key_name]) for s in samples], dtype=torch.long),
            "image_keys": image_keys}


class TextCollate:
    """bos + text + eos, right-padded; labels are the ids with padding ignored (-100)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, samples: list[dict]) -> dict:
        ids, mask = self.tokenizer.batch([s["text"] for s in samples], self.context_length)
        return {"status": [None] * len(samples), "messages": [], "input_ids": ids, "attention_mask": mask,
                "labels": ids.masked_fill(mask == 0, -100)}


class PairCollate:
    """Stacks the good samples, tokenises their captions, and reports the bad ones in order."""

    text_key = "caption"

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.ids: dict[str, list[int]] = {}  # text -> its row: a caption is tokenized once, not every epoch

    def _row(self, text: str) -> list[int]:
        row = self.ids.get(text)
        if row is None:
            row = self.tokenizer.tower_ids(text, self.context_length)
            if len(self.ids) < TEXT_CACHE_LIMIT:
                self.ids[text] = row
        return row

    def __call__(self, samples: list[dict]) -> dict:
        good, batch = split_failures(samples)
        if good:
            batch["pixel_values"] = torch.stack([s["pixel_values"] for s in good])
            texts = [s[self.text_key] for s in good]
            negatives = [s["negative"] for s in good if s.get("negative")]
            rows = [self._row(t) for t in texts] + [self.tokenizer.tower_ids(t, self.context_length) for t in negatives]
            ids, mask = self.tokenizer.pad(rows)  # one length for both (negatives vary too much to cache)
            batch["input_ids"], batch["attention_mask"] = ids[:len(texts)], mask[:len(texts)]
            if negatives:  # hard negatives: texts no image of the batch matches
                batch["negative_ids"], batch["negative_mask"] = ids[len(texts):], mask[len(texts):]
            if all("descriptions" in s for s in good):  # a dataset that gives them: the batch's true pairs
                batch.update(description_keys(good, self.text_key))
        return batch
