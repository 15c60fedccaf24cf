"""Where do an explanation's pointing-game misses land: on another object of the scene, or on background?

The cases are `glimpse eval RUN --explain`'s (scenes of 2-3 objects, a text naming one); for each method,
a miss is classed by whether the map's maximum falls inside another object's box.  Misses on other
objects mean the explained score itself leans on them (a dual encoder's similarity rewards objects that
share the named colour or shape); misses on background mean the map is off.

    python experiments/explain_misses.py RUN WORLD [--split val] [--methods chefer,chefer_ig] [--n 200]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import glimpse
from glimpse.explain.core import explain
from glimpse.explain.evaluate import explain_cases, make_explainer
from glimpse.metrics.explain import box_mask, pointing_hit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("world", help="the shapes world the run was trained on (its cache folder)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--methods", default="chefer,chefer_ig")
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    methods = a.methods.split(",")
    pipe = glimpse.load(a.run)
    coco = json.loads((Path(a.world) / "annotations" / f"instances_{a.split}.json").read_text())
    objects = defaultdict(list)
    for o in coco["annotations"]:
        objects[o["image_id"]].append(o["bbox"])
    image_id = {im["file_name"]: im["id"] for im in coco["images"]}
    cases = explain_cases(a.world, a.split, n=a.n, asks=pipe.explains)
    hits, misses = Counter(), {m: Counter() for m in methods}
    for c in cases:
        explainer = make_explainer(pipe, c)
        tol = c.height / explainer.grid_shape[0] / 2  # the pointing game's tolerance, as glimpse eval's
        others = [b for b in objects[image_id[Path(c.image).name]] if b != c.box]
        for m in methods:
            pm = explain(explainer, m).pixel_map(c.height, c.width)
            if pointing_hit(pm, c.box, tol):
                hits[m] += 1
                continue
            y, x = divmod(int(pm.argmax()), c.width)
            on_other = any(bool(box_mask(b, c.height, c.width, 0)[y, x]) for b in others)
            misses[m]["another object" if on_other else "background"] += 1
    for m in methods:
        print(f"{m:22s} pointing {hits[m] / len(cases):.3f}  misses: {dict(misses[m])}  ({len(cases)} cases, {a.split})")


if __name__ == "__main__":
    main()
