"""Can a shape's direction be read, linearly, from what the video models see?  Logistic probes of the
first direction (left/right/up/down/still) of single-shape clips of the moving-shapes world, trained on
the train split's and scored on the test split's, from five representations of a shapes-video-clip run:

    clip          the clip embedding (the mean of the seqTransf outputs), what retrieval compares
    temporal      the seqTransf outputs of the 8 frames, concatenated (the video LLaVA's temporal_tokens)
    frames        the 8 frames' pooled tower embeddings (after the projection), concatenated
    pooled 2x2    the last block's patch grid pooled 2x2 per frame (the video LLaVA's input), concatenated
    grid 4x4      the same grid unpooled

    python experiments/video_direction_probe.py RUN WORLD [--train 1200] [--test 300]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import glimpse
from glimpse.data.shapes_video_text import observe
from glimpse.data.video import clip_pixels


def features(model, transform, world: Path, split: str, n: int):
    videos = json.loads((world / "annotations" / f"captions_{split}.json").read_text())["videos"]
    videos = [v for v in videos if len(v["tracks"]) == 1][:n]
    out: dict[str, list] = {k: [] for k in ("clip", "temporal", "frames", "pooled 2x2", "grid 4x4")}
    labels = []
    for v in videos:
        pixels = clip_pixels(str(world / "videos" / split / v["file_name"]), 8, transform)
        with torch.no_grad():
            frames = model.get_image_features(pixels).unsqueeze(0)  # [1, 8, E]
            per_frame = model.temporal.per_frame(frames)
            grid = model.vision.forward_features(pixels, layer=-1)  # [8, 16, D]
            side = int(grid.shape[1] ** 0.5)
            pooled = F.avg_pool2d(grid.transpose(1, 2).reshape(8, -1, side, side), 2, 2)
        for key, x in (("clip", per_frame.mean(1)), ("temporal", per_frame), ("frames", frames),
                       ("pooled 2x2", pooled), ("grid 4x4", grid)):
            out[key].append(x.flatten().numpy())
        labels.append(observe(v["tracks"][0]).direction)
    return {k: np.stack(v) for k, v in out.items()}, np.array(labels)


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("world", type=Path)
    p.add_argument("--train", type=int, default=1200)
    p.add_argument("--test", type=int, default=300)
    a = p.parse_args()
    torch.set_num_threads(1)
    pipe = glimpse.load(a.run)
    model = pipe.model.eval()
    Xtr, ytr = features(model, pipe.transform, a.world, "train", a.train)
    Xte, yte = features(model, pipe.transform, a.world, "test", a.test)
    majority = max(np.mean(yte == c) for c in set(yte))
    print(f"{len(ytr)} train / {len(yte)} test single-shape clips; majority answer {majority:.3f}")
    for key in Xtr:
        scale = StandardScaler().fit(Xtr[key])
        clf = LogisticRegression(max_iter=3000, C=0.1).fit(scale.transform(Xtr[key]), ytr)
        print(f"{key:<11} {Xtr[key].shape[1]:>6} features  train {clf.score(scale.transform(Xtr[key]), ytr):.3f}  "
              f"test {clf.score(scale.transform(Xte[key]), yte):.3f}")


if __name__ == "__main__":
    main()
