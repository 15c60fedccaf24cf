"""Conversations with images, for training vision-language decoders.

A record is {"images": [path or bytes, ...], "messages": [...]} in chat-message form, or
{"images": [...], "captions": [...]} for caption data (the sampler's caption choice picks one,
as a user turn holding only the image and an assistant turn holding the caption: LLaVA's
stage-1 "plain" data).  Sources:

- captions (COCO, CSV, WebDataset) through `load_pairs`, or streamed from shards (`stream_conversations`);
- LLaVA instruction files (`llava_{split}.json`), `<image>` placeholders in the human turns, or shards of
  LLaVA records streamed (one image a sample, its record as the .json);
- VQA questions, an image's questions as conversations of up to 2 turns, each question
  followed by LLaVA-1.5's short-answer instruction (its VQAv2 training mix).

Each `<image>` token of the tokenized conversation is expanded to `image_tokens` copies (the
number of features an image becomes), labelled -100.  A sample that the context would cut
inside or before an image, whose placeholders do not match its images, or that keeps no
supervised token, is dropped and counted by reason, never silently misaligned.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import Dataset

from glimpse.data.chat import IGNORE, VQA_INSTRUCTION, from_llava, tokenize_conversation
from glimpse.data.formats import IMAGE_EXTS, read_llava, read_vqa
from glimpse.data.images import ImageError, ImageTransform, load_image, split_failures
from glimpse.data.pairs import load_pairs, split_files, stream_caption
from glimpse.data.stream import ShardSample, ShardStream
from glimpse.errors import GlimpseError

# reasons a sample is dropped, besides the image errors
DROP_REASONS = {
    "image_cut": "the context would cut it inside or before an image",
    "image_count": "its <image> placeholders do not match its images",
    "no_target": "no assistant token is left inside the context",
}


ENCODED_CACHE_LIMIT = 200_000  # records; a ConversationDataset keeps the tokenized samples of smaller sets


def vqa_question(question: str, instruction: bool = True) -> str:
    return f"{question}\n{VQA_INSTRUCTION}" if instruction else question


def vqa_items(data_cfg, root: Path, split: str) -> list[dict]:
    """A split's VQA questions with answers and image paths (read_vqa's items)."""
    if data_cfg.source == "shapes":
        ann = Path(root) / "annotations"
        return read_vqa(ann / f"vqa_questions_{split}.json", ann / f"vqa_annotations_{split}.json",
                        Path(root) / "images" / split, images=ann / f"captions_{split}.json")
    # real VQAv2: the questions, the annotations, and a COCO json whose "images" name each image_id's file
    keys = [f"vqa_questions_{split}", f"vqa_annotations_{split}", f"vqa_images_{split}"]
    if not all(k in data_cfg.files for k in keys) or split not in data_cfg.images:
        raise GlimpseError(f"VQA on {split} needs data.files.{{{', '.join(keys)}}} and data.images.{split}")
    q, a, names = (data_cfg.files[k] for k in keys)
    return read_vqa(q, a, data_cfg.images[split], images=names)


def caption_records(data_cfg, root: Path, split: str) -> list[dict]:
    return [{"images": [it.image], "captions": it.captions} for it in load_pairs(data_cfg, root, split)]


def llava_records(data_cfg, root: Path, split: str) -> list[dict]:
    if data_cfg.source == "shapes":
        path, images = Path(root) / "annotations" / f"llava_{split}.json", Path(root) / "images"
    else:
        path, images = split_files(data_cfg, root, split)
        images = images or Path(path).parent
    records = []
    for r in read_llava(path, images):
        try:
            messages = llava_messages(r["conversations"], len(r["images"]))
        except ValueError as e:
            raise GlimpseError(f"{path}: record {r['id']}: {e}") from None
        records.append({"images": r["images"], "messages": messages})
    return records


def llava_messages(conversations, n_images: int) -> list[dict]:
    """A LLaVA record's turns as chat messages; an image no turn places goes before the first turn, as LLaVA
    does.  ValueError for turns that are not LLaVA's."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("no conversations (a non-empty list of {from, value} turns)")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} has no text value")
    messages = from_llava(conversations)
    if n_images and not any("<image>" in m["content"] for m in messages):
        messages[0] = {**messages[0], "content": "<image>\n" + messages[0]["content"]}
    return messages


def vqa_records(data_cfg, root: Path, split: str, per_conversation: int = 2) -> list[dict]:
    """An image's questions as conversations of up to `per_conversation` turns, each answered by
    the annotators' most common answer.  (Short conversations keep a batch's lengths alike: the
    padding of one long sample is paid by every sample of its batch.)"""
    by_image: dict[str, list[dict]] = defaultdict(list)
    for item in vqa_items(data_cfg, root, split):
        by_image[item["image"]].append(item)
    records = []
    for image, items in by_image.items():
        for start in range(0, len(items), per_conversation):
            messages = []
            for k, item in enumerate(items[start:start + per_conversation]):
                prefix = "<image>\n" if k == 0 else ""
                messages += [{"role": "user", "content": prefix + vqa_question(item["question"])},
                             {"role": "assistant", "content": item["answer"]}]
            records.append({"images": [image], "messages": messages})
    return records


