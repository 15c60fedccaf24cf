"""Which objects an image tokenizer gets wrong: the scene parser on the reconstructions of a split's
first N images, tallied by (size, shape) and by colour, with the reasons of the parses flagged `extra`.

    python experiments/vq_misses.py RUN WORLD [--split test] [--n 200]

RUN is a `shapes-vq` run, WORLD the shapes world it was trained on (the folder with annotations/).
An object counts as right when its reconstruction's parse holds it with the same size, colour, shape
and position (the per-object figure of `glimpse eval`).
"""

from __future__ import annotations

import argparse
from collections import Counter

from PIL import Image

import glimpse
from glimpse.data.scene_parser import parse_scene
from glimpse.data.shapes import scene_key
from glimpse.data.world import read_scenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("world")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    pipe = glimpse.load(args.run)
    scenes = read_scenes(args.world, args.split)[: args.n]
    right, total, by_colour, by_colour_total, reasons = Counter(), Counter(), Counter(), Counter(), Counter()
    exact = 0
    for start in range(0, len(scenes), 64):
        chunk = scenes[start:start + 64]
        recon = pipe.reconstruct([Image.open(s.path).convert("RGB") for s in chunk])
        for s, im in zip(chunk, recon):
            parse = parse_scene(im)
            got = set(parse.key)
            exact += parse.key == scene_key(s.scene) and not parse.extra
            reasons.update(r.split(" (")[0] for r in parse.reasons)
            for o in s.scene:
                ok = tuple(o[f] for f in ("size", "colour", "shape", "position")) in got
                right[(o["size"], o["shape"])] += ok
                total[(o["size"], o["shape"])] += 1
                by_colour[o["colour"]] += ok
                by_colour_total[o["colour"]] += 1
    print(f"{args.split}: {len(scenes)} images, exact {exact / len(scenes):.3f}, "
          f"objects right {sum(right.values())}/{sum(total.values())}")
    print("by size and shape: " + ", ".join(f"{size} {shape} {right[size, shape]}/{n}" for (size, shape), n in sorted(total.items())))
    print("by colour: " + ", ".join(f"{c} {by_colour[c]}/{by_colour_total[c]}" for c in sorted(by_colour_total)))
    print("extra, by reason: " + (", ".join(f"{r} {n}" for r, n in reasons.most_common()) or "none"))


if __name__ == "__main__":
    main()
