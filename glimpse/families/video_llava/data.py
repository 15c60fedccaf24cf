"""What the video LLaVA reads: LLaVA-Video conversations (`<video>` placeholders) over clips, as the
records of glimpse.data.conversations (LLaVA's).

A training clip of the moving-shapes world can come with its reversed twin (`model.reverse_twins`): the
same frames played backwards, with the description and the answers recomputed from the world's tracks
as the reversal plays.  The twin's frames are the clip's own, so an order-blind model can tell the two
apart only by the frame positions: it scores exactly the same on both, and the loss pays only for
reading the order (without twins the LM memorised its 4,000 clips' answers instead, docs/results.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from glimpse.data.chat import from_llava
from glimpse.data.shapes_video import answer_of, read_clips, reverse_tracks, video_caption
from glimpse.errors import GlimpseError

VIDEO = "<video>"
REVERSED = "#reversed"  # a clip path with this suffix is the clip played backwards (see `reversed_source`)


def reversed_source(src) -> tuple[object, bool]:
    """(the clip's own source, whether to play it backwards) for a record's clip."""
    if isinstance(src, str) and src.endswith(REVERSED):
        return src[:-len(REVERSED)], True
    return src, False


def video_records(data_cfg, root: Path, split: str, twins: bool = False) -> list[dict]:
    """A split's conversations as {"images": [clip path], "messages": [...]}, `<video>` read as the
    `<image>` slot that the clip's tokens fill (LLaVA-Video's JSON: id, video, conversations); with
    `twins`, each moving-shapes clip's reversed twin after its own records."""
    if data_cfg.source == "shapes-video":
        path, base = Path(root) / "annotations" / f"llava_video_{split}.json", Path(root)
    else:
        if split not in data_cfg.files:
            raise GlimpseError(f"no data.files.{split} in the recipe (a LLaVA-Video JSON; --set data.files.{split}=PATH)")
        path = Path(data_cfg.root or ".") / data_cfg.files[split]
        base = Path(data_cfg.root or ".") / data_cfg.images.get(split, str(path.parent))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        reverse = _Reverser(Path(root), split) if twins and data_cfg.source == "shapes-video" else None
        records = []
        for r in data:
            records.append(_record(r["conversations"], str(base / r["video"])))
            twin = reverse(r) if reverse else None
            if twin:
                records.append(_record(twin, str(base / r["video"]) + REVERSED))
        return records
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GlimpseError(f"cannot read the video conversations of {path}: {e!r}") from None


def _record(conversations: list[dict], clip: str) -> dict:
    messages = [{**m, "content": m["content"].replace(VIDEO, "<image>")} for m in from_llava(conversations)]
    if not any("<image>" in m["content"] for m in messages):
        messages[0] = {**messages[0], "content": "<image>\n" + messages[0]["content"]}
    return {"images": [clip], "messages": messages}


class _Reverser:
    """A moving-shapes conversation as its clip played backwards shows it: the description is the reversed
    tracks' caption, each answer `answer_of` the reversed tracks; a question it cannot recompute (before or
    after: its events change name when time runs backwards; an order the reversal ties) is left out, and a
    static one keeps its answer."""

    def __init__(self, root: Path, split: str):
        ann = root / "annotations"
        self.clips = {c.video_id: c for c in read_clips(ann / f"captions_{split}.json", root / "videos" / split)}
        self.qa = {(q["video_id"], q["question"]): q
                   for q in json.loads((ann / f"qa_{split}.json").read_text(encoding="utf-8"))}

    def __call__(self, record: dict) -> list[dict] | None:
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
            q = self.qa[(stem, human["value"].replace(VIDEO, "").strip())]
            answer = answer_of(q["question_type"], q["shapes"], back, not clip.reversed)
            if answer is None and q["answer_type"] == "temporal":  # before/after, or an order the reversal ties
                continue
            answer = q["answer"] if answer is None else answer
            changed |= answer != gpt["value"]
            out += [{**human, "value": human["value"].replace(f"{VIDEO}\n", "")}, {**gpt, "value": answer}]
        return out if changed else None