def training_records(data_cfg, root: Path, split: str = "train") -> list[dict]:
    records = llava_records(data_cfg, root, split) if data_cfg.format == "llava" else \
        caption_records(data_cfg, root, split)
    if data_cfg.vqa_mix:
        records += vqa_records(data_cfg, root, split)
    return records


def expand_images(ids: list[int], labels: list[int], image_id: int, image_tokens: int) -> tuple[list, list]:
    """Each `<image>` id becomes `image_tokens` copies, none of them supervised."""
    out_ids, out_labels = [], []
    for i, lab in zip(ids, labels):
        if i == image_id:
            out_ids += [image_id] * image_tokens
            out_labels += [IGNORE] * image_tokens
        else:
            out_ids.append(i)
            out_labels.append(lab)
    return out_ids, out_labels


def encode_sample(tokenizer, template: str, messages: list[dict], n_images: int, image_tokens: int,
                  context_length: int) -> tuple[list[int], list[int]] | str:
    """(input_ids, labels) ready for the model, or the reason the sample is dropped."""
    image_id = tokenizer.ids["image"]
    ids, labels = tokenize_conversation(tokenizer, template, messages)
    if ids.count(image_id) != n_images:
        return "image_count"
    ids, labels = expand_images(ids, labels, image_id, image_tokens)
    if len(ids) > context_length:
        if image_id in ids[context_length:]:
            return "image_cut"
        ids, labels = ids[:context_length], labels[:context_length]
    if all(lab == IGNORE for lab in labels[1:]):  # the first label is never a target (no token before it)
        return "no_target"
    return ids, labels


def image_key(image) -> str | bytes:
    """A record's image (a path or encoded bytes) as a dictionary key."""
    return image if isinstance(image, bytes) else str(image)


class ConversationDataset(Dataset):
    """Keys are (index, caption choice) pairs, as PairDataset's (the sampler decides everything read).

    With `image_rows` (image_key -> row of a feature cache, or the reason the image is unusable)
    a sample carries its images' rows instead of their pixels: nothing is decoded per step.
    """

    def __init__(self, records: list[dict], tokenizer, template: str, transform: ImageTransform, max_pixels: int,
                 image_tokens: int, context_length: int, image_rows: dict | None = None, loader=None):
        self.records, self.tokenizer, self.template = records, tokenizer, template
        self.loader = loader  # src, name -> the tower's input; None: an image through `transform`
        self.transform, self.max_pixels = transform, max_pixels
        self.image_tokens, self.context_length = image_tokens, context_length
        self.image_rows = image_rows
        # record (and caption choice) -> encode_sample's result, so a sample is tokenized once, not every
        # epoch; only for data sets small enough to hold it (about 1 KB a sample)
        self._encoded: dict | None = {} if len(records) <= ENCODED_CACHE_LIMIT else None

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """About how many tokens each record becomes (words, a few per turn for the template, the
        image tokens), for length-grouped batches; a caption record counts its mean caption."""
        def words(text: str) -> int:
            return len(text.split())

        out = []
        for r in self.records:
            if r.get("messages"):
                text = sum(words(m["content"]) + 3 for m in r["messages"])
            else:
                text = sum(words(c) for c in r["captions"]) / max(len(r["captions"]), 1) + 2
            out.append(int(text) + self.image_tokens * len(r["images"]))
        return out

    def __getitem__(self, key: tuple[int, int]) -> dict:
        idx, choice = key
        r = self.records[idx]
        which = (idx, 0 if r.get("messages") else choice % len(r["captions"]))
        encoded = None if self._encoded is None else self._encoded.get(which)
        if encoded is None:
            messages = r.get("messages") or [
                {"role": "user", "content": "<image>" * len(r["images"])},
                {"role": "assistant", "content": r["captions"][which[1]]}]
            encoded = encode_sample(self.tokenizer, self.template, messages, len(r["images"]), self.image_tokens,
                                    self.context_length)
            if self._encoded is not None:
                self._encoded[which] = encoded
        if isinstance(encoded, str):
            return {"error": encoded, "message": f"sample {idx} dropped: {DROP_REASONS[encoded]}"}
        if self.image_rows is not None:
            rows = [self.image_rows[image_key(img)] for img in r["images"]]
            bad = next((row for row in rows if isinstance(row, ImageError)), None)
            if bad is not None:
                return {"error": bad.reason, "message": str(bad)}
            return {"input_ids": encoded[0], "labels": encoded[1], "image_rows": rows}
        try:
            pixels = [self._load(img, f"sample {idx}" if isinstance(img, bytes) else None) for img in r["images"]]
        except ImageError as e:
            return {"error": e.reason, "message": str(e)}
        return {"input_ids": encoded[0], "labels": encoded[1], "pixel_values": pixels}


    def _load(self, src, name: str | None) -> torch.Tensor:
        if self.loader is not None:
            return self.loader(src, name)
        return self.transform(load_image(src, max_pixels=self.max_pixels, name=name))


