"""Using a fusion encoder: embed (ITC), match image-text pairs (ITM), answer questions (VQA
classification), and retrieve with ITC proposals re-ranked by ITM.  What `glimpse.load` returns
for a `fusion` run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glimpse.data.images import ImageTransform, load_image
from glimpse.data.tokenizer import Tokenizer
from glimpse.errors import GlimpseError
from glimpse.explain.core import DEFAULT_METHOD, Explanation, explain
from glimpse.families.fusion.explain import FusionExplainer
from glimpse.families.fusion.model import FusionEncoder


class FusionPipeline:
    def __init__(self, model: FusionEncoder, tokenizer: Tokenizer, transform: ImageTransform,
                 max_pixels: int = 40_000_000, batch_size: int = 256):
        self.model, self.tokenizer, self.transform = model, tokenizer, transform
        self.max_pixels, self.batch_size = max_pixels, batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _need(self, part: str, what: str) -> None:
        if not hasattr(self.model, part):
            raise GlimpseError(f"this fusion run was trained for {self.model.cfg.objective}; {what} needs a "
                               f"{'vqa' if part == 'vqa_head' else 'pretrain or retrieval'} run")

    def pixels(self, images: list) -> torch.Tensor:
        return torch.stack([self.transform(load_image(im, max_pixels=self.max_pixels)) for im in images])

    # -- features ------------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens [N, Nt, Dv], pooled [N, Dv]), in batches."""
        self.model.eval()
        patches, pooled = [], []
        for i in range(0, len(pixel_values), self.batch_size):
            p, q = self.model.encode_image(self.model.vision, pixel_values[i:i + self.batch_size].to(self.device))
            patches.append(p)
            pooled.append(q)
        return torch.cat(patches), torch.cat(pooled)

    @torch.no_grad()
    def text_states(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(unimodal text states [M, T, D], attention mask [M, T]), padded to the longest text."""
        self.model.eval()
        ids, mask = self.tokenizer.batch(texts, self.model.cfg.text.context_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        states = [self.model.text.forward_features(ids[i:i + self.batch_size], mask[i:i + self.batch_size])
                  for i in range(0, len(texts), self.batch_size)]
        return torch.cat(states), mask

    def embed_images(self, images: list) -> torch.Tensor:
        """Normalised ITC embeddings [N, E]."""
        self._need("itc", "embedding")
        return self.embed_pooled(self.image_features(self.pixels(images))[1])

    @torch.no_grad()
    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.itc.vision_proj(pooled).float(), dim=-1)

    @torch.no_grad()
    def embed_states(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.itc.text_proj(states[:, 0]).float(), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        self._need("itc", "embedding")
        return self.embed_states(self.text_states(texts)[0])

    # -- matching --------------------------------------------------------------------------------
    @torch.no_grad()
    def itm_scores(self, states, mask, patches, pooled, text_rows: torch.Tensor,
                   image_rows: torch.Tensor) -> torch.Tensor:
        """log P(match) [P] of the pairs (text_rows[p], image_rows[p]) over precomputed features."""
        self._need("itm_head", "matching")
        self.model.eval()
        out = []
        for i in range(0, len(text_rows), self.batch_size):
            t, m = text_rows[i:i + self.batch_size], image_rows[i:i + self.batch_size]
            logits = self.model.itm_logits(states[t], mask[t], patches[m], pooled[m])
            out.append(logits.float().log_softmax(-1)[:, 1])
        return torch.cat(out) if out else torch.zeros(0)

    def match(self, images: list, texts: list[str]) -> list[float]:
        """P(image i matches text i) for aligned lists, by the ITM head."""
        if len(images) != len(texts):
            raise GlimpseError(f"{len(images)} images but {len(texts)} texts: match pairs them one to one")
        patches, pooled = self.image_features(self.pixels(images))
        states, mask = self.text_states(texts)
        rows = torch.arange(len(texts), device=self.device)
        return self.itm_scores(states, mask, patches, pooled, rows, rows).exp().tolist()

    @torch.no_grad()
    def rerank(self, sim: torch.Tensor, k: int, states, mask, patches, pooled) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC proposes, ITM judges: for a text->image similarity matrix sim [M, N], the ITM
        log P(match) of each text's top-k images and of each image's top-k texts, as score
        matrices [M, N] and [N, M] holding -inf outside the candidates (see `combine`)."""
        dev = sim.device
        k_img, k_txt = min(k, sim.shape[1]), min(k, sim.shape[0])
        t2i = torch.full_like(sim, float("-inf"))
        cand = sim.topk(k_img, dim=1).indices  # [M, k]
        texts = torch.arange(sim.shape[0], device=dev).repeat_interleave(k_img)
        t2i[texts, cand.flatten()] = self.itm_scores(states, mask, patches, pooled, texts, cand.flatten()).to(dev)
        i2t = torch.full_like(sim.T, float("-inf"))
        cand = sim.T.topk(k_txt, dim=1).indices  # [N, k]
        imgs = torch.arange(sim.shape[1], device=dev).repeat_interleave(k_txt)
        i2t[imgs, cand.flatten()] = self.itm_scores(states, mask, patches, pooled, cand.flatten(), imgs).to(dev)
        return t2i, i2t

    def combine(self, itm: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        """The re-ranking score of a candidate: log P_ITM(match) + the ITC logit (scale x cosine),
        i.e. log(P_ITM x softmax_ITC) up to a per-query constant: both experts must agree.  (ITM
        alone loses to ITC at R@1 on the shapes world, where captions differ by one word; the
        product beats both.)"""
        return itm + self.model.itc.scale().item() * sim.to(itm.device)

    def search(self, texts: list[str], images: list, k: int = 5) -> list[list[tuple[int, float]]]:
        """For each text, the k best images as (index, score): ITC's top `rerank_k`, re-ranked with ITM."""
        patches, pooled = self.image_features(self.pixels(images))
        states, mask = self.text_states(texts)
        sim = self.embed_states(states) @ self.embed_pooled(pooled).T
        t2i, _ = self.rerank(sim, max(k, self.model.cfg.rerank_k), states, mask, patches, pooled)
        t2i = self.combine(t2i, sim)
        best = t2i.topk(min(k, t2i.shape[1]), dim=1)
        return [list(zip(i.tolist(), v.tolist())) for i, v in zip(best.indices, best.values)]

    # -- VQA -------------------------------------------------------------------------------------
    @torch.no_grad()
    def answer_logits(self, pixel_values: torch.Tensor, questions: list[str]) -> torch.Tensor:
        self._need("vqa_head", "answering")
        self.model.eval()
        ids, mask = self.tokenizer.batch(questions, self.model.cfg.text.context_length)
        return self.model.answer_logits(pixel_values.to(self.device), ids.to(self.device), mask.to(self.device))

    def ask(self, images: list, questions: list[str], top_k: int = 1):
        """The best answer of the answer list for each (image, question); with top_k > 1, the
        k best as (answer, probability) pairs."""
        if len(images) != len(questions):
            raise GlimpseError(f"{len(images)} images but {len(questions)} questions")
        answers = self.model.cfg.answers
        probs = self.answer_logits(self.pixels(images), questions).float().softmax(-1)
        if top_k == 1:
            return [answers[i] for i in probs.argmax(-1).tolist()]
        best = probs.topk(min(top_k, len(answers)), dim=-1)
        return [[(answers[i], p) for i, p in zip(ix.tolist(), pv.tolist())] for ix, pv in zip(best.indices, best.values)]

    # -- explanations ----------------------------------------------------------------------------
    @property
    def explains(self) -> str:
        """What glimpse.explain's evaluation asks this pipeline about: texts to match, or questions."""
        return "questions" if hasattr(self.model, "vqa_head") else "texts"

    def explain(self, images: list, texts: list[str] | None = None, questions: list[str] | None = None,
                method: str = DEFAULT_METHOD) -> list[Explanation]:
        """Why image i matches text i (ITM), or why it gets its answer to question i (VQA): relevance per
        image patch (and per text token, for chefer and rollout), by `method` (glimpse.explain.METHODS)."""
        asked = texts if self.explains == "texts" else questions
        if asked is None:
            raise GlimpseError(f"this fusion run explains {self.explains}: pass {self.explains}=[...]")
        if len(images) != len(asked):
            raise GlimpseError(f"{len(images)} images but {len(asked)} {self.explains}")
        return [explain(self.explainer(im, text=t, question=t), method) for im, t in zip(images, asked)]

    def explainer(self, image, text: str | None = None, question: str | None = None,
                  answer: str | None = None) -> FusionExplainer:
        self._need("vqa_head" if self.explains == "questions" else "itm_head", "explaining")
        words = question if self.explains == "questions" else text
        if not isinstance(words, str):
            raise GlimpseError(f"this fusion run explains {self.explains}: give the {self.explains[:-1]}")
        self.model.eval()
        ids, mask = self.tokenizer.batch([words], self.model.cfg.text.context_length)
        return FusionExplainer(self.model, self.pixels([image]).to(self.device), ids.to(self.device),
                               mask.to(self.device), self.tokenizer.pieces(ids[0].tolist()), words, answer)
