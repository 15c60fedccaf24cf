"""Using a video dual encoder: embed clips and texts, and rank clips for a text.  What `glimpse.load`
returns for a video_clip run."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from glimpse.data.video import DEFAULT_LIMITS, VideoLimits, decode_clip, to_pixels


class VideoClipPipeline:
    def __init__(self, model, tokenizer, transform, limits: VideoLimits = DEFAULT_LIMITS):
        self.model, self.tokenizer, self.transform, self.limits = model, tokenizer, transform, limits

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_frames(self) -> int:
        return self.model.cfg.num_frames

    def decode(self, video) -> np.ndarray:
        """A clip (a path or bytes) as uint8 frames [T, S, S, 3]; a bad file raises VideoError."""
        return decode_clip(video, self.num_frames, self.transform, self.limits)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text embeddings [N, E]."""
        self.model.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenizer.batch(texts[i:i + batch_size], self.model.cfg.text.context_length)
            out.append(self.model.get_text_features(ids.to(self.device), mask.to(self.device)).float())
        return F.normalize(torch.cat(out), dim=-1) if out else torch.zeros(0, self.model.cfg.embed_dim)

    @torch.no_grad()
    def embed_frames(self, clips: list[np.ndarray]) -> torch.Tensor:
        """Normalised clip embeddings [N, E] of decoded clips (uint8 [T, S, S, 3], the same T in a call)."""
        self.model.eval()
        pixels = torch.stack([to_pixels(c, self.transform) for c in clips]).to(self.device)
        return F.normalize(self.model.get_video_features(pixels).float(), dim=-1)

    def embed_videos(self, videos: list, batch_size: int = 64) -> torch.Tensor:
        """Normalised embeddings [N, E] of video files (paths or bytes)."""
        out = [self.embed_frames([self.decode(v) for v in videos[i:i + batch_size]])
               for i in range(0, len(videos), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.model.cfg.embed_dim)

    def rank(self, text: str, videos: list) -> list[tuple[int, float]]:
        """The videos ranked for a text: (index, cosine score), best first."""
        scores = (self.embed_videos(videos) @ self.embed_texts([text]).T)[:, 0]
        return [(i, scores[i].item()) for i in scores.argsort(descending=True).tolist()]