def stream_conversations(data_cfg, root: Path, tokenizer, template: str, transform: ImageTransform,
                         image_tokens: int, context_length: int, seed: int) -> ShardStream:
    """The training split's WebDataset shards as a stream (`data.stream`), never held in memory: caption
    conversations (LLaVA's stage 1, image-caption pretraining as on LCS-558K), or with `data.format: llava`
    LLaVA records (stage 2, visual instruction tuning): each sample an image and a .json holding the record's
    "conversations", as LLaVA-style WebDataset sets are written."""
    files, _ = split_files(data_cfg, root, "train")
    decode = StreamConversations(tokenizer, template, transform, data_cfg.max_pixels, image_tokens,
                                 context_length, seed, llava=data_cfg.format == "llava")
    return ShardStream(files, decode, seed=seed, shuffle_buffer=data_cfg.shuffle_buffer)


class StreamConversations:
    """A stream's decoder: a shard sample -> the item ConversationDataset gives for its record (a caption
    record: the image, then its caption as the answer; a LLaVA record: its turns), or the bad-sample record."""

    def __init__(self, tokenizer, template: str, transform: ImageTransform, max_pixels: int, image_tokens: int,
                 context_length: int, seed: int, llava: bool = False):
        self.tokenizer, self.template, self.transform, self.max_pixels = tokenizer, template, transform, max_pixels
        self.image_tokens, self.context_length, self.seed, self.llava = image_tokens, context_length, seed, llava

    def __call__(self, s: ShardSample) -> dict:
        got = self._llava(s) if self.llava else stream_caption(s, self.seed)
        if isinstance(got, dict):
            return got
        name, image, messages = got if self.llava else (got[0], got[1], [
            {"role": "user", "content": "<image>"}, {"role": "assistant", "content": got[2]}])
        encoded = encode_sample(self.tokenizer, self.template, messages, 1, self.image_tokens, self.context_length)
        if isinstance(encoded, str):
            return {"error": encoded, "message": f"{name} dropped: {DROP_REASONS[encoded]}"}
        try:
            pixels = self.transform(load_image(image, max_pixels=self.max_pixels, name=name))
        except ImageError as e:
            return {"error": e.reason, "message": str(e)}
        return {"input_ids": encoded[0], "labels": encoded[1], "pixel_values": [pixels]}

    @staticmethod
    def _llava(s: ShardSample) -> tuple[str, bytes, list[dict]] | dict:
        """(the sample's name, its image bytes, its record's turns as messages), or the bad-sample record."""
        got = shard_record(s)
        return got if isinstance(got, dict) else (got[0], s.member(IMAGE_EXTS), got[1])


def shard_record(s: ShardSample, media: str = "image") -> tuple[str, list[dict]] | dict:
    """(the sample's name, its LLaVA record's turns as messages) of a shard sample holding one `media` member and
    the record as its .json, or the bad-sample record.  A video record's `<video>` is read as the `<image>` slot
    its clip's tokens fill (LLaVA-Video's JSON); a record naming other than one image (or video) is a bad sample."""
    name = s.name
    if "json" not in s.files:  # a caption sample (a .txt), not a record
        return {"error": "format", "message": f"{name}: no .json record"}
    try:
        record = json.loads(s.files["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return {"error": "corrupt", "message": f"{name}.json is not valid JSON ({str(e) or 'nested too deeply'})"}
    if not isinstance(record, dict):
        return {"error": "format", "message": f"{name}.json holds no LLaVA record (a JSON object)"}
    named = record.get(f"{media}s", record.get(media, "the member"))  # no field: the sample's member
    n = 1 if isinstance(named, str) else len(named) if isinstance(named, list) else 0
    if n != 1:
        return {"error": "format", "message": f"{name}: the record names {n} {media}s; a shard sample holds one"}
    turns = record.get("conversations")
    if media != "image" and isinstance(turns, list):
        turns = [{**t, "value": t["value"].replace(f"<{media}>", "<image>")}
                 if isinstance(t, dict) and isinstance(t.get("value"), str) else t for t in turns]
    try:
        return name, llava_messages(turns, 1)
    except ValueError as e:
        return {"error": "format", "message": f"{name}: {e}"}


class ConversationCollate:
    """Right-pads the good samples; pixel_values holds all their images in reading order."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        good, batch = split_failures(samples)
        if good:
            T = max(len(s["input_ids"]) for s in good)
            ids = torch.full((len(good), T), self.pad_id, dtype=torch.long)
            labels = torch.full((len(good), T), IGNORE, dtype=torch.long)
            mask = torch.zeros(len(good), T, dtype=torch.long)
            for i, s in enumerate(good):
                n = len(s["input_ids"])
                ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
            batch.update(input_ids=ids, labels=labels, attention_mask=mask)
            if "image_rows" in good[0]:  # a feature cache stands in for the pixels
                batch["image_rows"] = torch.tensor([r for s in good for r in s["image_rows"]], dtype=torch.long)
            else:
                images = [p for s in good for p in s["pixel_values"]]
                batch["pixel_values"] = torch.stack(images) if images else None
        return batch
