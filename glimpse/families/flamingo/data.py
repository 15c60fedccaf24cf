"""Interleaved image-text sequences for Flamingo, made from the shapes world.

Every chunk is OpenFlamingo's format, one image and its text: `<image>Output: CAPTION<|endofchunk|>`
or `<image>Question: Q Answer: A<|endofchunk|>`.  A training sequence is one of two kinds, chosen
per sample:

- captions and answers: 1 to `max_images` images of the world, each followed by one of its captions
  or one of its questions with the answer;
- a binding episode: the in-context task the few-shot evaluation asks.  The episode picks `colours`
  of the world's colours and gives each a made-up word ("dax", "blick"); k solved examples (one-
  object images, each followed by its colour's word), k from 0 to `max_shots`, then a query image and
  its word.  Only the examples can tell which word a colour has in this episode, so the model learns
  to read its answer from them.  Training and evaluation draw their words from two disjoint pools:
  a test word was never seen in training.

A sample is fixed by its key (index, choice) alone (a seeded generator per key), so the trainer's
sampler decides what is read and a resumed run reads what an uninterrupted one would.

Labels: every text token after the first image except the `<image>` tokens (as OpenFlamingo trains).

Real interleaved documents (MMC4 / OBELICS) stream from WebDataset shards (`data.source: wds`,
`data.stream`): a sample is a document, its `.json` holding OBELICS's aligned `texts` and `images` lists
(at each position a text or an image) and each image a member named by its position (`KEY.3.jpg` for
position 3).  Each image opens a chunk holding the text up to the next image; text before the first image
is a chunk of its own (`StreamDocuments`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from glimpse.data.conversations import vqa_items
from glimpse.data.formats import IMAGE_EXTS
from glimpse.data.images import ImageError, ImageTransform, load_image, split_failures
from glimpse.data.lm_text import nonce_words
from glimpse.data.pairs import split_files
from glimpse.data.stream import ShardSample, ShardStream
from glimpse.errors import GlimpseError

IGNORE = -100
END_OF_CHUNK = "<|endofchunk|>"


@dataclass
class Scene:
    image: str
    captions: list[str]
    colours: list[str]  # each object's colour, in the world's order of objects
    qa: list[tuple[str, str]]  # (question, answer)


def read_scenes(data_cfg, root: Path, split: str) -> list[Scene]:
    """The split's images with their captions and, for the shapes world, each object's colour."""
    if data_cfg.source != "shapes":
        raise GlimpseError("the flamingo family trains on the shapes world (data.source: shapes)")
    path = root / "annotations" / f"captions_{split}.json"
    try:
        coco = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GlimpseError(f"cannot read {path}: {e}") from None
    caps: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    folder = root / "images" / split
    qa: dict[str, list[tuple[str, str]]] = {}
    for item in vqa_items(data_cfg, root, split):
        qa.setdefault(str(item["image"]), []).append((item["question"], item["answer"]))
    scenes = []
    for im in coco["images"]:
        path = str(folder / im["file_name"])
        scenes.append(Scene(path, caps.get(im["id"], []), [o["colour"] for o in im.get("scene", [])], qa.get(path, [])))
    return scenes


def caption_text(caption: str) -> str:
    return f"Output: {caption}"


def text_example(colour: str, episode_text: str) -> str:
    """A binding example in text, without its image: "red dakim" and a newline, the form of the LM's
    text episodes (glimpse.data.lm_text), from the example's colour and its `caption_text`."""
    return f"{colour} {episode_text.removeprefix(caption_text(''))}\n"


def qa_text(question: str, answer: str) -> str:
    return f"Question: {question} Answer: {answer}"


