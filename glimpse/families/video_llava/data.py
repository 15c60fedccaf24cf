"""What the video LLaVA reads: LLaVA-Video conversations (`<video>` placeholders) over clips, as the
records of glimpse.data.conversations (LLaVA's)."""

from __future__ import annotations

import json
from pathlib import Path

from glimpse.data.chat import from_llava
from glimpse.errors import GlimpseError

VIDEO = "<video>"


def video_records(data_cfg, root: Path, split: str) -> list[dict]:
    """A split's conversations as {"images": [clip path], "messages": [...]}, `<video>` read as the
    `<image>` slot that the clip's tokens fill (LLaVA-Video's JSON: id, video, conversations)."""
    if data_cfg.source == "shapes-video":
        path, base = Path(root) / "annotations" / f"llava_video_{split}.json", Path(root)
    else:
        if split not in data_cfg.files:
            raise GlimpseError(f"no data.files.{split} in the recipe (a LLaVA-Video JSON; --set data.files.{split}=PATH)")
        path = Path(data_cfg.root or ".") / data_cfg.files[split]
        base = Path(data_cfg.root or ".") / data_cfg.images.get(split, str(path.parent))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = []
        for r in data:
            messages = from_llava(r["conversations"])
            messages = [{**m, "content": m["content"].replace(VIDEO, "<image>")} for m in messages]
            if not any("<image>" in m["content"] for m in messages):
                messages[0] = {**messages[0], "content": "<image>\n" + messages[0]["content"]}
            records.append({"images": [str(base / r["video"])], "messages": messages})
        return records
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GlimpseError(f"cannot read the video conversations of {path}: {e!r}") from None
