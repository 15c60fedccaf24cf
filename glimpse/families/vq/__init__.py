"""Image tokenizers: a convolutional VQ-VAE that turns an image into a grid of codes and back
(taming's VQGAN without the GAN and LPIPS, in diffusers' VQModel layout), the first half of
text-to-image in the DALL-E style (the prior is glimpse/families/text_to_image).

    model.py      VQTokenizer (VQTokenizerConfig): the VQ-VAE with k-means initialisation and dead-code restarts
    pipeline.py   what glimpse.load returns: tokens, decode, reconstruct
    evaluate.py   reconstruction figures: the scene parser's accuracy, PSNR, codebook usage over a split
    hf.py         diffusers VQModel folders in and out
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse.data.images import decode_each, split_failures
from glimpse.data.pairs import PairDataset, first_images, load_pairs, stream_images
from glimpse.families import checks
from glimpse.families.base import Family, HFBuild, Loaded, vq_transform
from glimpse.families.registry import register
from glimpse.families.vq import hf
from glimpse.families.vq.evaluate import evaluate_tokenizer
from glimpse.families.vq.model import VQTokenizer, VQTokenizerConfig
from glimpse.families.vq.pipeline import VQPipeline
from glimpse.models.vq import VQModel
from glimpse.schema import check


class ImageCollate:
    """Stacks the good samples' pixels (captions are not read) and reports the bad ones in order."""

    def __call__(self, samples: list[dict]) -> dict:
        good, batch = split_failures(samples)
        if good:
            batch["pixel_values"] = torch.stack([s["pixel_values"] for s in good])
        return batch


@register
class VQFamily(Family):
    name = "vq"
    config = VQTokenizerConfig
    hf_class_names = hf.CLASS_NAMES  # diffusers folders: config.json's _class_name (they have no model_type)
    streams = True  # image shards (data.source wds), captioned or not: a tokenizer reads images alone

    @classmethod
    def validate(cls, recipe) -> None:
        m = recipe.model
        checks.check_vq(m.vq, "model.vq")
        check(m.vq.sample_size == recipe.data.image_size or recipe.data.source != "shapes", "model.vq.sample_size",
              m.vq.sample_size, f"must be the world's image size ({recipe.data.image_size})")
        check(m.restart_after >= 0, "model.restart_after", m.restart_after, "must be 0 (never) or more steps")
        check(m.quantize_after >= 0, "model.quantize_after", m.quantize_after, "must be 0 or more batches")
        check(m.kmeans_images >= 1, "model.kmeans_images", m.kmeans_images, "must be at least 1")

    def __init__(self, recipe, root: Path, tokenizer):
        super().__init__(recipe, root, tokenizer)
        self.transform = vq_transform(recipe.model.vq)

    def build_model(self) -> nn.Module:
        return VQTokenizer(self.recipe.model)

    @torch.no_grad()
    def prepare(self, model: VQTokenizer, device: torch.device, progress: bool = True) -> None:
        """k-means initialisation of the codebook, once (a resumed run keeps its codebook); after an
        autoencoder warm-up the model runs it itself, on the warm-up's latents."""
        m = self.recipe.model
        if not m.kmeans_init or m.quantize_after or bool(model.initialised):
            return
        d = self.recipe.data
        sources = first_images(d, self.root, m.kmeans_images) if d.stream else \
            [it.image for it in load_pairs(d, self.root, "train")[: m.kmeans_images]]
        latents = []
        for start in range(0, len(sources), 128):
            _, images, _ = decode_each(sources[start:start + 128], d.max_pixels)
            if images:
                z = model.vq.encode(torch.stack([self.transform(im) for im in images]).to(device))
                latents.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu())
        if latents:
            model.kmeans_init(torch.cat(latents), seed=self.recipe.train.seed)

    def train_data(self):
        if self.recipe.data.stream:
            return stream_images(self.recipe.data, self.root, self.transform, self.recipe.train.seed), ImageCollate()
        items = load_pairs(self.recipe.data, self.root, "train")
        return PairDataset(items, self.transform, self.recipe.data.max_pixels), ImageCollate()

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["pixel_values"])

    def pipeline(self, model: VQTokenizer) -> VQPipeline:
        return VQPipeline(model.vq, self.transform, self.recipe.data.max_pixels)

    def evaluate(self, model: VQTokenizer, splits: list[str]) -> dict[str, float]:
        model.eval()
        e = self.recipe.eval
        return evaluate_tokenizer(model.vq, self.transform, self.root, splits, e.batch_size, e.vqa_limit,
                                  self.recipe.data.max_pixels)

    # -- diffusers VQModel folders ----------------------------------------------------------------
    def to_hf(self, model: VQTokenizer) -> hf.DiffusersFolder:
        return hf.to_hf_folder(model.vq)

    @classmethod
    def hf_build(cls, folder: Path, config: dict) -> HFBuild:
        return hf.build(folder, config)

    @classmethod
    def hf_part(cls, folder: Path, config: dict, target: nn.Module) -> tuple[list, dict, tuple]:
        return hf.part(folder, config, target)

    @classmethod
    def hf_inputs(cls, folder: Path, model: VQModel, tokenizer):
        return tokenizer, vq_transform(model.cfg)  # pixels in [-1, 1] at sample_size

    @classmethod
    def hf_pipeline(cls, loaded: Loaded) -> VQPipeline:
        return VQPipeline(loaded.model, loaded.transform)


__all__ = ["VQFamily", "VQTokenizer", "VQTokenizerConfig", "VQPipeline"]
