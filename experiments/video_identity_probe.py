"""Does the frozen tower's token at a shape's place say which shape it is and its colour, and at which
depth?  For every visible shape in every frame of multi-shape clips, the token that holds its centre (the
8-px patch, and the 2 x 2-pooled 16-px cell the video LLaVA's LM reads), at each depth of the tower; a
linear probe (multinomial logistic regression, 3/4 of the clips to fit, 1/4 to test) reads its shape and
its colour.  Cells that hold a second shape's centre too are reported apart: there the pooled token mixes
two shapes, and no depth can bind them.

    python experiments/video_identity_probe.py RUN WORLD [--clips 600] [--layers -1 -2 -3]

What `model.vision_feature_layer` to try for binding (docs/results.md, session 28): a depth whose tokens
carry shape and colour better than the last one's.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

import glimpse
from glimpse.data.shapes_video import read_clips


def probe(x: torch.Tensor, y: np.ndarray, fit: np.ndarray, steps: int = 300) -> np.ndarray:
    """Held-out predictions of a logistic regression from x [N, D] to the labels y, fit on rows `fit`."""
    classes = {c: i for i, c in enumerate(sorted(set(y)))}
    t = torch.tensor([classes[c] for c in y])
    mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    fit_t = torch.from_numpy(fit)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z[fit_t] @ w + b, t[fit_t]) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (z @ w + b).argmax(1).numpy() == t.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("world")
    ap.add_argument("--clips", type=int, default=600)
    ap.add_argument("--layers", type=int, nargs="+", default=[-1, -2, -3])
    a = ap.parse_args()
    pipe = glimpse.load(a.run)
    m = pipe.model.eval()
    patch = m.cfg.vision.patch_size
    grid = m.cfg.vision.image_size // patch
    s = getattr(m.cfg, "spatial_pool_stride", 2)
    clips = [c for c in read_clips(f"{a.world}/annotations/captions_train.json", f"{a.world}/videos/train")
             if len(c.tracks) >= 2][:a.clips]
    feats: dict[tuple[int, str], list] = defaultdict(list)
    shape, colour, shared, clip_of = [], [], [], []
    with torch.no_grad():
        for ci, c in enumerate(clips):
            px = pipe.load_pixels(c.path)
            for layer in a.layers:
                full = m.vision.forward_features(px, layer=layer)  # [T, grid*grid, D]
                g = full.transpose(1, 2).reshape(px.shape[0], -1, grid, grid)
                pooled = F.avg_pool2d(g, s, s)
                for t in range(px.shape[0]):
                    for tr in c.tracks:
                        if not tr["colours"][t]:
                            continue
                        x, y = tr["xs"][t], tr["ys"][t]
                        r, k = min(int(y // patch), grid - 1), min(int(x // patch), grid - 1)
                        feats[layer, "patch"].append(g[t, :, r, k])
                        feats[layer, "pooled cell"].append(pooled[t, :, r // s, k // s])
                        if layer == a.layers[0]:
                            shape.append(tr["shape"])
                            colour.append(tr["colours"][t])
                            others = [(o["xs"][t], o["ys"][t]) for o in c.tracks if o is not tr and o["colours"][t]]
                            shared.append(any(int(oy // patch) // s == r // s and int(ox // patch) // s == k // s
                                              for ox, oy in others))
                            clip_of.append(ci)
    clip_of, shared = np.array(clip_of), np.array(shared)
    fit = clip_of % 4 != 0
    test = ~fit
    print(f"{len(clips)} clips of 2-3 shapes, {len(shape)} shape-frames ({test.sum()} held out; "
          f"{(shared & test).sum()} of those share a pooled cell with another shape's centre)")
    print(f"{'layer':>6} {'token':>12} {'shape':>7} {'colour':>7} {'both':>7} {'shape, cell shared':>19}")
    for (layer, kind), rows in feats.items():
        x = torch.stack(rows).float()
        hit_s = probe(x, np.array(shape), fit)
        hit_c = probe(x, np.array(colour), fit)
        both = hit_s & hit_c
        print(f"{layer:>6} {kind:>12} {hit_s[test].mean():7.3f} {hit_c[test].mean():7.3f} {both[test].mean():7.3f} "
              f"{hit_s[test & shared].mean():19.3f}")


if __name__ == "__main__":
    main()
