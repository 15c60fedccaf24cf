"""Chat templates and assistant-only loss masks.

Templates are Jinja, in the Hugging Face `chat_template` convention: the template sees
`messages` (a list of {"role", "content"}), `add_generation_prompt`, `bos_token` and
`eos_token`, and is rendered in a sandbox with `trim_blocks`/`lstrip_blocks` and a
`raise_exception` helper, as transformers does, so a model's own template works unchanged.

Finding what the model must learn to say (the assistant spans), for ANY template:
the conversation is rendered incrementally.  For the assistant message k,

    prompt = render(messages[:k], add_generation_prompt=True)   # "...<|im_start|>assistant\\n"
    turn   = render(messages[:k + 1])                            # "...<|im_start|>assistant\\nhi<|im_end|>\\n"

and both must be prefixes of the full rendering.  The span is `turn[len(prompt):]`, which is
exactly what a model prompted with `prompt` has to generate: the content and the end-of-turn
marker.  Whitespace the template puts after a non-blank end marker (chatml's "\\n" after
<|im_end|>) is left out: generation stops at the marker, so it is never generated.
Character spans become token labels through the `tokenizers` offsets (which point into the
original text, through normalizers such as lowercasing): a token is labelled iff its
characters lie inside an assistant span; a token straddling a span's start belongs partly to
the prompt and is not labelled.  transformers does the same with `{% generation %}` markers;
this way needs no markers, only a template whose renderings of prefixes are prefixes.
"""

from __future__ import annotations

import weakref
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken

IGNORE = -100
ROLES = ("system", "user", "assistant")
_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, str] = {
    # Qwen2 / SmolLM2 style, without an implicit default system message.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # LLaVA-1.5 conv_vicuna_v1: "<s>SYSTEM USER: q ASSISTANT: a</s>USER: ...", generation prompt
    # "ASSISTANT:" (the space before the answer is generated, as in LLaVA).
    "llava": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
        "{% else %}{{ '" + _LLAVA_SYSTEM.replace("'", "\\'") + " ' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ 'ASSISTANT: ' + message['content'] + (eos_token if eos_token else '</s>') }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # LLaVA-1.5's USER:/ASSISTANT: turns without its system prompt: for small models whose
    # context the 30-word system prompt would crowd (the shapes-world LLaVA recipes).
    "compact": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
        "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ 'ASSISTANT: ' + message['content'] + (eos_token if eos_token else '</s>') }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # LLaVA stage-1 "plain": the user turn is reduced to its image placeholders (the
    # instruction text is dropped, as LLaVA does), then the caption and an end marker (the
    # eos, so the captioner learns to stop; LLaVA's "\n" when there is no eos).  No roles,
    # no system, no generation prompt: the caption starts right after the image.
    "plain": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '<image>' * message['content'].count('<image>') }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + (eos_token if eos_token else '\\n') }}"
        "{% endif %}"
        "{% endfor %}"
    ),
}

# LLaVA-1.5's instruction for short VQA answers (its VQAv2 training mix and evaluation prompt).
VQA_INSTRUCTION = "Answer the question using a single word or phrase."
# Words the prompts above add to a conversation; the shapes world's tokenizer learns them.
PROMPT_WORDS = ("USER:", "ASSISTANT:", "Question:", "Answer:", VQA_INSTRUCTION)

# Marker strings that must be one special id when the tokenizer knows them.
_MARKERS = ("<image>", "<|im_start|>", "<|im_end|>", "<bos>", "<eos>", "<pad>", "<s>", "</s>")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _raise(message: str):
    # Templates call raise_exception("...") to reject a conversation; surface it as our error.
    raise ValueError(f"chat template: {message}")


@lru_cache(maxsize=32)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"invalid chat template: {e}") from None