def binding_episode(rng: random.Random, by_colour: dict[str, list[int]], words: list[str], colours: int,
                    shots: int, query: int | None = None, shuffle_images: bool = False):
    """(image indices, texts, the episode's words, the query's word).  `query`: the query image (one of
    the single-object images), else drawn.  `shuffle_images` is the control: the examples' images are
    permuted, so a word no longer names its image's colour."""
    names = sorted(by_colour)
    if query is not None:
        q_colour = next(c for c in names if query in by_colour[c])
        others = rng.sample([c for c in names if c != q_colour], colours - 1)
        chosen = [q_colour] + others
        rng.shuffle(chosen)
    else:
        chosen = rng.sample(names, colours)
        q_colour = rng.choice(chosen)
        query = rng.choice(by_colour[q_colour])
    word_of = dict(zip(chosen, rng.sample(words, colours)))
    ex_colours = [rng.choice(chosen) for _ in range(shots)]
    images = [rng.choice(by_colour[c]) for c in ex_colours]
    texts = [caption_text(word_of[c]) for c in ex_colours]
    if shuffle_images:
        rng.shuffle(images)
    return images + [query], texts + [caption_text(word_of[q_colour])], [word_of[c] for c in chosen], word_of[q_colour]


def single_object_images(scenes: list[Scene]) -> dict[str, list[int]]:
    by_colour: dict[str, list[int]] = {}
    for i, s in enumerate(scenes):
        if len(s.colours) == 1:
            by_colour.setdefault(s.colours[0], []).append(i)
    return by_colour


class InterleavedDataset(Dataset):
    def __init__(self, scenes: list[Scene], tokenizer, transform: ImageTransform, max_pixels: int, *,
                 max_images: int, max_shots: int, colours: int, episode_share: float, context_length: int,
                 text_share: float = 0.0, seed: int = 0, image_rows: dict | None = None):
        """`image_rows`: image path -> its row of a feature cache (or the ImageError that makes it
        unusable); the samples then carry rows instead of pixels."""
        self.scenes, self.tokenizer, self.transform, self.max_pixels = scenes, tokenizer, transform, max_pixels
        self.max_images, self.max_shots, self.colours, self.episode_share = max_images, max_shots, colours, episode_share
        self.context_length, self.seed, self.text_share = context_length, seed, text_share
        self.by_colour = single_object_images(scenes)
        if len(self.by_colour) < colours:
            raise GlimpseError(f"binding episodes need one-object images of {colours} colours; the world has "
                               f"{len(self.by_colour)}")
        self.words = nonce_words("train")
        self.pixels: dict[int, object] = {}  # index -> resized uint8 array (the transform is deterministic)
        self.image_rows = image_rows

    def __len__(self) -> int:
        return len(self.scenes)

    def sequence(self, key: tuple[int, int]) -> tuple[list[int | None], list[str]]:
        """(image indices, the text after each image) of the sample with this key; an index None is a
        chunk of text alone (a binding example shown in text)."""
        idx, choice = key
        rng = random.Random(f"{self.seed}/{idx}/{choice}")
        if rng.random() < self.episode_share:
            shots = rng.randint(0, self.max_shots)
            images, texts, _, _ = binding_episode(rng, self.by_colour, self.words, self.colours, shots)
            if self.text_share > 0:  # "red dakim\n" in place of `<image>Output: dakim`, the query stays an image
                for j in range(shots):
                    if rng.random() < self.text_share:
                        colour = self.scenes[images[j]].colours[0]
                        images[j], texts[j] = None, text_example(colour, texts[j])
            return images, texts
        images = [idx] + [rng.randrange(len(self.scenes)) for _ in range(rng.randint(0, self.max_images - 1))]
        texts = []
        for i in images:
            s = self.scenes[i]
            if s.qa and rng.random() < 0.5:
                texts.append(qa_text(*rng.choice(s.qa)))
            else:
                texts.append(caption_text(rng.choice(s.captions)))
        return images, texts

    def _pixels(self, i: int) -> torch.Tensor:
        arr = self.pixels.get(i)
        if arr is None:
            s = self.scenes[i]
            arr = self.transform.resized_array(load_image(s.image, max_pixels=self.max_pixels))
            self.pixels[i] = arr
        return self.transform.normalize(arr)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        images, texts = self.sequence(key)
        ids, labels = encode_chunks(self.tokenizer, texts, self.context_length, text_only=[i is None for i in images])
        images = [i for i in images if i is not None]
        n = ids.count(self.tokenizer.ids["image"])  # images whose chunk fits the context
        if self.image_rows is not None:
            rows = [self.image_rows[self.scenes[i].image] for i in images[:n]]
            bad = next((r for r in rows if isinstance(r, ImageError)), None)
            if bad is not None:
                return {"error": bad.reason, "message": str(bad)}
            return {"image_rows": rows, "input_ids": ids, "labels": labels}
        try:
            pixels = torch.stack([self._pixels(i) for i in images[:n]])
        except ImageError as e:
            return {"error": e.reason, "message": str(e)}
        return {"pixel_values": pixels, "input_ids": ids, "labels": labels}


