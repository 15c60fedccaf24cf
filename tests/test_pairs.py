"""PairDataset keeps decoded training images, PairCollate tokenized captions: the same tensors
as decoding and tokenizing every time, and nothing kept that should be read again."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glimpse.data import pairs
from glimpse.data.formats import ImageText
from glimpse.data.images import ImageTransform, load_image
from glimpse.data.pairs import PairCollate, PairDataset
from glimpse.data.tokenizer import train_tokenizer


def _images(tmp_path, n=3):
    paths = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 256, (40, 52, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return [ImageText(str(p), [f"caption {i}", f"other {i}"], str(p)) for i, p in enumerate(paths)]


def test_a_decoded_image_is_kept_and_gives_the_same_tensor(tmp_path):
    items = _images(tmp_path)
    transform = ImageTransform(32)
    expected = [transform(load_image(it.image)) for it in items]
    ds = PairDataset(items, transform, max_pixels=10**7)
    first = [ds[(i, 0)]["pixel_values"] for i in range(3)]
    for it in items:  # decoded once: the next epoch does not read the files
        Path(it.image).unlink()
    again = [ds[(i, 1)] for i in range(3)]
    for e, f, a in zip(expected, first, again):
        assert torch.equal(e, f) and torch.equal(e, a["pixel_values"])
    assert [a["caption"] for a in again] == ["other 0", "other 1", "other 2"]


def test_nothing_is_kept_for_a_set_too_big_or_a_bad_image(tmp_path, monkeypatch):
    items = _images(tmp_path)
    (tmp_path / "0.png").write_bytes(b"not an image")
    monkeypatch.setattr(pairs, "PIXEL_CACHE_BYTES", 3 * 3 * 32 * 32)  # exactly fits 3 images
    ds = PairDataset(items, ImageTransform(32), max_pixels=10**7)
    assert ds[(0, 0)]["error"] == "format"
    Image.new("RGB", (32, 32), "red").save(tmp_path / "0.png")  # repaired: read again, not a kept error
    assert "pixel_values" in ds[(0, 0)]

    monkeypatch.setattr(pairs, "PIXEL_CACHE_BYTES", 3 * 3 * 32 * 32 - 1)
    ds = PairDataset(items, ImageTransform(32), max_pixels=10**7)
    assert ds.pixels is None
    ds[(1, 0)]
    Path(items[1].image).unlink()
    assert ds[(1, 0)]["error"] == "missing"


def test_collate_rows_match_the_tokenizer_batch(tmp_path, monkeypatch):
    tok = train_tokenizer(["a large red circle on the left", "a small blue square at the top"] * 20,
                          tmp_path / "tokenizer.json", vocab_size=300)
    texts = ["a red circle", "a small blue square at the top on the left", "a red circle"]
    samples = [{"pixel_values": torch.zeros(3, 4, 4), "caption": t} for t in texts]
    monkeypatch.setattr(pairs, "TEXT_CACHE_LIMIT", 1)  # the second text is tokenized but not kept
    collate = PairCollate(tok, context_length=6)
    for _ in range(2):
        batch = collate(samples)
        ids, mask = tok.batch(texts, 6)
        assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert list(collate.ids) == ["a red circle"]

