"""Using a video LLaVA: ask about clips and caption them.  What `glimpse.load` returns for a video_llava
run; LLaVA's pipeline with clips (paths, bytes, or decoded [T, 3, H, W] frames) where images were."""

from __future__ import annotations

import torch

from glimpse.data.messages import IMAGE
from glimpse.data.video import DEFAULT_LIMITS, VideoLimits, clip_pixels
from glimpse.infer.vision_language import VisionLanguagePipeline

DESCRIBE = "describe what happens in the video."


class VideoLanguagePipeline(VisionLanguagePipeline):
    explains = None  # LLaVA's explanations trace one image; a clip's frames (per-frame relevance) are not built

    def __init__(self, model, tokenizer, transform, limits: VideoLimits = DEFAULT_LIMITS):
        super().__init__(model, tokenizer, transform)
        self.limits = limits

    def load_pixels(self, src) -> torch.Tensor:
        """A clip as [T, 3, S, S]: its uniform frames; a bad file raises VideoError."""
        return self.load_video(src)

    def load_video(self, src, limits: VideoLimits | None = None) -> torch.Tensor:
        """A clip (a path, bytes or a decoded [T, 3, S, S] tensor) as the model's input, decoded within
        `limits` (the pipeline's own by default; the server passes its stricter ones)."""
        return clip_pixels(src, self.model.cfg.num_frames, self.transform, limits or self.limits)

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids: each `<image>` marker is the clip slot's own token (a LLaVA-NeXT-Video
        folder's `<video>`), expanded to the clip's tokens."""
        slot = self.tokenizer.hf.id_to_token(self.tokenizer.ids["image"])
        return super().encode(text.replace(IMAGE, slot) if slot and slot != IMAGE else text)

    def caption(self, videos: list, prompt: str = DESCRIBE, max_new_tokens: int = 48, **options) -> list[str]:
        return super().caption(videos, prompt, max_new_tokens, **options)