def encode_chunks(tokenizer, texts: list[str], context_length: int, prompt: str | None = None,
                  text_only: list[bool] | None = None):
    """bos + `<image>TEXT<|endofchunk|>` per text -> (ids, labels), whole chunks only, within
    `context_length`; then, with a `prompt` ("Output:"), an open chunk `<image>PROMPT` whose text is
    to be generated (no labels).  `text_only[j]`: text j is a chunk of its own, without image or end."""
    image, bos = tokenizer.ids["image"], tokenizer.ids["bos"]
    ids, labels = [bos], [IGNORE]
    text_only = text_only or [False] * len(texts)
    pieces = [(t, False) for t in texts] + ([(prompt, True)] if prompt is not None else [])
    for j, (text, is_prompt) in enumerate(pieces):
        if not is_prompt and text_only[j]:
            piece = tokenizer.encode(text)
        else:
            piece = tokenizer.encode(f"<image>{text}" if is_prompt else f"<image>{text}{END_OF_CHUNK}")
        if len(ids) + len(piece) > context_length:
            break
        ids += piece
        labels += [IGNORE if (tok == image or is_prompt) else tok for tok in piece]
    return ids, labels


class InterleavedCollate:
    """Right-padded text and [B, N_max, 3, H, W] images (or [B, N_max] feature-cache rows) with
    `image_valid` [B, N_max] marking the real ones."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        good, batch = split_failures(samples)
        if not good:
            return batch
        T = max(len(s["input_ids"]) for s in good)
        cached = "image_rows" in good[0]  # a feature cache stands in for the pixels
        counts = [len(s["image_rows"]) if cached else s["pixel_values"].shape[0] for s in good]
        N = max(counts)
        images = torch.zeros(len(good), N, dtype=torch.long) if cached else \
            torch.zeros(len(good), N, *good[0]["pixel_values"].shape[1:])
        valid = torch.zeros(len(good), N, dtype=torch.bool)
        ids = torch.full((len(good), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(good), T), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(good), T, dtype=torch.long)
        for b, (s, n) in enumerate(zip(good, counts)):
            t = len(s["input_ids"])
            images[b, :n] = torch.tensor(s["image_rows"]) if cached else s["pixel_values"]
            valid[b, :n] = True
            ids[b, :t], labels[b, :t], mask[b, :t] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
        batch.update({"image_rows" if cached else "pixel_values": images}, image_valid=valid, input_ids=ids, attention_mask=mask, labels=labels)
        return batch


def document_usable(suffixes) -> bool:
    """Whether a shard sample is an interleaved document: a .json and at least one image member named by its
    position (`KEY.3.jpg`: suffix `3.jpg`).  A caption sample (`KEY.jpg`) is not one."""
    return "json" in suffixes and any(x.split(".")[0].isdigit() and x.rsplit(".", 1)[-1] in IMAGE_EXTS
                                      for x in suffixes if "." in x)


def stream_documents(data_cfg, root: Path, tokenizer, transform: ImageTransform, max_images: int,
                     context_length: int, seed: int) -> ShardStream:
    """The training split's shards of interleaved documents as a stream (`data.stream`)."""
    files, _ = split_files(data_cfg, root, "train")
    decode = StreamDocuments(tokenizer, transform, data_cfg.max_pixels, max_images, context_length)
    return ShardStream(files, decode, seed=seed, shuffle_buffer=data_cfg.shuffle_buffer, usable=document_usable)


