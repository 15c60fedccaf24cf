import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from glimpse.data.chat import TEMPLATES, from_llava, render, tokenize_conversation
from glimpse.data.tokenizer import Tokenizer, train_tokenizer

SENTENCES = [
    "a large red circle on the left", "a small blue square at the top", "what is in the image?",
    "describe the shape", "there is a green triangle", "user assistant system chat answer question",
] * 10

ONE_TURN = [
    {"role": "user", "content": "<image>\nwhat is in the image?"},
    {"role": "assistant", "content": "a large red circle on the left"},
]
THREE_TURNS = [
    {"role": "user", "content": "<image>\ndescribe the shape"},
    {"role": "assistant", "content": "a small blue square"},
    {"role": "user", "content": "what colour is it?"},
    {"role": "assistant", "content": "it is blue"},
    {"role": "user", "content": "where is it?"},
    {"role": "assistant", "content": "at the top"},
]
SYSTEM = [{"role": "system", "content": "you answer questions about shapes"}]


@pytest.fixture(scope="module")
def shapes_tok(tmp_path_factory):
    """The shapes-world tokenizer: <pad> <bos> <eos> <image> <unk> are special, no chatml markers."""
    return train_tokenizer(SENTENCES, tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=300)


@pytest.fixture(scope="module")
def chatml_tok(shapes_tok, tmp_path_factory):
    """The same tokenizer with <|im_start|> and <|im_end|> added as special tokens."""
    hf = HFTokenizer.from_file(str(shapes_tok.path))
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    path = tmp_path_factory.mktemp("chatml") / "tokenizer.json"
    hf.save(str(path))
    return Tokenizer(path)


def end_marker(name, tok):
    if name == "chatml":
        return "<|im_end|>"
    return tok.hf.id_to_token(tok.ids["eos"])  # llava and plain close an answer with the eos


def check_mask(tok, name, messages):
    """Token by token: labelled tokens are exactly the assistant contents + end markers."""
    bos, eos = (tok.hf.id_to_token(tok.ids[r]) for r in ("bos", "eos"))
    ids, labels = tokenize_conversation(tok, name, messages)
    assert len(ids) == len(labels) and ids
    text = render(name, messages, bos_token=bos, eos_token=eos)
    enc = tok.hf.encode(text, add_special_tokens=False)
    assert enc.ids == ids
    marker = end_marker(name, tok)
    # where each assistant answer (content + marker) sits in the text, found independently
    answers, cursor = [], 0
    for m in messages:
        if m["role"] == "assistant":
            at = text.index(m["content"] + marker, cursor)
            answers.append((at, at + len(m["content"]) + len(marker)))
            cursor = answers[-1][1]
    runs = [[] for _ in answers]  # labelled token indices, per answer
    for i, (label, (a, b)) in enumerate(zip(labels, enc.offsets)):
        assert label in (-100, ids[i])
        if label == -100:
            # an unlabelled token touches no answer character...
            assert not any(a < e and b > s for s, e in answers), (i, text[a:b])
        else:
            # ...and a labelled one is inside an answer, up to the leading space LLaVA generates
            inside = [n for n, (s, e) in enumerate(answers) if s - 1 <= a and b <= e]
            assert inside, (i, text[a:b])
            runs[inside[0]].append(i)
    assert all(r == list(range(r[0], r[-1] + 1)) for r in runs)  # each answer is one contiguous run
    expected = [m["content"] + marker for m in messages if m["role"] == "assistant"]
    covered = [text[enc.offsets[r[0]][0]:enc.offsets[r[-1]][1]].lstrip() for r in runs]
    assert covered == expected
    decoded = [tok.decode([ids[i] for i in r], skip_special=False).strip() for r in runs]
    assert decoded == expected
    # the image placeholder is one token, never labelled
    image = [i for i, t in enumerate(ids) if t == tok.ids["image"]]
    assert len(image) == text.count("<image>") == 1
    assert labels[image[0]] == -100
    return ids, labels


@pytest.mark.parametrize("name", ["chatml", "llava", "plain"])
@pytest.mark.parametrize("turns", ["one", "three"])
def test_assistant_mask_token_by_token(name, turns, shapes_tok, chatml_tok):
    messages = ONE_TURN if turns == "one" else THREE_TURNS
    if name == "chatml":
        ids, _ = check_mask(chatml_tok, name, SYSTEM + messages)
        im_start = chatml_tok.hf.token_to_id("<|im_start|>")
        assert ids.count(im_start) == len(SYSTEM + messages)  # the markers are single special ids
        check_mask(shapes_tok, name, messages)  # markers as plain text: the mask is still exact
    else:
        check_mask(shapes_tok, name, messages)


