"""What glimpse.load returns for an image tokenizer: images to code grids and back."""

from __future__ import annotations

import torch
from PIL import Image

from glimpse.data.images import DEFAULT_MAX_PIXELS, ImageTransform, load_image, to_uint8
from glimpse.models.vq import VQModel


class VQPipeline:
    def __init__(self, vq: VQModel, transform: ImageTransform, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.model, self.transform, self.max_pixels = vq, transform, max_pixels

    def _pixels(self, images: list) -> torch.Tensor:
        device = next(self.model.parameters()).device
        loaded = [load_image(im, max_pixels=self.max_pixels) for im in images]
        return torch.stack([self.transform(im) for im in loaded]).to(device)

    @torch.no_grad()
    def tokens(self, images: list) -> torch.Tensor:
        """Code grids [N, h, w] ([N, h, w, G] with codebook groups) of images (paths, bytes or PIL images)."""
        self.model.eval()
        return self.model.tokens(self._pixels(images))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """PIL images of code grids [N, h, w] (or [N, h * w]); with codebook groups [N, h, w, G] (or [N, h * w * G])."""
        self.model.eval()
        device = next(self.model.parameters()).device
        return [Image.fromarray(a) for a in to_uint8(self.model.decode_tokens(tokens.to(device)))]

    def reconstruct(self, images: list) -> list[Image.Image]:
        return self.decode(self.tokens(images))
