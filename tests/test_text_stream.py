"""TextStream turns tokens into text pieces incrementally: the pieces join to the whole decoded text
(leading spaces dropped, half characters held back), and decoding an answer costs O(n) tokens, not O(n^2)."""

from __future__ import annotations

import random

from glimpse.data.tokenizer import Tokenizer
from glimpse.infer.generate import TextStream

TEXTS = ["  a small red circle on the left", "héllo wörld — ünïcode ✓ 日本語 and emoji 🎉🎉 done",
         "USER: where?\nASSISTANT: at the top.", "   "]


def pieces(decode, tokens):
    stream = TextStream(decode)
    return [stream.push(t) for t in tokens]


def test_pieces_join_to_the_whole_text(world):
    tok = Tokenizer(world / "tokenizer.json")  # a byte-level BPE: multi-byte characters span tokens
    rng = random.Random(0)
    samples = [tok.encode(t) for t in TEXTS] + [[rng.randrange(tok.vocab_size) for _ in range(60)] for _ in range(20)]
    for ids in samples:
        # what the whole text was the last time it did not end in half a character (the reference: the
        # stream that decoded every prefix again)
        whole = next((t for t in (tok.decode(ids[:n]).lstrip() for n in range(len(ids), -1, -1))
                      if not t.endswith("\ufffd")), "")
        assert "".join(pieces(tok.decode, ids)) == whole


def test_decoding_an_answer_is_linear_in_its_length(world):
    tok = Tokenizer(world / "tokenizer.json")
    decoded = [0]

    def decode(ids):
        decoded[0] += len(ids)
        return tok.decode(ids)

    ids = tok.encode(" ".join(["a small red circle on the left"] * 40))
    assert len(ids) > 200
    pieces(decode, ids)
    assert decoded[0] < 6 * len(ids)  # the old stream decoded every prefix: n(n+1)/2 tokens
