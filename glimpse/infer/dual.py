"""Using a dual encoder: embed images and texts, zero-shot classify.  What `glimpse.load`
returns for a CLIP-style run, and what evaluation and the image index are built on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from glimpse.data.images import ImageError, ImageTransform, load_image
from glimpse.data.tokenizer import Tokenizer
from glimpse.models.dual_encoder import DualEncoder

DEFAULT_TEMPLATES = ["a {}", "a photo of a {}"]


class DualEncoderPipeline:
    def __init__(self, model: DualEncoder, tokenizer: Tokenizer, transform: ImageTransform,
                 max_pixels: int = 40_000_000, templates: list[str] | None = None):
        self.model, self.tokenizer, self.transform = model, tokenizer, transform
        self.max_pixels = max_pixels
        self.templates = templates or DEFAULT_TEMPLATES

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text embeddings [N, E]."""
        self.model.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenizer.batch(texts[i : i + batch_size], self.model.cfg.text.context_length)
            out.append(self.model.get_text_features(ids.to(self.device), mask.to(self.device)).float())
        return F.normalize(torch.cat(out), dim=-1) if out else torch.zeros(0, self.model.cfg.embed_dim)

    @torch.no_grad()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return F.normalize(self.model.get_image_features(pixel_values.to(self.device)).float(), dim=-1)

    def embed_images(self, images: list, batch_size: int = 256) -> torch.Tensor:
        """Normalised image embeddings [N, E]; images are paths, bytes or PIL images.
        A bad image raises ImageError naming it."""
        embeds, _, _ = self.embed_image_stream(images, batch_size, skip_bad=False)
        return embeds

    def embed_image_stream(self, images: Iterable, batch_size: int = 256, skip_bad: bool = True, progress=None):
        """Embed many images; with skip_bad, bad ones are left out and counted by reason.
        Returns (embeddings [n_ok, E], indices of the good inputs, Counter of failure reasons)."""
        embeds, good, failures, pending = [], [], Counter(), []

        def flush():
            if pending:
                embeds.append(self.embed_pixels(torch.stack([p for _, p in pending])))
                good.extend(i for i, _ in pending)
                pending.clear()

        for i, img in enumerate(images):
            try:
                pending.append((i, self.transform(load_image(img, max_pixels=self.max_pixels))))
            except ImageError as e:
                if not skip_bad:
                    raise
                failures[e.reason] += 1
                if progress is not None:
                    progress.write(f"skipped {e}")
            if len(pending) == batch_size:
                flush()
            if progress is not None:
                progress.update(1)
        flush()
        emb = torch.cat(embeds) if embeds else torch.zeros(0, self.model.cfg.embed_dim)
        return emb, good, failures

    def class_embeddings(self, labels: list[str], templates: list[str] | None = None) -> torch.Tensor:
        """One embedding per label: the normalised mean over prompt templates (CLIP's ensembling)."""
        templates = templates or self.templates
        emb = self.embed_texts([t.format(label) for label in labels for t in templates])
        return F.normalize(emb.view(len(labels), len(templates), -1).mean(1), dim=-1)

    def classify(self, images: list, labels: list[str], templates: list[str] | None = None,
                 return_probs: bool = False):
        """Zero-shot: the best label for each image (and, if asked, the softmax over labels [N, L])."""
        sim = self.embed_images(images) @ self.class_embeddings(labels, templates).T
        probs = (self.model.logit_scale.exp().clamp(max=100).item() * sim).softmax(-1)
        best = [labels[i] for i in probs.argmax(-1).tolist()]
        return (best, probs) if return_probs else best
