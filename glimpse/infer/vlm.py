"""Using a vision-language decoder: caption, ask, chat.  What `glimpse.load` returns for a `vlm` run.

Every request becomes a token prompt plus its images: a chat model's prompt goes through its
chat template (the run's `model.chat_template`); a model trained on the "plain" template (LLaVA
stage 1, Frozen) has no roles, so a question is asked as raw interleaved text,
"<image>Question: ... Answer:", the format of the Frozen paper's few-shot prompts.

Image features are cached by the content of the preprocessed pixels: a multi-turn chat that
sends the same image again (as OpenAI-style clients do every turn) does not re-encode it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import OrderedDict
from collections.abc import Iterator

import torch

from glimpse.data.chat import mark_specials, render, token_text
from glimpse.data.conversations import expand_images, vqa_question
from glimpse.data.images import DEFAULT_MAX_PIXELS, ImageTransform, load_image
from glimpse.errors import GlimpseError
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.infer.generate import stream as stream_tokens
from glimpse.models.vlm import VisionLanguageModel

IMAGE = "<image>"


class ContextLengthError(GlimpseError):
    """The prompt plus the tokens to generate do not fit the model's context."""


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:` URL; other URLs are refused (nothing is fetched)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise GlimpseError("images must be given as base64 data: URLs (remote and file URLs are not fetched)")
    head, _, payload = url.partition(",")
    if not head.endswith(";base64"):
        raise GlimpseError("a data: URL image must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise GlimpseError("the data: URL holds invalid base64") from None


def split_content(content) -> tuple[str, list]:
    """An OpenAI-style message content (a string, or a list of text / image_url / image parts) as
    (text with one <image> per image, the images).  A literal "<image>" in user text is removed, so
    text alone can never claim an image."""
    if isinstance(content, str):
        return content.replace(IMAGE, ""), []
    if not isinstance(content, list):
        raise GlimpseError("message content must be a string or a list of parts")
    text, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"].replace(IMAGE, ""))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(decode_data_url(url))
            text.append(IMAGE)
        elif kind == "image" and part.get("image") is not None:  # Python callers: a path, bytes or PIL image
            images.append(part["image"])
            text.append(IMAGE)
        else:
            raise GlimpseError(f"unknown message part {part!r:.80}: use text, image_url or image parts")
    return "\n".join(text), images


def user_message(images: list, text: str) -> dict:
    """An OpenAI-style user turn: the images (paths, bytes or PIL images) first, then the text."""
    return {"role": "user", "content": [{"type": "image", "image": im} for im in images] +
            [{"type": "text", "text": text}]}


class TextStream:
    """Tokens in, text pieces out: each piece is what the newest token added to the decoded text
    (leading spaces dropped, half a multi-byte character held back), so the pieces join to the
    stripped-at-the-start text of all tokens."""

    def __init__(self, decode):
        self.decode, self.tokens, self.text = decode, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens).lstrip()
        if text.endswith("\ufffd"):  # wait for the rest of the character
            return ""
        piece, self.text = text[len(self.text):], text
        return piece


class VisionLanguagePipeline:
    def __init__(self, model: VisionLanguageModel, tokenizer, transform: ImageTransform,
                 max_pixels: int = DEFAULT_MAX_PIXELS, cache_size: int = 256):
        self.model, self.tokenizer, self.transform, self.max_pixels = model, tokenizer, transform, max_pixels
        self.template = model.cfg.chat_template
        mark_specials(tokenizer.hf)
        self.bos = token_text(tokenizer.hf, tokenizer.ids, "bos")
        self.eos = token_text(tokenizer.hf, tokenizer.ids, "eos")
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size
        self.encoded_images = 0  # images that went through the vision tower (the rest came from the cache)

    @property
    def is_chat(self) -> bool:
        return self.template != "plain"

    @property
    def context_length(self) -> int:
        return self.model.lm.cfg.context_length

    # -- images ---------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: list) -> list[torch.Tensor]:
        """[image_tokens, D] per image, from the cache where the same pixels were seen before."""
        device = next(self.model.parameters()).device
        pixels = [self.transform(load_image(im, max_pixels=self.max_pixels)) for im in images]
        keys = [hashlib.sha1(p.numpy().tobytes()).hexdigest() for p in pixels]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            feats = self.model.get_image_features(torch.stack([pixels[i] for i in todo]).to(device))
            self.encoded_images += len(todo)
            for i, f in zip(todo, feats):
                self._cache[keys[i]] = f
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        for k in keys:
            self._cache.move_to_end(k)
        return [self._cache[k] for k in keys]

    # -- prompts --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Prompt text (special markers included) -> ids, each <image> expanded to the image's tokens."""
        ids = self.tokenizer.hf.encode(text, add_special_tokens=False).ids
        return expand_images(ids, ids, self.tokenizer.ids["image"], self.model.image_tokens)[0]

    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], list]:
        """OpenAI-style messages -> (prompt ids ending where the assistant speaks, images in order)."""
        if not isinstance(messages, list) or not messages:
            raise GlimpseError("messages must be a non-empty list")
        turns, images = [], []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise GlimpseError("each message needs a role and a content")
            text, ims = split_content(m["content"])
            turns.append({"role": m["role"], "content": text})
            images += ims
        try:
            text = render(self.template, turns, add_generation_prompt=True, bos_token=self.bos, eos_token=self.eos)
        except ValueError as e:
            raise GlimpseError(str(e)) from None
        if text.count(IMAGE) != len(images):  # the plain template keeps only the user turns' images
            raise GlimpseError(f"this model's template ({self.template}) keeps {text.count(IMAGE)} of the "
                               f"{len(images)} images")
        return self.encode(text), images

    def question_prompt(self, question: str, image, shots: list[tuple] = (), short: bool = False):
        """A question about one image, after k solved examples [(image, question, answer)]."""
        if not self.is_chat:  # interleaved text, the Frozen paper's format
            text = self.bos + "".join(f"{IMAGE}Question: {q} Answer: {a}\n" for _, q, a in shots)
            return self.encode(text + f"{IMAGE}Question: {question} Answer:"), [s[0] for s in shots] + [image]
        messages = []
        for im, q, a in shots:
            messages += [user_message([im], vqa_question(q, short)), {"role": "assistant", "content": a}]
        return self.chat_prompt(messages + [user_message([image], vqa_question(question, short))])

    # -- generation -----------------------------------------------------------------------
    def _config(self, max_new_tokens: int, options: dict) -> GenerationConfig:
        stops = list(options.pop("stop_strings", None) or [])
        if not self.is_chat:
            stops.append("\n")  # raw prompts end each answer at a newline
        return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.ids["eos"],
                                stop_strings=stops, **options)

    @torch.no_grad()
    def _inputs(self, prompts: list[tuple[list[int], list]], max_new_tokens: int):
        device, embeds = next(self.model.parameters()).device, []
        for ids, images in prompts:
            if len(ids) + max_new_tokens > self.context_length:
                raise ContextLengthError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) "
                                         f"exceeds the model's context of {self.context_length} tokens")
            feats = torch.stack(self.image_features(images)) if images else None
            embeds.append(self.model.merge(torch.tensor([ids], device=device), feats)[0])
        return [p[0] for p in prompts], embeds

    def complete(self, prompts: list[tuple[list[int], list]], max_new_tokens: int = 32, on_token=None,
                 cancelled=None, **options) -> list[list[int]]:
        """New token ids for (ids, images) prompts, decoded in one batch; options are
        GenerationConfig's.  on_token(row, id) streams; cancelled(row) ends a row early."""
        self.model.eval()
        cfg = self._config(max_new_tokens, options)
        ids, embeds = self._inputs(prompts, max_new_tokens)
        return generate(self.model.lm, ids, cfg, pad_id=self.tokenizer.pad_id, prefix_embeds=embeds,
                        decode=self.tokenizer.decode, on_token=on_token, cancelled=cancelled)

    def generate(self, prompts: list[tuple[list[int], list]], max_new_tokens: int = 32, on_token=None,
                 **options) -> list[str]:
        """The completions of (ids, images) prompts as text (one batch)."""
        out = self.complete(prompts, max_new_tokens, on_token, **options)
        return [self.tokenizer.decode(o).strip() for o in out]

    def stream(self, prompt: tuple[list[int], list], max_new_tokens: int = 32, **options) -> Iterator[str]:
        """The text of one completion, in pieces as the tokens come (pieces join to the whole text)."""
        self.model.eval()
        cfg = self._config(max_new_tokens, options)
        ids, embeds = self._inputs([prompt], max_new_tokens)
        text = TextStream(self.tokenizer.decode)
        for tok in stream_tokens(self.model.lm, ids[0], cfg, pad_id=self.tokenizer.pad_id, prefix_embeds=embeds,
                                 decode=self.tokenizer.decode):
            piece = text.push(tok)
            if piece:
                yield piece

    # -- the user-facing calls ------------------------------------------------------------
    def caption(self, images: list, prompt: str = "describe the image.", max_new_tokens: int = 32,
                **options) -> list[str]:
        """One caption per image (batched)."""
        prompts = [self.chat_prompt([user_message([im], prompt)]) for im in images]
        return self.generate(prompts, max_new_tokens, **options)

    def ask(self, images: list, questions: list[str], short: bool = False, max_new_tokens: int = 32,
            **options) -> list[str]:
        """One answer per (image, question) (batched); `short` asks for a word or phrase."""
        if len(images) != len(questions):
            raise GlimpseError(f"{len(images)} images for {len(questions)} questions")
        prompts = [self.question_prompt(q, im, short=short) for im, q in zip(images, questions)]
        return self.generate(prompts, max_new_tokens, **options)

    def chat(self, messages: list[dict], max_new_tokens: int = 64, stream: bool = False, **options):
        """The assistant's reply to OpenAI-style messages (text and image parts); with stream=True,
        an iterator of text pieces."""
        prompt = self.chat_prompt(messages)
        if stream:
            return self.stream(prompt, max_new_tokens, **options)
        return self.generate([prompt], max_new_tokens, **options)[0]
