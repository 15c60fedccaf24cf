"""Training data of a prior: each training image's code grid, encoded once by the frozen tokenizer
(as LLaVA's stages cache tower features), with one of its captions.

Caption augmentation (`caption_drop`): with that probability a caption is replaced by a description
of its scene with attributes left out ("a red shape on the left and a cross at the top"), so that a
colour and a shape are also learnt as separate conditions -- the hope being that a colour-shape pair
never seen together in training (test_novel) composes from them.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from glimpse.data.images import decode_each, split_failures
from glimpse.data.shapes_words import describe_scene


@torch.no_grad()
def encode_codes(vq, paths: list, transform, max_pixels: int, device: torch.device, batch_size: int = 128,
                 progress: bool = True) -> tuple[list[int | None], torch.Tensor, dict[str, str]]:
    """(row of each image in the code table or None when unreadable, codes [rows, vq.cfg.tokens_per_image] int16 on the cpu,
    the unreadable images' messages by path)."""
    rows: list[int | None] = []
    chunks, bad, n = [], {}, 0
    for start in tqdm(range(0, len(paths), batch_size), desc="encode image codes", disable=not progress,
                      mininterval=1.0):
        chunk = paths[start:start + batch_size]
        good, images, failures = decode_each(chunk, max_pixels)
        for i, reason in failures.items():
            bad[str(chunk[i])] = f"{chunk[i]}: {reason}"
        good_set = dict(zip(good, range(n, n + len(good))))
        rows += [good_set.get(i) for i in range(len(chunk))]
        n += len(good)
        if images:
            pixels = torch.stack([transform(im) for im in images]).to(device)
            chunks.append(vq.tokens(pixels).flatten(1).to(torch.int16).cpu())
    return rows, (torch.cat(chunks) if chunks else torch.zeros(0, 0, dtype=torch.int16)), bad


class CodeDataset(Dataset):
    """Keys are the trainer's (index, caption choice) pairs; a sample is {"codes", "caption"}."""

    def __init__(self, scenes: list, rows: list[int | None], codes: torch.Tensor, bad: dict[str, str],
                 caption_drop: float = 0.0, seed: int = 0):
        self.scenes, self.rows, self.codes, self.bad = scenes, rows, codes, bad
        self.caption_drop, self.seed = caption_drop, seed

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        idx, choice = key
        scene, row = self.scenes[idx], self.rows[idx]
        if row is None:
            return {"error": "unreadable image", "message": self.bad.get(scene.path, scene.path)}
        caption = scene.captions[choice % len(scene.captions)]
        if self.caption_drop > 0:
            rng = random.Random(hash((self.seed, idx, choice)))  # the key decides: resuming reads the same
            if rng.random() < self.caption_drop:
                caption = describe_scene(scene.scene, rng, drop=0.5)
        return {"codes": self.codes[row].long(), "caption": caption}


class CodeCollate:
    """The codes (or, streamed, the tokenizer's view of the images, encoded in the loss) and the padded captions."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, samples: list[dict]) -> dict:
        good, batch = split_failures(samples)
        if good:
            key = "codes" if "codes" in good[0] else "pixel_values"
            batch[key] = torch.stack([s[key] for s in good])
            batch["input_ids"], batch["attention_mask"] = self.tokenizer.pad(
                [self.tokenizer.tower_ids(s["caption"], self.context_length) for s in good])
        return batch
