"""Where a video LLaVA's answers go wrong: per question type, the gold -> predicted counts of a split,
and the errors split by what the clip holds (how many shapes, whether the asked shape appears late,
disappears, changes colour or bounces).  What `glimpse eval` reports as one accuracy per type, opened up.

    python experiments/video_llava_confusions.py RUN WORLD [--split test] [--types direction colour exists] [--limit N]
        [--view played|shuffled|single]

--view shuffled asks of the clips with their frames in `glimpse eval`'s shuffled order (seed 0, one
permutation a clip, in the split's order), single of the middle frame held (the single-frame baseline);
answers are still scored against the clip as it plays.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

import glimpse
from glimpse.data.shapes_video import read_clips
from glimpse.data.shapes_video_text import observe
from glimpse.families.video_llava.data import hold_middle
from glimpse.families.video_llava.evaluate import _norm


def clip_traits(clip, shapes: list[str]) -> list[str]:
    """Coarse facts of the clip and the asked shape that might explain an error."""
    out = [f"{len(clip.tracks)} shapes"]
    for f in map(observe, clip.tracks):  # the world's own reading of each track
        if f.shape not in shapes:
            continue
        out += [name for name, there in (("appears late", f.appear > 0), ("disappears", f.disappear is not None),
                                         ("changes colour", f.change is not None), ("bounces", bool(f.bounces)))
                if there]
    if clip.reversed:
        out.append("reversed")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("world", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--types", nargs="*", default=None, help="question types to open (all by default)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="only the first N questions (after --types)")
    ap.add_argument("--view", choices=("played", "shuffled", "single"), default="played")
    args = ap.parse_args()
    pipe = glimpse.load(args.run)
    clips = {c.video_id: c for c in read_clips(args.world / "annotations" / f"captions_{args.split}.json",
                                               args.world / "videos" / args.split)}
    qa = json.loads((args.world / "annotations" / f"qa_{args.split}.json").read_text())
    if args.types:
        qa = [q for q in qa if q["question_type"] in args.types]
    qa = qa[:args.limit] if args.limit else qa
    rng = np.random.default_rng(0)
    T = pipe.model.cfg.num_frames
    perms = {v: rng.permutation(T) for v in clips}  # as evaluate_split draws them
    view = {"played": lambda v, x: x, "shuffled": lambda v, x: x[perms[v]],
            "single": lambda v, x: hold_middle(x)}[args.view]
    pixels = {v: view(v, pipe.load_pixels(clips[v].path)) for v in {q["video_id"] for q in qa}}
    pred = []
    for i in range(0, len(qa), args.batch_size):
        chunk = qa[i:i + args.batch_size]
        pred += [_norm(a) for a in pipe.ask([pixels[q["video_id"]] for q in chunk], [q["question"] for q in chunk],
                                            max_new_tokens=8)]
    confusion: dict[str, Counter] = defaultdict(Counter)
    traits: dict[str, Counter] = defaultdict(Counter)
    totals: dict[str, Counter] = defaultdict(Counter)
    for p, q in zip(pred, qa):
        t = q["question_type"]
        confusion[t][(q["answer"], p)] += 1
        for trait in clip_traits(clips[q["video_id"]], q.get("shapes") or []):
            totals[t][trait] += 1
            traits[t][trait] += p != q["answer"]
    for t in sorted(confusion):
        n = sum(confusion[t].values())
        right = sum(c for (g, p), c in confusion[t].items() if g == p)
        print(f"\n{t}: {right}/{n} = {right / n:.3f}")
        wrong = sorted(((c, g, p) for (g, p), c in confusion[t].items() if g != p), reverse=True)
        print("  errors (gold -> said): " + ", ".join(f"{g}->{p} {c}" for c, g, p in wrong[:12]))
        print("  error rate by clip: " + ", ".join(f"{k} {traits[t][k]}/{totals[t][k]}"
                                                   for k in sorted(totals[t])))


if __name__ == "__main__":
    main()
