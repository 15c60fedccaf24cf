"""What a request brings, read under the server's limits before it is queued: its text counted, its
images fetched (data: URLs, or allowlisted hosts through a RemoteImageFetcher), decoded a few at a time
server-wide within the request's pixel budget and shrunk to the model's input size, its videos decoded
within the frame and duration limits, and a chat request's messages built into the model's prompt.
Everything a client can fix is a 400 here (APIError), so the model worker only sees requests that run.
"""

from __future__ import annotations

import threading

from PIL import Image

from glimpse.data.images import ImageError, load_image
from glimpse.data.messages import decode_data_url
from glimpse.data.video import VideoLimits
from glimpse.errors import GlimpseError
from glimpse.serve.guards import APIError, ServerLimits
from glimpse.serve.schemas import ChatCompletionRequest


class RequestReader:
    def __init__(self, pipeline, model_name: str, limits: ServerLimits, remote=None):
        self.pipeline, self.model_name, self.limits, self.remote = pipeline, model_name, limits, remote
        self.decoding = threading.BoundedSemaphore(limits.max_decoding)  # images decoded at once, server-wide
        self.transform = getattr(pipeline, "transform", None)  # the model's input size, to shrink images to
        self.reads_video = hasattr(pipeline, "load_video")  # a video model's content parts are video_url

    def check_text(self, texts, param: str) -> None:
        """Refuse a request whose text is over the character limit before anything tokenizes it."""
        if sum(len(t) for t in texts) > self.limits.max_request_chars:
            raise APIError(400, f"the request's text is over the {self.limits.max_request_chars:,}-character limit",
                           param=param)

    def fetch_image(self, url: str) -> bytes:
        scheme = url.split(":", 1)[0].lower()
        if url.startswith("data:"):
            data = decode_data_url(url)
        elif scheme in ("http", "https") and self.remote is not None:
            data = self.remote.fetch(url)
        elif scheme in ("http", "https"):
            raise GlimpseError("remote image URLs are disabled on this server: send the image as a base64 "
                               "data: URL")
        else:
            raise GlimpseError("images must be base64 data: URLs (file: and other URLs are refused)")
        if len(data) > self.limits.max_image_bytes:
            raise GlimpseError(f"an image is over the {self.limits.max_image_bytes}-byte limit")
        return data

    def read_video(self, url: str):
        """One of a request's videos as the model's input: its sampled frames, decoded within the limits."""
        limits = self.limits
        data = decode_data_url(url) if url.startswith("data:") else None
        if data is None:
            raise GlimpseError("videos must be base64 data: URLs (data:video/mp4;base64,...); no URL is fetched")
        if len(data) > limits.max_video_bytes:
            raise GlimpseError(f"a video is over the {limits.max_video_bytes}-byte limit")
        with self.decoding:
            return self.pipeline.load_video(data, VideoLimits(
                max_bytes=limits.max_video_bytes, max_pixels=limits.max_image_pixels,
                max_duration=float(limits.max_video_seconds), max_decoded=limits.max_video_frames))

    def read_image(self, url: str, budget: list[int], name: str):
        """One of a request's images: decoded within what is left of the request's pixel budget, a few at a
        time server-wide, and shrunk at once to the model's input size (what the model sees, unchanged),
        so that a waiting request holds kilobytes, not the decoded original."""
        limits = self.limits
        data = self.fetch_image(url)
        with self.decoding:
            try:
                image = load_image(data, max_pixels=min(limits.max_image_pixels, budget[0]), name=name)
            except ImageError as e:
                if e.reason == "oversized" and budget[0] < limits.max_image_pixels:
                    raise GlimpseError(f"the request's images are over its budget of {limits.max_request_pixels:,} "
                                       "decoded pixels") from None
                raise
            budget[0] -= image.width * image.height
            return Image.fromarray(self.transform.resized_array(image)) if self.transform is not None else image

    def build_prompt(self, body: ChatCompletionRequest):
        """(ids, images) of a chat request, its images decoded and shrunk; 400s for what cannot run."""
        limits = self.limits
        messages, n_images, budget = [], 0, [limits.max_request_pixels]
        for i, m in enumerate(body.messages):
            role = "system" if m.role == "developer" else m.role
            if isinstance(m.content, str):
                messages.append({"role": role, "content": m.content})
                continue
            parts = []
            for part in m.content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    continue
                n_images += 1
                if n_images > limits.max_images:
                    raise APIError(400, f"too many images: at most {limits.max_images} per request",
                                   param="messages")
                video = part.type == "video_url"
                if video != self.reads_video:
                    wants = "videos: send video_url" if self.reads_video else "images: send image_url"
                    raise APIError(400, f"{self.model_name} reads {wants} parts", param=f"messages.{i}.content")
                try:
                    image = self.read_video(part.video_url.url) if video else \
                        self.read_image(part.image_url.url, budget, f"#{n_images}")
                except GlimpseError as e:
                    raise APIError(400, str(e), param=f"messages.{i}.content") from None
                parts.append({"type": "image", "image": image})
            messages.append({"role": role, "content": parts})
        try:
            return self.pipeline.chat_prompt(messages)
        except GlimpseError as e:
            raise APIError(400, str(e), param="messages") from None
