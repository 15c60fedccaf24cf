"""Using a vision-language decoder: caption, ask, chat.  What `glimpse.load` returns for the vlm and
video_llava families.

Every request becomes a token prompt plus its images: a chat model's prompt goes through its
chat template (the run's `model.chat_template`); a model trained on the "plain" template (LLaVA
stage 1, Frozen) has no roles, so a question is asked as raw interleaved text,
"<image>Question: ... Answer:", the format of the Frozen paper's few-shot prompts.

Image features are cached by the content of the preprocessed pixels: a multi-turn chat that
sends the same image again (as OpenAI-style clients do every turn) does not re-encode it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator

import torch

from glimpse.data.chat import mark_specials, render, token_text
from glimpse.data.conversations import expand_images, vqa_question
from glimpse.data.images import DEFAULT_MAX_PIXELS, ImageTransform, load_image
from glimpse.data.messages import IMAGE, split_content, user_message
from glimpse.errors import ContextLengthError, GlimpseError
from glimpse.explain.core import DEFAULT_METHOD, Explanation, explain
from glimpse.explain.explainers import VisionLanguageExplainer
from glimpse.infer.batch import DecodeBatch
from glimpse.infer.generate import GenerationConfig, TextStream, generate
from glimpse.infer.generate import stream as stream_tokens
from glimpse.models.vlm import VisionLanguageModel


class VisionLanguagePipeline:
    def __init__(self, model: VisionLanguageModel, tokenizer, transform: ImageTransform,
                 max_pixels: int = DEFAULT_MAX_PIXELS, cache_size: int = 256):
        self.model, self.tokenizer, self.transform, self.max_pixels = model, tokenizer, transform, max_pixels
        self.template = model.cfg.chat_template
        if tokenizer:  # loaded without one (a model folder): text methods say so when called
            mark_specials(tokenizer.hf)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size
        self.encoded_images = 0  # images that went through the vision tower (the rest came from the cache)

    @property
    def bos(self) -> str:
        return token_text(self.tokenizer.hf, self.tokenizer.ids, "bos")

    @property
    def eos(self) -> str:
        return token_text(self.tokenizer.hf, self.tokenizer.ids, "eos")

    @property
    def is_chat(self) -> bool:
        return self.template != "plain"

    @property
    def context_length(self) -> int:
        return self.model.lm.cfg.context_length

    # -- images ---------------------------------------------------------------------------
    def load_pixels(self, src) -> torch.Tensor:
        """One image (a path, bytes or PIL image) as the tower's input; raises ImageError."""
        return self.transform(load_image(src, max_pixels=self.max_pixels))

    @torch.no_grad()
    def image_features(self, images: list) -> list[torch.Tensor]:
        """[image_tokens, D] per image, from the cache where the same pixels were seen before."""
        device = next(self.model.parameters()).device
        pixels = [self.load_pixels(im) for im in images]
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
    def _inputs(self, prompts: list[tuple[list[int], list]], max_new_tokens: int | list[int]):
        device, embeds, done = next(self.model.parameters()).device, [], {}
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
        for (ids, images), n in zip(prompts, limits):
            if len(ids) + n > self.context_length:
                raise ContextLengthError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({n}) "
                                         f"exceeds the model's context of {self.context_length} tokens")
            key = (id(ids), id(images))  # n choices of one request share its prompt: embed it once
            if key not in done:
                feats = torch.stack(self.image_features(images)) if images else None
                done[key] = self.model.merge(torch.tensor([ids], device=device), feats)[0]
            embeds.append(done[key])
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

    def open_batch(self, **options) -> PromptBatch:
        """An empty running batch, for continuous batching (glimpse.serve's engine): (ids, images)
        prompts join it between decoding steps (`add_prompts`), finished rows leave at once; options
        are GenerationConfig's (the decoding all its rows share)."""
        self.model.eval()
        return PromptBatch(self, self._config(1, options))

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

    # -- explanations ---------------------------------------------------------------------
    explains = "questions"  # what glimpse.explain's evaluation asks this pipeline about

    def explain(self, images: list, questions: list[str], method: str = DEFAULT_METHOD, answers: list[str] | None = None,
                short: bool = True) -> list[Explanation]:
        """Where the model looked for each answer: the answer to (image, question) (generated greedily, or
        `answers[i]`), explained by `method` (glimpse.explain.METHODS) per patch, per question token and per
        answer word."""
        if len(images) != len(questions) or (answers is not None and len(answers) != len(images)):
            raise GlimpseError(f"{len(images)} images for {len(questions)} questions"
                               + ("" if answers is None else f" and {len(answers)} answers"))
        return [explain(self.explainer(im, question=q, answer=None if answers is None else answers[i], short=short),
                        method) for i, (im, q) in enumerate(zip(images, questions))]

    def explainer(self, image, question: str, answer: str | None = None, short: bool = True,
                  max_new_tokens: int = 32) -> VisionLanguageExplainer:
        return self.prompt_explainer(self.question_prompt(question, image, short=short), answer, max_new_tokens)

    def explain_chat(self, messages: list[dict], method: str = DEFAULT_METHOD, max_new_tokens: int = 64) -> Explanation:
        """The chat's last answer explained (messages ending with the assistant's reply), or the reply the
        model gives now (messages ending with the user's turn).  The conversation holds one image."""
        answer = None
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            answer = messages[-1].get("content")
            if isinstance(answer, list):  # text parts, as OpenAI clients may send them
                answer = " ".join(p.get("text", "") for p in answer if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(answer, str) or not answer.strip():
                raise GlimpseError("the assistant message to explain must be non-empty text")
            messages = messages[:-1]
        return explain(self.prompt_explainer(self.chat_prompt(messages), answer, max_new_tokens), method)

    def prompt_explainer(self, prompt: tuple[list[int], list], answer: str | None = None,
                         max_new_tokens: int = 32) -> VisionLanguageExplainer:
        """The explainer of a prompt's answer (`answer`, or the one greedy decoding gives)."""
        ids, images = prompt
        if len(images) != 1:
            raise GlimpseError(f"an explanation takes a prompt with one image, not {len(images)}")
        if answer is None:
            answer_ids = self._trim(self.complete([prompt], max_new_tokens)[0])
        else:
            answer_ids = self.tokenizer.hf.encode(answer.strip(), add_special_tokens=False).ids
        if not answer_ids:
            raise GlimpseError("the answer is empty: there is nothing to explain")
        if len(ids) + len(answer_ids) > self.context_length:
            raise ContextLengthError(f"the prompt and answer ({len(ids) + len(answer_ids)} tokens) exceed the "
                                     f"model's context of {self.context_length} tokens")
        self.model.eval()
        device = next(self.model.parameters()).device
        pixels = self.load_pixels(images[0])[None].to(device)
        image_id = self.tokenizer.ids["image"]
        pieces = self.tokenizer.pieces
        return VisionLanguageExplainer(self.model, pixels, ids, answer_ids, pieces(answer_ids),
                                       pieces([t for t in ids if t != image_id]), self.tokenizer.decode(answer_ids).strip())

    def _trim(self, new_ids: list[int]) -> list[int]:
        """A generation's answer tokens: without the end-of-sequence token and trailing whitespace."""
        eos = self.tokenizer.ids["eos"]
        ids = new_ids[:new_ids.index(eos)] if eos in new_ids else list(new_ids)
        while ids and not self.tokenizer.decode([ids[-1]]).strip():
            ids.pop()
        return ids


class PromptBatch(DecodeBatch):
    """A running `DecodeBatch` (infer/batch.py) over the language model whose rows are (ids, images)
    prompts: their images go through the vision tower and projector as in `complete`."""

    def __init__(self, pipeline: VisionLanguagePipeline, cfg: GenerationConfig):
        super().__init__(pipeline.model.lm, cfg, pad_id=pipeline.tokenizer.pad_id, decode=pipeline.tokenizer.decode)
        self.pipeline = pipeline

    def add_prompts(self, prompts: list[tuple[list[int], list]], max_new_tokens: int | list[int]) -> list[int]:
        """New rows, one per prompt, each ending after its max_new_tokens; -> their handles.
        Raises ContextLengthError, or an image's error, before the batch changes."""
        ids, embeds = self.pipeline._inputs(prompts, max_new_tokens)
        return self.add(ids, prefix_embeds=embeds, max_new_tokens=max_new_tokens)
