"""Does a dual encoder bind attributes to objects?  Each test scene's plain caption against captions that
change it a little (Winoground / ARO style, on the shapes world where the truth is known):

- `swap`: two objects trade their colours, or their shapes (the same words, bound otherwise; scenes of
  2-3 objects with different values to trade);
- `replace`: one object's colour, or shape, becomes another one;
- `hard9`: the 9 captions of the text-to-image family's hard R-precision (`hard_negatives`: one attribute
  changed or a binding swapped).

A case is right when the image scores its own caption above every changed one; chance is 1/2 for `swap`
and `replace`, 1/10 for `hard9`.  A bag-of-words model cannot do better than chance on `swap`.

    python experiments/binding_probe.py RUN [RUN ...] --world WORLD [--split test] [--n 1000]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

import glimpse
from glimpse.data.shapes_words import COLOURS, SHAPES, scene_caption
from glimpse.data.world import read_scenes
from glimpse.families.text_to_image.evaluate import hard_negatives


def changed(objects: list[dict], rng: random.Random) -> dict[str, str]:
    """One caption of each kind that applies to this scene."""
    out = {}
    for attr in ("colour", "shape"):
        pairs = [(a, b) for a in range(len(objects)) for b in range(a + 1, len(objects))
                 if objects[a][attr] != objects[b][attr]]
        if pairs:
            a, b = rng.choice(pairs)
            swapped = [dict(o) for o in objects]
            swapped[a][attr], swapped[b][attr] = objects[b][attr], objects[a][attr]
            out.setdefault("swap", scene_caption(swapped))
    k = rng.randrange(len(objects))
    attr = rng.choice(["colour", "shape"])
    replaced = [dict(o) for o in objects]
    replaced[k][attr] = rng.choice([v for v in (COLOURS if attr == "colour" else SHAPES) if v != objects[k][attr]])
    out["replace"] = scene_caption(replaced)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--world", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=1000)
    a = ap.parse_args()
    scenes = read_scenes(Path(a.world), a.split)[:a.n]
    rng = random.Random(0)
    cases = [(w, scene_caption(w.scene), changed(w.scene, rng), hard_negatives(w.scene, rng)) for w in scenes]
    for run in a.runs:
        pipe = glimpse.load(run)
        with torch.no_grad():
            images = pipe.embed_images([w.path for w, *_ in cases])
            right: dict[str, list[bool]] = {"swap": [], "replace": [], "hard9": []}
            for image, (_, truth, one, nine) in zip(images, cases):
                for kind, texts in [(k, [truth, t]) for k, t in one.items()] + [("hard9", [truth, *nine])]:
                    scores = pipe.embed_texts(texts) @ image
                    right[kind].append(bool(scores[0] > scores[1:].max()))
        cells = "  ".join(f"{k} {sum(v) / len(v):.3f} (n {len(v)})" for k, v in right.items())
        print(f"{run}: {cells}")


if __name__ == "__main__":
    main()
