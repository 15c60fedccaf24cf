"""Composed (per-phrase) guidance for a text-to-image run: one sample per prompt at several phrase weights,
read back by the scene parser, on the first --n prompts of test and test_novel.

    python experiments/t2i_phrase_guidance.py RUN WORLD [--n 200] [--weights 0,0.5,1,2] [--guidance G]

Prints exact-scene and per-object accuracy (and, on test_novel, the share of novel colour-shape objects
drawn) for each weight; weight 0 is the run's plain classifier-free guidance.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import glimpse
from glimpse.data.scene_parser import parse_scene, scene_accuracy
from glimpse.data.world import read_scenes
from glimpse.families.text_to_image.evaluate import _novel_found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("world", type=Path)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--weights", default="0,0.5,1,2")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--splits", default="test,test_novel")
    ap.add_argument("--mode", default="conjunction", choices=["conjunction", "leave_one_out"])
    a = ap.parse_args()
    pipe = glimpse.load(a.run)
    pipe.model.cfg.phrase_mode = a.mode
    for split in a.splits.split(","):
        scenes = read_scenes(a.world, split)[: a.n]
        prompts, truth = [s.captions[0] for s in scenes], [s.scene for s in scenes]
        for w in (float(x) for x in a.weights.split(",")):
            t = time.perf_counter()
            images = pipe.generate_arrays(prompts, 1, 0, phrase_guidance=w, guidance=a.guidance)[:, 0]
            parses = [parse_scene(im) for im in images]
            acc = scene_accuracy(parses, truth)
            novel = f"  novel objects {_novel_found(parses, truth):.3f}" if split == "test_novel" else ""
            print(f"{split:10s} phrase weight {w:4.1f}: exact {acc['exact']:.3f}  per object {acc['per_object']:.3f}"
                  f"{novel}  ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
