"""Does a video LLaVA's frozen tower say where a shape is?  A linear probe from one frame's tokens to the
shape's centre (ridge regression, 3/4 of the frames to fit, 1/4 to test), on clips of one shape, for the
tokens the LM reads (the patch grid pooled before the projector) and for the unpooled grid.

    python experiments/video_position_probe.py RUN WORLD [--clips 400]

Prints the mean absolute error in pixels and R^2 for each ridge strength.  The shapes move 2 to 5 px a
frame, so a probe error well under the distance a shape travels in the clip means the positions are there
for the LM to compare.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import glimpse
from glimpse.data.shapes_video import read_clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("world")
    ap.add_argument("--clips", type=int, default=400)
    a = ap.parse_args()
    pipe = glimpse.load(a.run)
    m = pipe.model.eval()
    clips = [c for c in read_clips(f"{a.world}/annotations/captions_train.json", f"{a.world}/videos/train")
             if len(c.tracks) == 1][:a.clips]
    feats: dict[str, list] = {"pooled (what the LM reads)": [], "unpooled grid": []}
    where = []
    T, per_frame = m.cfg.num_frames, m.tokens_per_frame(m.cfg)
    with torch.no_grad():
        for c in clips:
            px = pipe.load_pixels(c.path)[None]
            full = m.vision.forward_features(px.flatten(0, 1), layer=m.cfg.vision_feature_layer)
            pooled = m.tower_features(px)[0].view(T, per_frame, -1)
            t = c.tracks[0]
            for f in range(T):
                if t["colours"][f]:
                    feats["pooled (what the LM reads)"].append(pooled[f].flatten().numpy())
                    feats["unpooled grid"].append(full[f].flatten().numpy())
                    where.append([t["xs"][f], t["ys"][f]])
    y = np.array(where)
    cut = int(len(y) * 0.75)
    for name, rows in feats.items():
        x = np.array(rows)
        x = (x - x[:cut].mean(0)) / (x[:cut].std(0) + 1e-6)
        for lam in (1.0, 10.0, 100.0):
            w = np.linalg.solve(x[:cut].T @ x[:cut] + lam * np.eye(x.shape[1]), x[:cut].T @ (y[:cut] - y[:cut].mean(0)))
            pred = x[cut:] @ w + y[:cut].mean(0)
            r2 = 1 - ((pred - y[cut:]) ** 2).sum() / ((y[cut:] - y[cut:].mean(0)) ** 2).sum()
            print(f"{name:28s} {x.shape[1]:5d} features  ridge {lam:5.0f}: "
                  f"MAE {np.abs(pred - y[cut:]).mean():.2f} px, R^2 {r2:.3f}")


if __name__ == "__main__":
    main()
