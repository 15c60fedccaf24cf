"""Where a video LLaVA trained with `model.answer_traces` goes wrong: its own traces against the world's
(in the run's `model.trace_style`), and whether its answers follow from the traces it wrote.

    python experiments/video_trace_check.py RUN WORLD [--n 60] [--show 10]

For the first N direction and appear-order questions of test: the share of frames whose cells (or "--")
the generated trace gets exactly (both axes), for single-shape traces; the commonest true cell's share
(a constant guess); and, for direction questions, how many answers are what the model's own trace implies
(`trace_direction`: the first change of cell on the axis that changes most) and how many traces imply the
world's answer; how many of its direction traces show no motion against the world's, and how many name
the question's shapes.  A model that reads the answer off its trace but traces badly is limited by seeing
positions, not by reasoning over them.  (Older runs traced one axis (read them with this script as of commit
e625325) or both axes without frame numbers (commit 2fc3d21).)
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import glimpse
from glimpse.data import shapes_video as sv
from glimpse.data import shapes_video_traces as tr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("world")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--show", type=int, default=10)
    a = ap.parse_args()
    root = Path(a.world)
    pipe = glimpse.load(a.run)
    style = pipe.model.cfg.trace_style
    clips = {c.video_id: c for c in sv.read_clips(root / "annotations/captions_test.json", root / "videos/test")}
    qa = [q for q in json.loads((root / "annotations/qa_test.json").read_text())
          if q["question_type"] in ("direction", "appear_order")][:a.n]
    got = pipe.ask([clips[q["video_id"]].path for q in qa], [q["question"] for q in qa], max_new_tokens=100)
    hits = frames = visible_hits = visible = consistent = right_trace = directions = 0
    still_model = still_world = named = 0
    cells: Counter = Counter()
    for k, (q, g) in enumerate(zip(qa, got)):
        c = clips[q["video_id"]]
        true = tr.traced(q["answer"], tr.answer_trace(q["question_type"], q["shapes"], c.tracks, c.width, style))
        if k < a.show:
            print(f"world: {true}\nmodel: {g}")
        if len(q["shapes"]) == 1 and tr.SO in g:
            # each of the model's entries ("3:25", or "3:--" where it says the shape is not visible) against
            # the world's cell in the frame the entry names
            world = dict(w.split(":") for w in tr.answer_trace(q["question_type"], q["shapes"], c.tracks,
                                                               c.width, "frames").split()[2:])
            for m in g.split(tr.SO)[0].split()[2:]:
                frame, _, cell = m.partition(":")
                t = world.get(frame)
                if t is None:
                    continue
                frames += 1
                hits += t == cell
                if t != "--":
                    visible += 1
                    visible_hits += t == cell
                    cells[t] += 1
        named += [p.split()[1] for p in g.split(tr.SO)[0].split(", ") if len(p.split()) > 1] == list(q["shapes"])
        if q["question_type"] == "direction" and tr.SO in g:
            trace, answer = g.rsplit(tr.SO, 1)
            directions += 1
            try:
                implied = tr.trace_direction(trace)
            except (ValueError, IndexError):  # a malformed trace implies nothing
                implied = None
            consistent += implied == answer.strip()
            still_model += implied == "still"
            still_world += tr.trace_direction(true.split(tr.SO)[0]) == "still"
            right_trace += implied == q["answer"]
    print(f"entries traced exactly: {hits / max(frames, 1):.3f} of {frames}; "
          f"where the shape is visible {visible_hits / max(visible, 1):.3f} of {visible} "
          f"(the commonest cell alone: {cells.most_common(1)[0][1] / max(visible, 1):.3f})")
    print(f"direction answers that follow from the model's own trace: {consistent} of {directions}; "
          f"traces that imply the world's answer: {right_trace} of {directions}")
    print(f"direction traces that show no motion: the model's {still_model}, the world's {still_world} of {directions}; "
          f"traces naming the question's shapes in its order: {named} of {len(qa)}")


if __name__ == "__main__":
    main()
