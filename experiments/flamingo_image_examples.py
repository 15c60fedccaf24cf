"""Flamingo binding by the number of examples shown as images: the same test episodes with k examples,
m of them images (`<image>Output: dakim`) and the other k - m in the LM's text form ("red dakim"), the
query an image.  It separates "more examples" from "more image examples" when accuracy falls with k.

    python experiments/flamingo_image_examples.py RUN [--k 4 8] [--episodes 200] [--where last|first] [--step 1]

`--where`: the image examples are the last m of the k (nearest the query) or the first m.
"""

from __future__ import annotations

import argparse
import random

import torch

from glimpse.api import load_run
from glimpse.families.flamingo.data import (
    binding_episode,
    nonce_words,
    read_scenes,
    single_object_images,
    text_example,
)
from glimpse.families.flamingo.evaluate import _Pixels, choice_scores
from glimpse.train.trainer import data_root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--split", default="test")
    ap.add_argument("--where", choices=("last", "first"), default="last")
    ap.add_argument("--step", type=int, default=1, help="m from 0 to k in these steps")
    args = ap.parse_args()
    task, model = load_run(args.run, [])
    model.eval()
    r = task.recipe
    scenes = read_scenes(r.data, data_root(r, False), args.split)
    by_colour, words = single_object_images(scenes), nonce_words("test")
    pixels = _Pixels(scenes, task.transform, r.data.max_pixels)
    K = max(args.k)
    eps = [binding_episode(random.Random(f"binding/0/{e}"), by_colour, words, r.model.episode_colours, K)
           for e in range(args.episodes)]
    for k in args.k:
        cells = []
        for m in range(0, k + 1, args.step):
            right = n = too_long = 0
            for images, texts, cands, answer in eps:
                is_image = [j >= k - m for j in range(k)] if args.where == "last" else [j < m for j in range(k)]
                px = pixels.get([i for i, img in zip(images[:k], is_image) if img] + [images[-1]])
                if px is None:
                    continue
                shown = [t if img else text_example(scenes[i].colours[0], t)
                         for i, t, img in zip(images[:k], texts[:k], is_image)]
                pick = choice_scores(model, task.tokenizer, [(shown, px, [not img for img in is_image])], [cands],
                                     r.model.lm.context_length)[0]
                if pick is None:  # longer than the LM's context (choice_scores)
                    too_long += 1
                    continue
                right += cands[pick] == answer
                n += 1
            cells.append(f"m={m}: {right / max(n, 1):.3f}" + (f" ({too_long} too long)" if too_long else ""))
        print(f"k={k} ({args.where} m as images, {args.split}, {n} episodes): " + "  ".join(cells))


if __name__ == "__main__":
    with torch.no_grad():
        main()