def _source(template: str) -> str:
    """A built-in template's name, or a Jinja source itself (e.g. a model's chat_template)."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return template
    raise ValueError(f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATES)} or a Jinja template")


def validate(messages: list[dict]) -> None:
    """Raise ValueError unless `messages` is [system]? user, assistant, user, ... with str contents."""
    if not messages:
        raise ValueError("empty conversation: at least one message is needed")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} is not a {{'role', 'content'}} dict: {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string, got {type(m['content']).__name__}")
    start = 1 if messages[0]["role"] == "system" else 0
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise ValueError(
                f"message {i} is a {messages[i]['role']} turn where a {expected} turn was expected: "
                "after an optional first system message, turns must alternate user, assistant, user, ..."
            )


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
           bos_token: str = "", eos_token: str = "") -> str:
    """The conversation as text, through a built-in template (by name) or a Jinja source."""
    source = _source(template)
    validate(messages)
    try:
        return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from None


def from_llava(conversations: list[dict]) -> list[dict]:
    """LLaVA JSON turns [{"from": "human"|"gpt"|"system", "value"}] as chat messages."""
    out = []
    for i, turn in enumerate(conversations):
        who = turn.get("from") if isinstance(turn, dict) else None
        if who not in _LLAVA_ROLES:
            raise ValueError(f"turn {i}: unknown speaker {who!r}; expected human, gpt or system")
        out.append({"role": _LLAVA_ROLES[who], "content": turn.get("value", "")})
    return out


_MARKED: weakref.WeakSet = weakref.WeakSet()  # tokenizers already through mark_specials


def mark_specials(hf) -> None:
    # A marker the tokenizer has in its vocabulary but not as an added token would be split by
    # the pre-tokenizer; registering it (no new id) makes it match whole.  Markers the
    # tokenizer lacks stay plain text.  Once per tokenizer: get_vocab copies the whole vocabulary,
    # which cost more than the rest of tokenize_conversation.
    if hf in _MARKED:
        return
    vocab = hf.get_vocab()
    added = {t.content for t in hf.get_added_tokens_decoder().values()}
    missing = [m for m in _MARKERS if m in vocab and m not in added]
    if missing:
        hf.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in missing])
    _MARKED.add(hf)


def token_text(hf, ids: dict, role: str) -> str:
    i = ids.get(role)
    return "" if i is None else (hf.id_to_token(i) or "")


def assistant_spans(template: str, messages: list[dict], *, bos_token: str = "",
                    eos_token: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the [start, end) character spans the model must generate."""
    kw = {"bos_token": bos_token, "eos_token": eos_token}
    full = render(template, messages, **kw)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(template, messages[:k], add_generation_prompt=True, **kw)
        turn = render(template, messages[: k + 1], **kw)
        if not (full.startswith(turn) and turn.startswith(prompt)):
            raise ValueError(
                f"chat template is not prefix-stable at message {k}: rendering the conversation up to "
                "a turn must give a prefix of the full rendering to locate the assistant spans"
            )
        start, end = len(prompt), len(turn)
        # Where the content ends inside the generated text; what follows is the end marker.
        at = turn.find(m["content"], start)
        content_end = at + len(m["content"]) if at >= 0 else start
        marker = turn[content_end:end].rstrip()
        if marker:  # drop whitespace after a real marker; a blank marker (plain's "\n") is kept
            end = content_end + len(marker)
        if end > start:
            spans.append((start, end))
    return full, spans


def tokenize_conversation(tokenizer, template: str, messages: list[dict],
                          max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = the id on assistant tokens (content and the marker that
    ends the turn) and -100 on everything else; both truncated from the right to `max_length`.

    `tokenizer` is a glimpse Tokenizer (its bos/eos roles feed the template) or a raw
    `tokenizers.Tokenizer`."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    hf = getattr(tokenizer, "hf", tokenizer)
    roles = getattr(tokenizer, "ids", {})
    mark_specials(hf)
    full, spans = assistant_spans(template, messages, bos_token=token_text(hf, roles, "bos"),
                                  eos_token=token_text(hf, roles, "eos"))
    enc = hf.encode(full, add_special_tokens=False)
    input_ids = list(enc.ids)
    labels = [IGNORE] * len(input_ids)
    j = 0  # spans and offsets are both in text order: walk them together
    for i, (a, b) in enumerate(enc.offsets):
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j < len(spans) and spans[j][0] <= a and b <= spans[j][1] and a < spans[j][1]:
            labels[i] = input_ids[i]
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels
