"""What the video LLaVA reads: LLaVA-Video conversations (`<video>` placeholders) over clips, as the
records of glimpse.data.conversations (LLaVA's).

A training clip of the moving-shapes world can come with its reversed twin (`model.reverse_twins`): the
same frames played backwards, with the description and the answers recomputed from the world's tracks
as the reversal plays.  The twin's frames are the clip's own, so an order-blind model can tell the two
apart only by the frame positions: it scores exactly the same on both, and the loss pays only for
reading the order (without twins the LM memorised its 4,000 clips' answers instead, docs/results.md).

With `model.answer_traces`, each answer to a direction, bounce or order question is spelt out first as a
trace of where its shapes are in each frame (`answer_trace`: "the circle 1:25 2:35 3:45 4:--, so right"),
computed from the world's tracks as the clip plays: the LM learns to locate a shape frame by frame and
then to read the answer off its own trace, instead of doing both at once.

With `model.all_questions`, a clip's question conversation asks every question the world asks of it
(qa_{split}.json, in an order fixed by the clip's name), not only the 2 or 3 its LLaVA-Video conversation
picked: the world (v3) writes about 4.1 questions a clip and the conversations hold 2.4 of them.

With `model.still_twins`, a clip the world asks static questions of also comes as a still: its middle
frame held for every frame, asked those static questions only (the world asks them only where every
frame shows the answer).  An image as a clip of one held frame, as LLaVA-NeXT-Video and Video-LLaVA
train on images beside videos: the model learns to read one frame, which is what the single-frame
baseline gives it (video_llava/evaluate.py), and never sees a temporal question without the motion
to answer it from.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

from glimpse.data.chat import from_llava
from glimpse.data.conversations import DROP_REASONS, encode_sample, shard_record
from glimpse.data.images import ImageTransform
from glimpse.data.pairs import split_files
from glimpse.data.shapes_video import read_clips
from glimpse.data.shapes_video_text import answer_of, reverse_tracks, video_caption
from glimpse.data.shapes_video_traces import answer_trace, traced
from glimpse.data.stream import ShardSample, ShardStream
from glimpse.data.video import VIDEO_EXTS, VideoError, clip_pixels, video_usable
from glimpse.errors import GlimpseError

VIDEO = "<video>"
REVERSED = "#reversed"  # a clip path with this suffix is the clip played backwards (see `reversed_source`)
STILL = "#still"  # ... and with this one, the clip's middle frame held for every frame (see `still_source`)


def reversed_source(src) -> tuple[object, bool]:
    """(the clip's own source, whether to play it backwards) for a record's clip."""
    if isinstance(src, str) and src.endswith(REVERSED):
        return src[:-len(REVERSED)], True
    return src, False


def still_source(src) -> tuple[object, bool]:
    """(the clip's own source, whether to hold its middle frame) for a record's clip."""
    if isinstance(src, str) and src.endswith(STILL):
        return src[:-len(STILL)], True
    return src, False


def hold_middle(pixels: torch.Tensor) -> torch.Tensor:
    """A clip [T, ...] as its middle frame held for all T frames: the still twin's view, and the
    single-frame baseline's."""
    return pixels[pixels.shape[0] // 2].expand_as(pixels)


def video_records(data_cfg, root: Path, split: str, twins: bool = False, traces: bool = False,
                  trace_style: str = "frames", stills: bool = False, all_questions: bool = False) -> list[dict]:
    """A split's conversations as {"images": [clip path], "messages": [...]}, `<video>` read as the
    `<image>` slot that the clip's tokens fill (LLaVA-Video's JSON: id, video, conversations); with
    `twins`, each moving-shapes clip's reversed twin after its own records; with `traces`, the
    moving-shapes answers traced in `trace_style`; with `stills`, the still twin of each clip asked
    static questions; with `all_questions`, every question of each clip (module docstring)."""
    if data_cfg.source == "shapes-video":
        path, base = Path(root) / "annotations" / f"llava_video_{split}.json", Path(root)
    else:
        if split not in data_cfg.files:
            raise GlimpseError(f"no data.files.{split} in the recipe (a LLaVA-Video JSON; --set data.files.{split}=PATH)")
        path = Path(data_cfg.root or ".") / data_cfg.files[split]
        base = Path(data_cfg.root or ".") / data_cfg.images.get(split, str(path.parent))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        shapes = data_cfg.source == "shapes-video"
        world = _Answers(Path(root), split, traces, trace_style) \
            if shapes and (twins or traces or stills or all_questions) else None
        records = []
        for r in data:
            r = world.every_question(r) if all_questions and world else r
            turns = world.as_played(r) if traces and world else r["conversations"]
            records.append(_record(turns, str(base / r["video"])))
            twin = world.reversed(r) if twins and world else None
            if twin:
                records.append(_record(twin, str(base / r["video"]) + REVERSED))
            still = world.still(r) if stills and world else None
            if still:
                records.append(_record(still, str(base / r["video"]) + STILL))
        return records
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GlimpseError(f"cannot read the video conversations of {path}: {e!r}") from None


def _record(conversations: list[dict], clip: str) -> dict:
    messages = [{**m, "content": m["content"].replace(VIDEO, "<image>")} for m in from_llava(conversations)]
    if not any("<image>" in m["content"] for m in messages):
        messages[0] = {**messages[0], "content": "<image>\n" + messages[0]["content"]}
    return {"images": [clip], "messages": messages}


class _Answers:
    """A moving-shapes conversation's answers recomputed from the clip's tracks: as it plays (traced) or
    played backwards.  Backwards, the description is the reversed tracks' caption, each answer `answer_of`
    the reversed tracks; a question it cannot recompute (before or after: its events change name when
    time runs backwards; an order the reversal ties) is left out, and a static one keeps its answer."""

    def __init__(self, root: Path, split: str, traces: bool, trace_style: str = "frames"):
        ann = root / "annotations"
        self.clips = {c.video_id: c for c in read_clips(ann / f"captions_{split}.json", root / "videos" / split)}
        self.qa = {(q["video_id"], q["question"]): q
                   for q in json.loads((ann / f"qa_{split}.json").read_text(encoding="utf-8"))}
        self.asked: dict[str, list[dict]] = {}  # each clip's questions, in the world's order
        for q in self.qa.values():
            self.asked.setdefault(q["video_id"], []).append(q)
        self.traces, self.trace_style = traces, trace_style

    def _question(self, stem: str, human: dict) -> dict:
        return self.qa[(stem, human["value"].replace(VIDEO, "").strip())]

    def _answer(self, q: dict, answer: str, clip, tracks: list[dict]) -> str:
        if not self.traces:
            return answer
        return traced(answer, answer_trace(q["question_type"], q["shapes"], tracks, clip.width, self.trace_style))

    def as_played(self, record: dict) -> list[dict]:
        stem, kind = record["id"].rsplit("_", 1)
        turns = record["conversations"]
        if kind == "describe":
            return turns
        clip = self.clips[stem]
        return [t if t["from"] == "human" else
                {**t, "value": self._answer(self._question(stem, h), t["value"], clip, clip.tracks)}
                for h, t in zip([None] + turns[:-1], turns)]

    def every_question(self, record: dict) -> dict:
        """A clip's question record asking all its questions, in an order fixed by its name."""
        stem, kind = record["id"].rsplit("_", 1)
        if kind == "describe" or stem not in self.asked:
            return record
        qs = self.asked[stem]
        turns = _turns([qs[k] for k in np.random.default_rng(zlib.crc32(stem.encode())).permutation(len(qs))])
        turns[0] = {**turns[0], "value": f"{VIDEO}\n{turns[0]['value']}"}
        return {**record, "conversations": turns}

    def still(self, record: dict) -> list[dict] | None:
        """The still twin's conversation, beside a clip's question record: every static question the world
        asks of the clip (qa_{split}.json, not only those its conversation picked), or None if it has none."""
        stem, kind = record["id"].rsplit("_", 1)
        if kind == "describe":
            return None
        return _turns([q for q in self.asked.get(stem, []) if q["answer_type"] == "static"]) or None

    def reversed(self, record: dict) -> list[dict] | None:
        """The twin's conversations, or None when the reversal changes no answer (nothing to learn)."""
        stem, kind = record["id"].rsplit("_", 1)
        clip = self.clips[stem]
        back = reverse_tracks(clip.tracks)
        turns, changed = record["conversations"], False
        if kind == "describe":
            caption = video_caption(back)
            text = f"{caption[0].upper()}{caption[1:]}."
            return [turns[0], {**turns[1], "value": text}] if text != turns[1]["value"] else None
        out = []
        for human, gpt in zip(turns[::2], turns[1::2]):
            q = self._question(stem, human)
            answer = answer_of(q["question_type"], q["shapes"], back, not clip.reversed)
            if answer is None and q["answer_type"] == "temporal":  # before/after, or an order the reversal ties
                continue
            answer = q["answer"] if answer is None else answer
            changed |= answer != gpt["value"]
            out += [{**human, "value": human["value"].replace(f"{VIDEO}\n", "")},
                    {**gpt, "value": self._answer(q, answer, clip, back)}]
        return out if changed else None


def _turns(questions: list[dict]) -> list[dict]:
    """World questions as LLaVA-Video turns: each question, then its answer."""
    return [turn for q in questions for turn in ({"from": "human", "value": q["question"]},
                                                 {"from": "gpt", "value": q["answer"]})]


def stream_video_conversations(data_cfg, root: Path, tokenizer, template: str, transform: ImageTransform,
                               num_frames: int, clip_tokens: int, context_length: int, seed: int) -> ShardStream:
    """The training split's shards of LLaVA-Video records as a stream (`data.stream`): each sample a clip (its
    video member) and the record (`conversations` with a `<video>` placeholder) as its .json."""
    files, _ = split_files(data_cfg, root, "train")
    decode = StreamVideoConversations(tokenizer, template, transform, num_frames, clip_tokens, context_length)
    return ShardStream(files, decode, seed=seed, shuffle_buffer=data_cfg.shuffle_buffer, usable=video_usable)


class StreamVideoConversations:
    """A stream's decoder: a shard sample -> the item ConversationDataset gives for the record with its clip
    (`video_records`' reading of the JSON file's), or the bad-sample record."""

    def __init__(self, tokenizer, template: str, transform: ImageTransform, num_frames: int, clip_tokens: int,
                 context_length: int):
        self.tokenizer, self.template, self.transform, self.num_frames = tokenizer, template, transform, num_frames
        self.clip_tokens, self.context_length = clip_tokens, context_length

    def __call__(self, s: ShardSample) -> dict:
        got = shard_record(s, "video")
        if isinstance(got, dict):
            return got
        name, messages = got
        encoded = encode_sample(self.tokenizer, self.template, messages, 1, self.clip_tokens, self.context_length)
        if isinstance(encoded, str):
            return {"error": encoded, "message": f"{name} dropped: {DROP_REASONS[encoded]}"}
        try:
            pixels = clip_pixels(s.member(VIDEO_EXTS), self.num_frames, self.transform, name=name)
        except VideoError as e:
            return {"error": e.reason, "message": str(e)}
        return {"input_ids": encoded[0], "labels": encoded[1], "pixel_values": [pixels]}
