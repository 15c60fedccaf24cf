"""What glimpse.load returns for a text-to-image run: images from prompts, and CLIP's view of them."""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from glimpse.data.images import ImageTransform, to_uint8
from glimpse.errors import GlimpseError
from glimpse.families.text_to_image.model import PHRASE_MODES, TextToImage
from glimpse.families.text_to_image.sampling import generate_codes

MAX_PROMPT_CHARS = 1000
MAX_IMAGES = 64  # per prompt, and candidates per image
_PHRASE_BREAK = re.compile(r",\s*(?:and\s+)?|\s+and\s+")  # "a, b, and c" too


def split_phrases(prompt: str) -> list[str]:
    """A prompt's object phrases for composed guidance: its parts between commas and "and" ("a large red
    circle on the left and a small blue square at the top" -> two).  One part: no composition."""
    parts = [p.strip() for p in _PHRASE_BREAK.split(prompt) if len(p.split()) >= 2]
    return parts if len(parts) >= 2 else []


class TextToImagePipeline:
    def __init__(self, model: TextToImage, tokenizer, clip_transform: ImageTransform, batch_size: int = 64):
        self.model, self.tokenizer, self.clip_transform, self.batch_size = model, tokenizer, clip_transform, batch_size
        self.image_size = model.cfg.vq.sample_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise GlimpseError("a prompt must be a non-empty string")
            if len(p) > MAX_PROMPT_CHARS:
                raise GlimpseError(f"a prompt of {len(p)} characters is longer than {MAX_PROMPT_CHARS}")
        rows = [self.tokenizer.tower_ids(p, self.model.cfg.clip.text.context_length) for p in prompts]
        ids, mask = self.tokenizer.pad(rows)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """CLIP's normalised text embeddings [N, E]."""
        self.model.eval()
        out = []
        for start in range(0, len(prompts), 256):
            ids, mask = self._tokens(prompts[start:start + 256])
            out.append(F.normalize(self.model.clip.get_text_features(ids, mask), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray) -> torch.Tensor:
        """CLIP's normalised image embeddings [N, E] of uint8 images [N, H, W, 3] (the CLIP run's preprocessing)."""
        self.model.eval()
        out = []
        for start in range(0, len(images), 256):
            pixels = torch.stack([self.clip_transform(Image.fromarray(a)) for a in images[start:start + 256]])
            out.append(F.normalize(self.model.clip.get_image_features(pixels.to(self.device)), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def generate_arrays(self, prompts: list[str], n: int = 1, seed: int = 0, *, steps: int | None = None,
                        guidance: float | None = None, temperature: float | None = None,
                        candidates: int | None = None, phrase_guidance: float | None = None) -> np.ndarray:
        """uint8 images [len(prompts), n, H, W, 3].  With `candidates` > 1, each image is the one CLIP
        ranks best for its prompt among that many samples (best-of-N re-ranking, as DALL-E).  With
        `phrase_guidance` > 0, each prompt's object phrases (`split_phrases`) add their own guidance."""
        c = self.model.cfg
        steps = c.steps if steps is None else steps
        guidance = c.guidance if guidance is None else guidance
        temperature = c.temperature if temperature is None else temperature
        candidates = c.candidates if candidates is None else candidates
        phrase_guidance = c.phrase_guidance if phrase_guidance is None else phrase_guidance
        for name, value, most in (("n", n, MAX_IMAGES), ("candidates", candidates, MAX_IMAGES), ("steps", steps, 256)):
            if not isinstance(value, int) or not 1 <= value <= most:
                raise GlimpseError(f"{name} must be an integer from 1 to {most}, not {value!r}")
        for name, value in (("guidance", guidance), ("phrase_guidance", phrase_guidance)):
            if not (isinstance(value, (int, float)) and 0 <= value <= 100):
                raise GlimpseError(f"{name} must be a number from 0 to 100, not {value!r}")
        self.model.eval()
        generator = torch.Generator(self.device).manual_seed(seed)
        per_prompt = n * candidates
        rows = [p for p in prompts for _ in range(per_prompt)]
        images = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            ids, mask = self._tokens(chunk)
            codes = generate_codes(self.model, ids, mask, steps=steps, guidance=guidance, temperature=temperature,
                                   choice_temperature=c.choice_temperature, generator=generator,
                                   phrases=self._phrases(chunk, phrase_guidance))
            images.append(to_uint8(self.model.vq.decode_tokens(codes)))
        arrays = np.concatenate(images).reshape(len(prompts), n, candidates, *images[0].shape[1:])
        if candidates == 1:
            return arrays[:, :, 0]
        scores = (self.image_embeds(arrays.reshape(-1, *arrays.shape[3:])).view(len(prompts), n, candidates, -1)
                  * self.text_embeds(prompts)[:, None, None]).sum(-1)  # [P, n, candidates]
        best = scores.argmax(-1).cpu().numpy()
        return np.take_along_axis(arrays, best[:, :, None, None, None, None], axis=2)[:, :, 0]

    def _phrases(self, prompts: list[str], weight: float) -> tuple | None:
        """(ids, mask, owner, weight, mode) of the prompts' object phrases (each phrase alone, or the prompt
        without it: `phrase_mode`), or None (off, or nothing to compose).  Their rows run beside the
        prompts' own, so a batch of B prompts with P phrases runs 2B + P rows a step."""
        if not weight:
            return None
        if self.model.cfg.kind != "maskgit":
            raise GlimpseError("phrase guidance is for the maskgit prior")
        mode = self.model.cfg.phrase_mode
        if mode not in PHRASE_MODES:
            raise GlimpseError(f"phrase_mode must be one of {', '.join(PHRASE_MODES)}, not {mode!r}")
        pairs = []
        for row, p in enumerate(prompts):
            parts = split_phrases(p)
            for i in range(len(parts)):  # phrase i alone, or the prompt without it
                pairs.append((row, parts[i] if mode == "conjunction" else ", ".join(parts[:i] + parts[i + 1:])))
        if not pairs:
            return None
        ids, mask = self._tokens([phrase for _, phrase in pairs])
        return ids, mask, torch.tensor([row for row, _ in pairs], device=self.device), float(weight), mode

    def generate_images(self, prompts: str | list[str], n: int = 1, seed: int = 0, **kw) -> list:
        """PIL images: n for a prompt given as a string; a list of n per prompt for a list of prompts."""
        single = isinstance(prompts, str)
        arrays = self.generate_arrays([prompts] if single else list(prompts), n, seed, **kw)
        images = [[Image.fromarray(a) for a in row] for row in arrays]
        return images[0] if single else images
