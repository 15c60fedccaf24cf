"""Using a Flamingo model: caption, ask, and chat with images interleaved in the text.

A request becomes one interleaved prompt, OpenFlamingo's format: bos, then each message's parts in
their order, an image as `<image>` in its place, the assistant's earlier replies closed by
`<|endofchunk|>`; a prompt that does not end in a cue gets `Output:`.  So a user can send solved
examples and a question in one message, `[image, "Output: dax<|endofchunk|>", image, "Output:
blick<|endofchunk|>", image]`, and each text token reads the latest image before it.  Generation
stops at `<|endofchunk|>`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from glimpse.data.images import DEFAULT_MAX_PIXELS, ImageTransform, load_image
from glimpse.data.messages import IMAGE, content_parts
from glimpse.errors import ContextLengthError, GlimpseError
from glimpse.families.flamingo.data import END_OF_CHUNK
from glimpse.families.flamingo.model import FlamingoModel
from glimpse.infer.generate import GenerationConfig, TextStream, generate
from glimpse.infer.generate import stream as stream_tokens

CUES = ("Output:", "Answer:")


class FlamingoPipeline:
    def __init__(self, model: FlamingoModel, tokenizer, transform: ImageTransform, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.model, self.tokenizer, self.transform, self.max_pixels = model, tokenizer, transform, max_pixels

    @property
    def context_length(self) -> int:
        return self.model.lm.cfg.context_length

    @property
    def end_id(self) -> int:
        return self.model.cfg.end_of_chunk_token_id

    # -- prompts --------------------------------------------------------------------------------------
    def prompt(self, pieces: list) -> tuple[list[int], list]:
        """Text strings and ("image", image) pieces -> (ids, images in order), cue added when needed."""
        text, images = "", []
        for p in pieces:
            if isinstance(p, tuple):
                text += IMAGE
                images.append(p[1])
            else:
                sep = " " if text and not text.endswith((IMAGE, " ", "\n")) and p and not p.startswith(" ") else ""
                text += sep + p
        if not text.rstrip().endswith(CUES):
            text = text.rstrip() + ("" if text.endswith(IMAGE) or not text else " ") + "Output:"
        bos = self.tokenizer.ids.get("bos")
        ids = ([bos] if bos is not None else []) + self.tokenizer.encode(text)
        return ids, images

    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], list]:
        if not isinstance(messages, list) or not messages:
            raise GlimpseError("messages must be a non-empty list")
        pieces: list = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise GlimpseError("each message needs a role and a content")
            parts = content_parts(m["content"])
            if m["role"] == "assistant":
                parts = [" " + "".join(p for p in parts if isinstance(p, str)).strip() + END_OF_CHUNK]
            pieces += parts
        return self.prompt(pieces)

    # -- generation -----------------------------------------------------------------------------------
    def _inputs(self, prompts, max_new_tokens: int):
        device = next(self.model.parameters()).device
        for ids, _ in prompts:
            if len(ids) + max_new_tokens > self.context_length:
                raise ContextLengthError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) "
                                         f"exceeds the model's context of {self.context_length} tokens")
        done: dict = {}  # n choices of one request share its images: encode them once
        for ids, images in prompts:
            if id(images) not in done:
                px = torch.stack([self.transform(load_image(im, max_pixels=self.max_pixels)) for im in images]) \
                    if images else None
                done[id(images)] = (ids, None if px is None else px.to(device))
        keys = list(done)
        memory, masks = self.model.generation_memory([done[k][0] for k in keys], [done[k][1] for k in keys])
        by_key = {k: (m, mk) for k, m, mk in zip(keys, memory, masks)}
        return [by_key[id(images)][0] for _, images in prompts], [by_key[id(images)][1] for _, images in prompts]

    def _config(self, max_new_tokens: int, options: dict) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=[self.end_id, self.tokenizer.ids["eos"]],
                                **options)

    # No `open_batch` (continuous batching): each row reads a cross-attention memory, which a running
    # DecodeBatch does not merge across joins; the server decodes this pipeline's groups whole.
    @torch.no_grad()
    def complete(self, prompts: list[tuple[list[int], list]], max_new_tokens: int = 32, on_token=None,
                 cancelled=None, **options) -> list[list[int]]:
        self.model.eval()
        memory, masks = self._inputs(prompts, max_new_tokens)
        return generate(self.model, [p[0] for p in prompts], self._config(max_new_tokens, options),
                        pad_id=self.tokenizer.pad_id, decode=self.tokenizer.decode, on_token=on_token,
                        cancelled=cancelled, memory=memory, memory_mask=masks)

    def generate(self, prompts, max_new_tokens: int = 32, on_token=None, **options) -> list[str]:
        return [self.tokenizer.decode(o).strip() for o in self.complete(prompts, max_new_tokens, on_token, **options)]

    def stream(self, prompt, max_new_tokens: int = 32, **options) -> Iterator[str]:
        self.model.eval()
        memory, masks = self._inputs([prompt], max_new_tokens)
        text = TextStream(self.tokenizer.decode)
        for tok in stream_tokens(self.model, prompt[0], self._config(max_new_tokens, options),
                                 pad_id=self.tokenizer.pad_id, decode=self.tokenizer.decode, memory=memory,
                                 memory_mask=masks):
            piece = text.push(tok)
            if piece:
                yield piece

    # -- the user-facing calls ------------------------------------------------------------------------
    def caption(self, images: list, prompt: str = "Output:", max_new_tokens: int = 32, shots: list = (),
                **options) -> list[str]:
        """One caption per image; `shots`: solved examples [(image, caption)] put before each."""
        before = [q for im, c in shots for q in (("image", im), f"Output: {c}{END_OF_CHUNK}")]
        return self.generate([self.prompt(before + [("image", im), prompt]) for im in images], max_new_tokens,
                             **options)

    def ask(self, images: list, questions: list[str], max_new_tokens: int = 16, **options) -> list[str]:
        if len(images) != len(questions):
            raise GlimpseError(f"{len(images)} images for {len(questions)} questions")
        return self.generate([self.prompt([("image", im), f"Question: {q} Answer:"]) for im, q in zip(images, questions)],
                             max_new_tokens, **options)

    def chat(self, messages: list[dict], max_new_tokens: int = 64, stream: bool = False, **options):
        prompt = self.chat_prompt(messages)
        if stream:
            return self.stream(prompt, max_new_tokens, **options)
        return self.generate([prompt], max_new_tokens, **options)[0]
