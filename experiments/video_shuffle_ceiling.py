"""What a perfect video reader scores on the shuffled-frames control of `glimpse eval` (video_llava): each
temporal question answered as the clip's frames show it in the shuffled order, against the answer of
the clip as it plays.  The same permutations as `evaluate_split` (seed 0, one per clip, in the split's
order), so the figure sits beside the model's `shuffled_temporal_acc` and `chance_temporal`.

    python experiments/video_shuffle_ceiling.py WORLD [--splits test test_novel]

A reader that reads frame order correctly gives these answers, so a model reading order correctly scores
about this on shuffled frames.  A shuffle keeps which shapes move and along which axis (so "still", and
left-or-right against up-or-down, survive: above chance) and turns a moving track back and forth at most
frames (bounce counts: far below); on the 12,000-clip world the two about cancel (docs/results.md,
session 25).  Questions a shuffled clip gives no answer to (forward or reverse, an order the
shuffle ties, an event the shuffle removes) get the type's most common training answer, as chance does.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from glimpse.data.shapes_video import read_clips
from glimpse.data.shapes_video_text import TEMPORAL_TYPES, _events, answer_of, observe
from glimpse.families.video_llava.evaluate import _chance


def shuffled(tracks: list[dict], perm: np.ndarray) -> list[dict]:
    return [{"shape": t["shape"], **{k: [t[k][i] for i in perm] for k in ("colours", "xs", "ys")}} for t in tracks]


def read_answer(q: dict, tracks: list[dict], majority: dict[str, str]) -> str:
    """The answer the shuffled clip shows, or the type's most common answer where it shows none."""
    t = q["question_type"]
    if t in ("direction", "bounces", "appear_order", "disappear_order"):
        got = answer_of(t, q["shapes"], tracks, False)
        return majority[t] if got is None else got
    if t == "before_after":
        events = {(f.shape, e): at for f in map(observe, tracks) for e, at in _events(f)}
        words = q["question"].removeprefix("does the ").removesuffix("?").split(" before or after the ")
        (s1, *e1), (s2, *e2) = (w.split(" ") for w in words)
        a, b = events.get((s1, " ".join(e1))), events.get((s2, " ".join(e2)))
        return majority[t] if a is None or b is None or a == b else "before" if a < b else "after"
    return majority[t]  # arrow: a shuffle plays neither way


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", type=Path)
    ap.add_argument("--splits", nargs="+", default=["test", "test_novel"])
    args = ap.parse_args()
    majority = _chance(args.world)
    for split in args.splits:
        clips = read_clips(args.world / "annotations" / f"captions_{split}.json", args.world / "videos" / split)
        rng = np.random.default_rng(0)
        T = len(clips[0].tracks[0]["colours"])
        perms = {c.video_id: rng.permutation(T) for c in clips}
        tracks = {c.video_id: c.tracks for c in clips}
        qa = [q for q in json.loads((args.world / "annotations" / f"qa_{split}.json").read_text())
              if q["question_type"] in TEMPORAL_TYPES]
        hits, chance = defaultdict(list), defaultdict(list)
        for q in qa:
            got = read_answer(q, shuffled(tracks[q["video_id"]], perms[q["video_id"]]), majority)
            hits[q["question_type"]].append(got == q["answer"])
            chance[q["question_type"]].append(majority[q["question_type"]] == q["answer"])
        every = [h for v in hits.values() for h in v]
        base = [h for v in chance.values() for h in v]
        print(f"{split}: perfect reader on shuffled frames {np.mean(every):.3f}, chance {np.mean(base):.3f} "
              f"({len(every)} temporal questions)")
        for t in sorted(hits):
            print(f"  {t:>16}: {np.mean(hits[t]):.3f} (chance {np.mean(chance[t]):.3f}, n {len(hits[t])})")


if __name__ == "__main__":
    main()
