"""Can a traced video LLaVA read a shape's cell in a frame when it is told which frame?  Teacher forcing on
the world's own traced answers: for single-shape direction questions of test, the model reads the question
and the world's trace up to each entry's cell ("the circle 2:23 4:") and predicts the cell's digits; each
digit is scored against the world's, apart for digits that repeat the entry before (a copy gets them),
digits that change (only looking gets them; the first change of a trace apart from later ones, which the
motion so far predicts), and the first entry (nothing before it to copy).

    python experiments/video_trace_teacher_forced.py RUN WORLD [--n 150]

Where generated traces repeat one cell (video_trace_check.py), this says whether the model cannot see the
change even when the frame is named and the trace so far is right (reading), or sees it here and loses it
in its own generation (drift).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

import glimpse
from glimpse.data import shapes_video as sv
from glimpse.data import shapes_video_traces as tr
from glimpse.data.conversations import encode_sample
from glimpse.families.video_llava.model import VideoLanguageModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("world")
    ap.add_argument("--n", type=int, default=150)
    a = ap.parse_args()
    root = Path(a.world)
    pipe = glimpse.load(a.run)
    m, tok = pipe.model.eval(), pipe.tokenizer
    cfg = m.cfg
    clips = {c.video_id: c for c in sv.read_clips(root / "annotations/captions_test.json", root / "videos/test")}
    qa = [q for q in json.loads((root / "annotations/qa_test.json").read_text())
          if q["question_type"] == "direction"][:a.n]
    score: Counter = Counter()
    for q in qa:
        clip = clips[q["video_id"]]
        trace = tr.answer_trace("direction", q["shapes"], clip.tracks, clip.width, cfg.trace_style)
        entries = trace.split()[2:]
        messages = [{"role": "user", "content": f"<image>\n{q['question']}"},
                    {"role": "assistant", "content": tr.traced(q["answer"], trace)}]
        encoded = encode_sample(tok, cfg.chat_template, messages, 1, VideoLanguageModel.count_image_tokens(cfg),
                                cfg.lm.context_length)
        if isinstance(encoded, str):
            score["dropped"] += 1
            continue
        ids = torch.tensor([encoded[0]])
        with torch.no_grad():
            predicted = m(ids, torch.ones_like(ids), pipe.load_pixels(clip.path)[None]).argmax(-1)[0]
        # each entry's cell digits in the token sequence: the answer's text tokens, found by decoding
        # the assistant's tokens one at a time and matching where each entry's cell starts
        start = next(i for i, lab in enumerate(encoded[1]) if lab != -100)
        pieces = [tok.hf.decode([t]) for t in encoded[0][start:]]
        text, offsets = "", []
        for p in pieces:
            offsets.append(len(text))
            text += p
        pos = len("the ") + len(q["shapes"][0]) + 1
        previous, moved = None, False  # moved: a change of cell is in the trace so far
        for entry in entries:
            frame, cell = entry.split(":")
            at = text.index(entry, pos) + len(frame) + 1  # the cell's first character
            pos = at + len(cell)
            for d in range(2):
                char = at + d
                i = max(j for j, o in enumerate(offsets) if o <= char)  # the token holding this digit
                if offsets[i] != char:  # a token holding ":" and the digit too: not a digit of its own
                    score["digit in a longer token"] += 1
                    continue
                got = tok.hf.decode([int(predicted[start + i - 1])])
                kind = "first entry" if previous is None else \
                    "repeats the entry before" if previous[d] == cell[d] else \
                    "changes, the first" if not moved else "changes, later"
                score[kind, "n"] += 1
                score[kind, "right"] += got.strip()[:1] == cell[d]
                if kind.startswith("changes"):
                    score[kind, "copied"] += got.strip()[:1] == previous[d]
            moved = moved or (previous is not None and previous != cell)
            previous = cell
    print(f"{len(qa)} direction questions ({score['dropped']} dropped); digits inside longer tokens: "
          f"{score['digit in a longer token']}")
    for kind in ("first entry", "repeats the entry before", "changes, the first", "changes, later"):
        n = score[kind, "n"]
        extra = f", the entry before's digit instead {score[kind, 'copied'] / max(n, 1):.3f}" \
            if kind.startswith("changes") else ""
        print(f"{kind:>26}: {score[kind, 'right'] / max(n, 1):.3f} of {n} digits right{extra}")


if __name__ == "__main__":
    main()
