"""Which heads of a language model run copy the previous token, and which do induction (attend from a
token to what followed its earlier occurrence)?  Flamingo's binding episodes need both: the word after
each example image must carry that image's colour (a previous-token head reading the `Output:` token
the cross-attention wrote it into), and the query must find it (an induction head).  A gated block
placed after the previous-token head's layer cannot write the colour where that head reads it
(docs/results.md, 2026-11-27).

Text episodes as `experiments/text_icl_probe.py` builds them ("red dakim / blue vomal / red"), 8
examples, 100 episodes; per layer and head:
- prev: mean attention from each token to the token before it;
- induction: at the query's colour token, attention to the first token of the words that followed
  the same colour earlier (the positions an induction head reads; uniform attention gives their share).

    python experiments/lm_heads_probe.py runs/shapes-lm-icl
"""

import random
import sys

import torch

import glimpse
from glimpse.data.lm_text import nonce_words
from glimpse.data.shapes import COLOURS
from glimpse.models.attention import record_attention


def main(run: str, episodes: int = 100, shots: int = 8) -> None:
    pipe = glimpse.load(run)
    model, tok = pipe.model.eval(), pipe.tokenizer
    words = nonce_words("test")
    attn_modules = [b.attn for b in model.blocks]
    L, H = len(attn_modules), model.cfg.heads
    prev, induction, uniform = torch.zeros(L, H), torch.zeros(L, H), 0.0
    for e in range(episodes):
        rng = random.Random(e)
        chosen = rng.sample(COLOURS, 3)
        word_of = dict(zip(chosen, rng.sample(words, 3)))
        examples = [rng.choice(chosen) for _ in range(shots)]
        query = rng.choice(examples)  # a colour shown before, so that induction has a target
        text, targets = "", []
        for c in examples:
            if c == query:  # the first token of the word after this colour (checked below)
                targets.append(len(tok.encode(text + c, add_bos=True)))
            text += f"{c} {word_of[c]}\n"
        ids = tok.encode(text + query, add_bos=True)
        for t in targets:
            assert word_of[query].startswith(tok.decode(ids[t:t + 1]).strip())
        with torch.no_grad(), record_attention() as rec:
            model(torch.tensor([ids]))
        maps = rec.maps_of(attn_modules)  # each [1, H, T, T]
        T = len(ids)
        for layer, m in enumerate(maps):
            p = m[0]
            prev[layer] += p[:, torch.arange(1, T), torch.arange(0, T - 1)].mean(-1)
            induction[layer] += p[:, -1, targets].sum(-1)
        uniform += len(targets) / T
    prev, induction = prev / episodes, induction / episodes
    print(f"{run}: {episodes} episodes of {shots} examples; uniform attention gives induction "
          f"{uniform / episodes:.3f}")
    for layer in range(L):
        print(f"layer {layer}: prev " + " ".join(f"{v:.2f}" for v in prev[layer])
              + "   induction " + " ".join(f"{v:.2f}" for v in induction[layer]))


if __name__ == "__main__":
    main(sys.argv[1])