def test_render_chatml_by_hand():
    messages = SYSTEM + ONE_TURN
    expected = (
        "<|im_start|>system\nyou answer questions about shapes<|im_end|>\n"
        "<|im_start|>user\n<image>\nwhat is in the image?<|im_end|>\n"
        "<|im_start|>assistant\na large red circle on the left<|im_end|>\n"
    )
    assert render("chatml", messages) == expected
    assert render("chatml", messages, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"
    assert render("chatml", messages[:2], add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_render_llava_and_plain():
    text = render("llava", ONE_TURN[:1], add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert text.startswith("<s>A chat between a curious human")
    assert text.endswith("questions. USER: <image>\nwhat is in the image? ASSISTANT:")
    assert render("llava", SYSTEM + ONE_TURN, eos_token="</s>") == (
        "you answer questions about shapes USER: <image>\nwhat is in the image? "
        "ASSISTANT: a large red circle on the left</s>"
    )
    assert render("plain", ONE_TURN, bos_token="<bos>", eos_token="<eos>") == (
        "<bos><image>a large red circle on the left<eos>"
    )


@pytest.mark.parametrize("name", ["chatml", "llava", "plain"])
def test_render_matches_transformers(name, chatml_tok):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=chatml_tok.hf, bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = TEMPLATES[name]
    for messages in (ONE_TURN, SYSTEM + THREE_TURNS, THREE_TURNS[:3]):
        for gen in (False, True):
            ours = render(name, messages, add_generation_prompt=gen, bos_token="<bos>", eos_token="<eos>")
            assert ours == fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_from_llava():
    turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    assert from_llava(turns) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "<image>\nq"},
        {"role": "assistant", "content": "a"},
    ]
    with pytest.raises(ValueError, match="unknown speaker 'bot'"):
        from_llava([{"from": "bot", "value": "x"}])


def test_errors(shapes_tok):
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        render("vicuna", ONE_TURN)
    with pytest.raises(ValueError, match="unknown chat template"):
        tokenize_conversation(shapes_tok, "nope", ONE_TURN)
    with pytest.raises(ValueError, match="role 'bot'"):
        render("chatml", [{"role": "bot", "content": "hi"}])
    with pytest.raises(ValueError, match="empty conversation"):
        tokenize_conversation(shapes_tok, "chatml", [])
    with pytest.raises(ValueError, match="alternate user, assistant"):
        render("chatml", [ONE_TURN[0], ONE_TURN[0]])
    with pytest.raises(ValueError, match="alternate"):
        render("chatml", [ONE_TURN[1]])  # starts with the assistant
    with pytest.raises(ValueError, match="alternate"):
        render("chatml", ONE_TURN + SYSTEM)  # a system message only comes first
    with pytest.raises(ValueError, match="chat template: no tools"):
        render("{{ raise_exception('no tools') }}", ONE_TURN)


def test_truncation_keeps_lists_aligned(shapes_tok):
    ids, labels = tokenize_conversation(shapes_tok, "llava", THREE_TURNS)
    for n in (1, 7, len(ids) - 3, len(ids), len(ids) + 10):
        t_ids, t_labels = tokenize_conversation(shapes_tok, "llava", THREE_TURNS, max_length=n)
        assert len(t_ids) == len(t_labels) == min(n, len(ids))
        assert t_ids == ids[:n] and t_labels == labels[:n]
    with pytest.raises(ValueError, match="max_length"):
        tokenize_conversation(shapes_tok, "llava", THREE_TURNS, max_length=0)


def test_word_level_tokenizer_and_custom_template():
    # A foreign tokenizer (whitespace words, no byte-level spaces) with a template given as source.
    words = "<image> USER ASSISTANT : hi there red circle yes [EOS]".split()
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[EOS]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["[EOS]"])  # <image> is only in the vocab: it must still match whole
    source = ("{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] }}"
              "{% if m['role'] == 'assistant' %}{{ ' [EOS] ' }}{% else %}{{ ' ' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    messages = [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "red circle"},
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    ids, labels = tokenize_conversation(hf, source, messages)
    shown = [hf.id_to_token(i) if lab != -100 else "_" for i, lab in zip(ids, labels)]
    assert shown == ["_"] * 6 + ["red", "circle", "[EOS]"] + ["_"] * 5 + ["yes", "[EOS]"]
