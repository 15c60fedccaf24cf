"""OpenAI-style chat messages: content parts (text, image_url, image) as glimpse's text with one
`<image>` per image plus the images, in order.  Images come as base64 `data:` URLs (nothing is
fetched here) or, from Python, as paths, bytes or PIL images."""

from __future__ import annotations

import base64
import binascii

from glimpse.errors import GlimpseError

IMAGE = "<image>"


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:` URL; other URLs are refused (nothing is fetched)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise GlimpseError("images must be given as base64 data: URLs (remote and file URLs are not fetched)")
    head, _, payload = url.partition(",")
    if not head.endswith(";base64"):
        raise GlimpseError("a data: URL image must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise GlimpseError("the data: URL holds invalid base64") from None


def content_parts(content) -> list:
    """An OpenAI-style message content (a string, or a list of text / image_url / image parts) as its
    parts in order: text strings and ("image", image) pairs.  A literal "<image>" in user text is
    removed, so text alone can never claim an image."""
    if isinstance(content, str):
        return [content.replace(IMAGE, "")]
    if not isinstance(content, list):
        raise GlimpseError("message content must be a string or a list of parts")
    parts: list = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"].replace(IMAGE, ""))
        elif kind == "image_url":
            url = part.get("image_url")
            parts.append(("image", decode_data_url(url.get("url") if isinstance(url, dict) else url)))
        elif kind == "image" and part.get("image") is not None:  # Python callers: a path, bytes or PIL image
            parts.append(("image", part["image"]))
        else:
            raise GlimpseError(f"unknown message part {part!r:.80}: use text, image_url or image parts")
    return parts


def split_content(content) -> tuple[str, list]:
    """A message content as (text with one <image> per image, parts joined by newlines; the images)."""
    if isinstance(content, str):
        return content.replace(IMAGE, ""), []
    parts = content_parts(content)
    return "\n".join(IMAGE if isinstance(p, tuple) else p for p in parts), [p[1] for p in parts if isinstance(p, tuple)]


def user_message(images: list, text: str) -> dict:
    """An OpenAI-style user turn: the images (paths, bytes or PIL images) first, then the text."""
    return {"role": "user", "content": [{"type": "image", "image": im} for im in images] +
            [{"type": "text", "text": text}]}
