"""Using an encoder-decoder captioner: caption images; what `glimpse.load` returns for this family.

The decoder reads the image and nothing else of a conversation: a captioner describes, it does not
follow instructions.  So `chat` (and the server's chat endpoint, `glimpse ask`) replies with the
caption of the conversation's last image, and says so in one line when there is no image.  A text
`prompt` to `caption` is the caption's beginning, which the decoder continues (BLIP's "a picture of").

Images are encoded once per request batch; their cross-attention keys and values are computed once
per layer at the prefill and kept in the KV cache for every generated token.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from glimpse.data.images import DEFAULT_MAX_PIXELS, ImageTransform, load_image
from glimpse.data.messages import split_content
from glimpse.errors import ContextLengthError, GlimpseError
from glimpse.families.encoder_decoder.model import EncoderDecoderCaptioner
from glimpse.infer.generate import GenerationConfig, TextStream, generate
from glimpse.infer.generate import stream as stream_tokens


class CaptionerPipeline:
    def __init__(self, model: EncoderDecoderCaptioner, tokenizer, transform: ImageTransform,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.model, self.tokenizer, self.transform, self.max_pixels = model, tokenizer, transform, max_pixels

    @property
    def context_length(self) -> int:
        return self.model.decoder.cfg.context_length

    def _start(self, prompt: str = "") -> list[int]:
        return [self.model.cfg.decoder_start_token_id, *(self.tokenizer.encode(prompt) if prompt else [])]

    @torch.no_grad()
    def memories(self, images: list) -> list[torch.Tensor]:
        """The encoder's states [tokens, D] of each image (paths, bytes or PIL images)."""
        device = next(self.model.parameters()).device
        pixels = torch.stack([self.transform(load_image(im, max_pixels=self.max_pixels)) for im in images])
        return list(self.model.encode(pixels.to(device)))

    # -- the chat protocol (glimpse.families.base.CHAT_METHODS) -------------------------------------
    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], list]:
        """(decoder start ids, [the conversation's last image]): the reply is that image's caption."""
        if not isinstance(messages, list) or not messages:
            raise GlimpseError("messages must be a non-empty list")
        images = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise GlimpseError("each message needs a role and a content")
            images += split_content(m["content"])[1]
        if not images:
            raise GlimpseError("this model is an image captioner: send an image (it describes the image and "
                               "does not read the text)")
        return self._start(), images[-1:]

    # No `open_batch` (continuous batching): each row reads a cross-attention memory, which a running
    # DecodeBatch does not merge across joins; the server decodes this pipeline's groups whole.
    def complete(self, prompts: list[tuple[list[int], list]], max_new_tokens: int = 32, on_token=None,
                 cancelled=None, **options) -> list[list[int]]:
        """New token ids for (start ids, [image]) prompts, decoded in one batch; options are
        GenerationConfig's."""
        self.model.eval()
        for ids, images in prompts:
            if len(images) != 1:
                raise GlimpseError(f"a captioner reads one image per prompt, not {len(images)}")
            if len(ids) + max_new_tokens > self.context_length:
                raise ContextLengthError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) "
                                         f"exceeds the decoder's context of {self.context_length} tokens")
        memory = self._memory(prompts)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.ids["eos"], **options)
        return generate(self.model.decoder, [p[0] for p in prompts], cfg, pad_id=self.tokenizer.pad_id,
                        decode=self.tokenizer.decode, on_token=on_token, cancelled=cancelled, memory=memory)

    def _memory(self, prompts) -> list[torch.Tensor]:
        firsts = {id(images): images[0] for _, images in prompts}  # n choices of a request share its image
        feats = dict(zip(firsts, self.memories(list(firsts.values()))))
        return [feats[id(images)] for _, images in prompts]

    def generate(self, prompts: list[tuple[list[int], list]], max_new_tokens: int = 32, on_token=None,
                 **options) -> list[str]:
        return [self.tokenizer.decode(o).strip() for o in self.complete(prompts, max_new_tokens, on_token, **options)]

    def stream(self, prompt: tuple[list[int], list], max_new_tokens: int = 32, **options) -> Iterator[str]:
        self.model.eval()
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.ids["eos"], **options)
        text = TextStream(self.tokenizer.decode)
        for tok in stream_tokens(self.model.decoder, prompt[0], cfg, pad_id=self.tokenizer.pad_id,
                                 decode=self.tokenizer.decode, memory=self._memory([prompt])):
            piece = text.push(tok)
            if piece:
                yield piece

    # -- the user-facing calls ------------------------------------------------------------------------
    def caption(self, images: list, prompt: str = "", max_new_tokens: int = 32, **options) -> list[str]:
        """One caption per image (batched); a `prompt` is the caption's beginning, kept in the result."""
        start = self._start(prompt)
        out = self.generate([(start, [im]) for im in images], max_new_tokens, **options)
        return [f"{prompt.strip()} {c}".strip() if prompt else c for c in out]

    def chat(self, messages: list[dict], max_new_tokens: int = 64, stream: bool = False, **options):
        """The caption of the conversation's last image (see the module docstring); with stream=True,
        an iterator of text pieces."""
        prompt = self.chat_prompt(messages)
        if stream:
            return self.stream(prompt, max_new_tokens, **options)
        return self.generate([prompt], max_new_tokens, **options)[0]
