"""Text-to-image in the DALL-E style: a prior generates an image tokenizer's codes from the per-token
text states of a frozen CLIP, and CLIP re-ranks the candidates.  The tokenizer (a `vq` run) and the
CLIP (a `dual_encoder` run) come in through the recipe's `init_parts` and stay frozen; the training
images are encoded into codes once, before the first step (or, streamed from image-caption shards,
batch by batch in the loss).

    model.py      TextToImage (TextToImageConfig): clip + vq + prior (maskgit or autoregressive)
    data.py       the code table of the training images and the caption pairs read from it
    sampling.py   MaskGIT's iterative unmasking, autoregressive sampling with a KV cache, guidance
    pipeline.py   what glimpse.load returns: generate_images
    evaluate.py   scene-parser accuracy, CLIP-R-precision, hard R-precision, CLIP score, FD on CLIP features
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.data.pairs import stream_pairs
from glimpse.data.world import read_scenes
from glimpse.errors import GlimpseError
from glimpse.families import checks
from glimpse.families.base import Family, recipe_transform, vq_transform
from glimpse.families.registry import register
from glimpse.families.text_to_image.data import CodeCollate, CodeDataset, encode_codes
from glimpse.families.text_to_image.evaluate import evaluate_text_to_image
from glimpse.families.text_to_image.model import PRIORS, TextToImage, TextToImageConfig
from glimpse.families.text_to_image.pipeline import TextToImagePipeline
from glimpse.schema import check, choice

IGNORE = -100


@register
class TextToImageFamily(Family):
    name = "text_to_image"
    config = TextToImageConfig
    streams = True  # image-caption shards, encoded batch by batch; evaluation needs the shapes world's parser

    @classmethod
    def validate(cls, recipe) -> None:
        m = recipe.model
        choice("model.kind", m.kind, PRIORS)
        checks.check_towers(m.clip)
        checks.check_vq(m.vq, "model.vq")
        checks.check_decoder(m.prior, "model.prior")
        check(m.prior.arch == "gpt2", "model.prior.arch", m.prior.arch, "must be gpt2 (learned positions over the grid)")
        check(0.0 <= m.cond_drop < 1.0, "model.cond_drop", m.cond_drop, "must be in [0, 1)")
        check(m.steps >= 1, "model.steps", m.steps, "must be at least 1")
        check(m.candidates >= 1, "model.candidates", m.candidates, "must be at least 1")
        d, e = recipe.data, recipe.eval
        check(d.source == "shapes" or (d.source == "wds" and d.stream), "data.source", d.source,
              "must be shapes (the prior is judged by its scene parser), or wds with data.stream true")
        if d.stream:
            check(not e.splits and not e.during_train, "eval.splits/during_train", [*e.splits, *e.during_train],
                  "the prior is judged by the shapes world's scene parser: set eval.splits=[] and eval.during_train=[]")
            check(m.caption_drop == 0, "model.caption_drop", m.caption_drop,
                  "describes the world's scenes: set it 0 with data.stream")
        for part in ("clip", "vq"):
            check(part in recipe.freeze, "freeze", recipe.freeze, f"must hold {part}: the prior reads a fixed {part}")

    def __init__(self, recipe, root: Path, tokenizer):
        super().__init__(recipe, root, tokenizer)
        m = recipe.model
        m.prior.vocab_size = m.vq.num_vq_embeddings * m.vq.codebook_groups + 1
        m.prior.cross_attention = True
        m.prior.bidirectional = m.kind == "maskgit"
        m.prior.context_length = m.vq.tokens_per_image + (m.kind == "autoregressive")
        m.clip.text.vocab_size = m.clip.text.vocab_size or tokenizer.vocab_size
        self.transform = recipe_transform(recipe, m.clip.vision)  # CLIP's view of images (re-ranking, judging)
        self.vq_transform = vq_transform(m.vq)
        self.scenes, self.code_rows, self.codes, self.bad = None, None, None, {}

    def build_model(self) -> nn.Module:
        return TextToImage(self.recipe.model)

    def prepare(self, model: TextToImage, device: torch.device, progress: bool = True) -> None:
        """The frozen tokenizer's codes of every training image, once (a stream's are encoded in the loss)."""
        if self.recipe.data.stream:
            return
        self.scenes = read_scenes(self.root, "train")
        model.vq.eval()
        self.code_rows, self.codes, self.bad = encode_codes(
            model.vq, [s.path for s in self.scenes], self.vq_transform, self.recipe.data.max_pixels, device,
            self.recipe.eval.batch_size, progress)

    def train_data(self):
        m = self.recipe.model
        if self.recipe.data.stream:
            return stream_pairs(self.recipe.data, self.root, self.vq_transform, self.recipe.train.seed), \
                CodeCollate(self.tokenizer, m.clip.text.context_length)
        if self.codes is None:
            raise GlimpseError("text_to_image: prepare() encodes the training images before train_data()")
        dataset = CodeDataset(self.scenes, self.code_rows, self.codes, self.bad, m.caption_drop, self.recipe.train.seed)
        return dataset, CodeCollate(self.tokenizer, m.clip.text.context_length)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        inner = model.module if hasattr(model, "module") else model  # DDP wraps the model
        c = inner.cfg
        if "codes" not in batch:  # streamed images: the frozen tokenizer's codes, as prepare() computes them
            with torch.no_grad():
                batch["codes"] = inner.vq.tokens(batch["pixel_values"]).flatten(1)
        codes = inner.prior_ids(batch["codes"])  # the tokenizer's codes, offset by codebook group
        B, N = codes.shape
        keep = torch.rand(B, device=codes.device) >= c.cond_drop
        memory, memory_mask = inner.text_memory(batch["input_ids"], batch["attention_mask"], keep)
        if c.kind == "maskgit":
            # MaskGIT's cosine schedule: a share cos(pi/2 * r) of the grid masked, r uniform, at least one code
            r = torch.rand(B, 1, device=codes.device)
            n_masked = (torch.cos(math.pi / 2 * r) * N).ceil().clamp(min=1)
            rank = torch.rand(B, N, device=codes.device).argsort(1).argsort(1)
            masked = rank < n_masked
            inputs = codes.masked_fill(masked, c.special_id)
            targets = codes.masked_fill(~masked, IGNORE)
        else:
            inputs = torch.cat([codes.new_full((B, 1), c.special_id), codes[:, :-1]], dim=1)
            targets = codes
        logits = model(inputs, memory, memory_mask)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE)

    def pipeline(self, model: TextToImage) -> TextToImagePipeline:
        return TextToImagePipeline(model, self.tokenizer, self.transform, self.recipe.eval.batch_size)

    def evaluate(self, model: TextToImage, splits: list[str]) -> dict[str, float]:
        model.eval()
        e = self.recipe.eval
        m = self.recipe.model
        return evaluate_text_to_image(self.pipeline(model), self.root, splits, e.vqa_limit, m.rerank, m.rerank_prompts,
                                      self.recipe.train.seed, self.recipe.data.max_pixels)


__all__ = ["TextToImageFamily", "TextToImage", "TextToImageConfig", "TextToImagePipeline"]
