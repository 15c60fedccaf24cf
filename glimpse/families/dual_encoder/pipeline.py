"""Using a dual encoder: embed images and texts, zero-shot classify.  What `glimpse.load`
returns for a CLIP-style run, and what evaluation and the image index are built on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from glimpse.data.images import ImageError, ImageTransform, load_image
from glimpse.data.tokenizer import Tokenizer
from glimpse.errors import GlimpseError
from glimpse.explain.core import DEFAULT_METHOD, Explanation, explain
from glimpse.explain.explainers import DualEncoderExplainer
from glimpse.families.dual_encoder.model import DualEncoder

DEFAULT_TEMPLATES = ["a {}", "a photo of a {}"]


class DualEncoderPipeline:
    def __init__(self, model: DualEncoder, tokenizer: Tokenizer, transform: ImageTransform,
                 max_pixels: int = 40_000_000, templates: list[str] | None = None, ensemble: str = "mean"):
        self.model, self.tokenizer, self.transform = model, tokenizer, transform
        self.max_pixels = max_pixels
        self.templates = templates or DEFAULT_TEMPLATES
        self.ensemble = ensemble

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

    def class_scores(self, image_embeds: torch.Tensor, labels: list[str], templates: list[str] | None = None,
                     ensemble: str | None = None) -> torch.Tensor:
        """Cosine scores [N, L] of images against labels, over prompt templates.  "mean": CLIP's
        ensembling (the normalised mean prompt embedding); "max": the best-matching prompt of each
        label, for templates that spell out different variants (sizes, positions) of one class."""
        templates = templates or self.templates
        ensemble = ensemble or self.ensemble
        if ensemble not in ("mean", "max"):
            raise ValueError(f"prompt ensemble {ensemble!r} must be mean or max")
        emb = self.embed_texts([t.format(label) for label in labels for t in templates])
        emb = emb.view(len(labels), len(templates), -1)  # [L, T, E]
        if ensemble == "mean":
            return image_embeds @ F.normalize(emb.mean(1), dim=-1).T
        return torch.einsum("ne,lte->nlt", image_embeds, emb).max(-1).values

    def classify(self, images: list, labels: list[str], templates: list[str] | None = None,
                 return_probs: bool = False):
        """Zero-shot: the best label for each image (and, if asked, the softmax over labels [N, L])."""
        sim = self.class_scores(self.embed_images(images), labels, templates)
        probs = (self.model.logit_scale.exp().clamp(max=100).item() * sim).softmax(-1)
        best = [labels[i] for i in probs.argmax(-1).tolist()]
        return (best, probs) if return_probs else best

    explains = "texts"  # what glimpse.explain's evaluation asks this pipeline about

    def explain(self, images: list, texts: list[str], method: str = DEFAULT_METHOD) -> list[Explanation]:
        """Why image i and text i are similar: relevance per image patch and per text token, by `method`
        (glimpse.explain.METHODS)."""
        if len(images) != len(texts):
            raise GlimpseError(f"{len(images)} images but {len(texts)} texts: explain pairs them one to one")
        return [explain(self.explainer(image, text), method) for image, text in zip(images, texts)]

    def explainer(self, image, text: str) -> DualEncoderExplainer:
        self.model.eval()
        pixels = self.transform(load_image(image, max_pixels=self.max_pixels))[None].to(self.device)
        ids, mask = self.tokenizer.batch([text], self.model.cfg.text.context_length)
        return DualEncoderExplainer(self.model, pixels, ids.to(self.device), mask.to(self.device),
                                    self.tokenizer.pieces(ids[0].tolist()), text)
