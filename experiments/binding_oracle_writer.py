"""Can the frozen LM bind made-up words to colours in Flamingo's image format at all, if the colour is
written perfectly?  An upper bound for the gated blocks before layer 0.

Flamingo's binding episode is `<image>Output: dakim<|endofchunk|>` per example, then `<image>Output:`.
Here no image and no cross-attention: an "oracle writer" adds a learned vector per (colour, position in
the chunk) to the chunk's token embeddings before layer 0, the most a block before layer 0 could write
(it knows each image's colour exactly).  Only those vectors (and the `<image>` / `<|endofchunk|>` rows)
learn; the LM stays frozen.  If k = 4 then beats k = 0 by a wide margin, the LM can do the task and the
blocks' learning is what fails; if not, the LM (its format, its in-context skill) is the limit.

Training episodes use the LM's training word pool, the evaluation the test pool; accuracy is the
likeliest of the episode's 3 words after k examples (chance 1/3), as experiments/text_icl_probe.py.

    python experiments/binding_oracle_writer.py runs/shapes-lm-icl3 [--steps 300] [--slots 4]
"""

from __future__ import annotations

import argparse
import random

import torch

import glimpse
from glimpse.data.lm_text import nonce_words
from glimpse.data.shapes import COLOURS


class Episodes:
    """Token pieces of the image-format episodes: per example ([prefix ids], [word ids]), the prefix
    standing for `<image>Output:` (its first slot is the image token's embedding)."""

    def __init__(self, tok):
        self.tok = tok
        self.prefix = tok.encode("Output:")
        self.words: dict[str, list[int]] = {}

    def word_ids(self, w: str) -> list[int]:
        if w not in self.words:
            self.words[w] = self.tok.encode(f" {w}")
        return self.words[w]

    def draw(self, rng: random.Random, words, k: int):
        chosen = rng.sample(range(len(COLOURS)), 3)
        word_of = dict(zip(chosen, rng.sample(words, 3)))
        examples = [rng.choice(chosen) for _ in range(k)]
        query = rng.choice(chosen)
        return examples, query, word_of, chosen


def build(model, ep: Episodes, writer, image_row, eoc_row, examples, query, word_of, answer_word, slots: int):
    """One episode's input embeddings [T, D], where the answer starts, and the answer's ids.  Every
    token of a chunk gets its colour's write: slot j for the j-th token of `<image>Output:`, the last
    slot for the rest (the word, `<|endofchunk|>`), as each text token reads its latest image."""
    emb = model.embed

    def chunk_start(c):
        pre = torch.cat([image_row[None], emb(torch.tensor(ep.prefix))])
        return pre + writer[c, torch.arange(pre.shape[0]).clamp_max(slots - 1)]

    def word(c, w):
        ids = torch.tensor(ep.word_ids(w))
        return emb(ids) + writer[c, slots - 1], ids

    parts = [emb(torch.tensor([ep.tok.ids["bos"]]))]
    for c in examples:
        parts += [chunk_start(c), word(c, word_of[c])[0], eoc_row[None] + writer[c, slots - 1]]
    parts.append(chunk_start(query))
    start = sum(p.shape[0] for p in parts)
    x, ans = word(query, answer_word)
    return torch.cat(parts + [x]), start, ans


def answer_logp(model, x, start, ans) -> torch.Tensor:
    logits = model(inputs_embeds=x[None])[0]
    logp = logits[start - 1:start - 1 + len(ans)].log_softmax(-1)
    return logp.gather(-1, ans[:, None]).sum()


class _Gated:
    """Indexes like the writer tensor, times tanh(gate)."""

    def __init__(self, raw, gate):
        self.raw, self.gate = raw, gate

    def __getitem__(self, index):
        return self.raw[index] * self.gate.tanh()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4, help="distinct write vectors per colour (the last for the rest)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--episodes", type=int, default=150)
    ap.add_argument("--gated", action="store_true", help="the writes times tanh(gate), the gate starting at 0 "
                    "as a Flamingo block's")
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = glimpse.load(args.run)
    model, tok = pipe.model.eval(), pipe.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    D = model.cfg.width
    ep = Episodes(tok)
    writer = torch.nn.Parameter(torch.randn(len(COLOURS), args.slots, D) * 0.02)
    image_row = torch.nn.Parameter(model.embed(torch.tensor([tok.ids["image"]]))[0].clone())
    eoc_row = torch.nn.Parameter(model.embed(torch.tensor(tok.encode("\n")[-1:]))[0].clone())
    gate = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([writer, image_row, eoc_row] + ([gate] if args.gated else []), lr=args.lr)
    if args.gated:
        writer = _Gated(writer, gate)
    train_words, test_words = nonce_words("train"), nonce_words("test")

    def evaluate(label: str) -> None:
        out = []
        for k in (0, 1, 2, 4, 8):
            right = 0
            for e in range(args.episodes):
                rng = random.Random(10_000 + e)
                examples, query, word_of, chosen = ep.draw(rng, test_words, 8)
                examples = examples[:k]
                with torch.no_grad():
                    scores = [answer_logp(model, *build(model, ep, writer, image_row, eoc_row, examples, query,
                                                        word_of, word_of[c], args.slots)) for c in chosen]
                right += chosen[max(range(3), key=lambda i: scores[i])] == query
            out.append(f"k={k} {right / args.episodes:.3f}")
        print(f"{label}: " + "  ".join(out), flush=True)

    evaluate("step 0")
    rng = random.Random(0)
    for step in range(1, args.steps + 1):
        loss = 0.0
        for _ in range(args.batch):
            k = rng.randint(1, 8)
            examples, query, word_of, _ = ep.draw(rng, train_words, k)
            x, start, ans = build(model, ep, writer, image_row, eoc_row, examples, query, word_of, word_of[query],
                                  args.slots)
            loss = loss - answer_logp(model, x, start, ans) / len(ans)
        loss = loss / args.batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} tanh(gate) {gate.tanh().item():.3f}", flush=True)
        if step % 150 == 0 or step == args.steps:
            evaluate(f"step {step}")


if __name__ == "__main__":
    main()
