"""Does a language model run learn in context?  Text binding episodes with made-up words from the test
pool ("red dakim / blue vomal / red" -> "dakim"): accuracy of the likeliest of the episode's 3 words
after k example lines (chance 1/3), over 200 episodes per k.  Flamingo can learn from its examples
only as well as its frozen LM does (docs/results.md, 2026-11-26).

    python experiments/text_icl_probe.py runs/shapes-lm-icl
"""

import random
import sys

import torch

import glimpse
from glimpse.data.lm_text import nonce_words
from glimpse.data.shapes import COLOURS


def main(run: str, episodes: int = 200) -> None:
    pipe = glimpse.load(run)
    model, tok = pipe.model.eval(), pipe.tokenizer
    words = nonce_words("test")
    for k in (0, 1, 2, 4, 8):
        right = 0
        for e in range(episodes):
            rng = random.Random(e)
            chosen = rng.sample(COLOURS, 3)
            word_of = dict(zip(chosen, rng.sample(words, 3)))
            examples = [rng.choice(chosen) for _ in range(8)][:k]
            query = rng.choice(chosen)
            prompt = "".join(f"{c} {word_of[c]}\n" for c in examples) + query
            start = len(tok.encode(prompt, add_bos=True))
            scores = []
            for c in chosen:
                ids = tok.encode(prompt + f" {word_of[c]}\n", add_bos=True)
                with torch.no_grad():
                    logp = model(torch.tensor([ids])).log_softmax(-1)[0]
                scores.append(sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))))
            right += chosen[scores.index(max(scores))] == query
        print(f"k={k}: {right / episodes:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