class StreamDocuments:
    """A stream's decoder: a document sample -> the item InterleavedDataset gives (its first `max_images` images
    whose chunks fit the context, and the chunks' ids and labels), or the bad-sample record.  As OpenFlamingo
    trains on MMC4, the text before the first image is context, not a target; an opening text too long for the
    context is left out rather than the document.  Markers in the text (`<image>`, `<|endofchunk|>`) are read
    as spaces: only the document's images make image tokens.  (MMC4's own layout, `text_list` and `image_info`,
    is converted to this one first.)"""

    def __init__(self, tokenizer, transform: ImageTransform, max_pixels: int, max_images: int, context_length: int):
        self.tokenizer, self.transform, self.max_pixels = tokenizer, transform, max_pixels
        self.max_images, self.context_length = max_images, context_length

    def chunks(self, name: str, files: dict[str, bytes]) -> tuple[list[str], list[bool], list[str]] | dict:
        """(chunk texts, whether each is text alone, the image members in order), or the bad-sample record.
        The text after the last image kept (the `max_images`-th) is left out with the images after it."""
        try:
            doc = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            return {"error": "corrupt", "message": f"{name}.json is not valid JSON ({str(e) or 'nested too deeply'})"}
        texts, images = (doc.get("texts"), doc.get("images")) if isinstance(doc, dict) else (None, None)
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            return {"error": "format", "message": f"{name}.json holds no interleaved document (aligned \"texts\" and "
                                                  "\"images\" lists)"}
        chunks: list[str] = []
        alone: list[bool] = []
        members: list[str] = []
        for pos, (text, image) in enumerate(zip(texts, images)):
            if (image is None) == (text is None) or not (text is None or isinstance(text, str)):
                return {"error": "format", "message": f"{name}: position {pos} must hold a text or an image, not both "
                                                      "or neither"}
            if image is not None:
                if len(members) == self.max_images:
                    break
                member = next((f"{pos}.{ext}" for ext in IMAGE_EXTS if f"{pos}.{ext}" in files), None)
                if member is None:
                    return {"error": "format", "message": f"{name}: no image member for position {pos} ({pos}.jpg, ...)"}
                members.append(member)
                chunks.append("")
                alone.append(False)
                continue
            text = " ".join(text.replace("<image>", " ").replace(END_OF_CHUNK, " ").split())
            if text and chunks:  # the text after an image (or after text) joins its chunk
                chunks[-1] = f"{chunks[-1]} {text}".strip()
            elif text:
                chunks.append(text)
                alone.append(True)
        if not members:
            return {"error": "format", "message": f"{name}: the document holds no image"}
        return chunks, alone, members

    def __call__(self, s: ShardSample) -> dict:
        name = s.name
        got = self.chunks(name, s.files)
        if isinstance(got, dict):
            return got
        chunks, alone, members = got
        image = self.tokenizer.ids["image"]
        ids, labels = encode_chunks(self.tokenizer, chunks, self.context_length, text_only=alone)
        if image not in ids and alone[0]:  # the opening text alone outgrows the context: leave it out
            ids, labels = encode_chunks(self.tokenizer, chunks[1:], self.context_length, text_only=alone[1:])
        n = ids.count(image)  # images whose chunk fits the context (the text holds no image marker)
        if n == 0:
            return {"error": "image_cut", "message": f"{name} dropped: no image's chunk fits the context"}
        first = ids.index(image)
        labels = [IGNORE] * first + labels[first:]  # the text before the first image is context, not a target
        try:
            pixels = torch.stack([self.transform.normalize(self.transform.resized_array(
                load_image(s.files[m], max_pixels=self.max_pixels, name=f"{name}.{m}"))) for m in members[:n]])
        except ImageError as e:
            return {"error": e.reason, "message": str(e)}
        return {"pixel_values": pixels, "input_ids": ids, "labels": labels}
