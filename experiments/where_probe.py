"""Can a vision-language run's image features say where a named object is?  A probe with one
attention layer reads the frozen tower features (the ones the run's connector sees) of the shapes
world's training images and answers "where is the <colour> <shape>?" for every object whose
colour and shape are unique in its scene: its query is a learned colour embedding plus a learned
shape embedding, its keys and values a linear map of each image token plus a learned per-token
position.  Test accuracy is printed over all scenes and over scenes of two or three objects (where
the object has to be picked out) as the probe sees more questions.

If the probe answers well after as many questions as a LLaVA run saw, the features hold what the
question needs and it is the LM that has not yet learned to pick the named object out of them
(README, "glimpse demo, LLaVA part").

    python experiments/where_probe.py runs/demo/shapes-llava-stage2 --steps 100 350 1000 3000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from glimpse.api import load_run
from glimpse.families.feature_cache import cache_tower_features
from glimpse.train.trainer import data_root


def split_data(task, model, root: Path, split: str, colours, shapes, positions):
    """(tower features [N, T, D], questions [Q, 4] as (image, colour, shape, position), objects per image [N])."""
    images = json.loads((root / "annotations" / f"captions_{split}.json").read_text())["images"]
    paths = [str(root / "images" / split / i["file_name"]) for i in images]
    c = model.cfg
    rows, cache = cache_tower_features(model, paths, task.transform, task.recipe.data.max_pixels, torch.device("cpu"),
                                       progress=False, settings=(c.vision_feature_layer, c.vision_feature_select,
                                                                 c.connector, c.prefix_source))
    bad = next((str(r) for r in rows.values() if not isinstance(r, int)), None)
    if bad:
        raise SystemExit(bad)
    questions = [(k, colours.index(o["colour"]), shapes.index(o["shape"]), positions.index(o["position"]))
                 for k, i in enumerate(images) for o in i["scene"]
                 if sum((p["colour"], p["shape"]) == (o["colour"], o["shape"]) for p in i["scene"]) == 1]
    return cache[[rows[p] for p in paths]], torch.tensor(questions), torch.tensor([len(i["scene"]) for i in images])


class WhereProbe(nn.Module):
    def __init__(self, n_colours: int, n_shapes: int, n_positions: int, tokens: int, dim_in: int, dim: int = 64):
        super().__init__()
        self.colour, self.shape = nn.Embedding(n_colours, dim), nn.Embedding(n_shapes, dim)
        self.key, self.value = nn.Linear(dim_in, dim), nn.Linear(dim_in, dim)
        self.key_pos = nn.Parameter(0.1 * torch.randn(tokens, dim))
        self.value_pos = nn.Parameter(0.1 * torch.randn(tokens, dim))
        self.out = nn.Linear(dim, n_positions)

    def forward(self, feats: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        query = self.colour(colour) + self.shape(shape)  # [B, d]
        keys, values = self.key(feats) + self.key_pos, self.value(feats) + self.value_pos  # [B, T, d]
        weights = torch.softmax(torch.einsum("btd,bd->bt", keys, query) / query.shape[-1] ** 0.5, dim=-1)
        return self.out(torch.einsum("bt,btd->bd", weights, values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a vision-language run on the shapes world (LLaVA stage 1 or 2)")
    p.add_argument("--steps", type=int, nargs="+", default=[100, 350, 1000, 3000], help="report after these steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args()
    torch.manual_seed(0)
    task, model = load_run(a.run)
    model.eval()
    root = data_root(task.recipe, False)
    world = json.loads((root / "world.json").read_text())
    names = world["colours"], world["shapes"], world["positions"]
    train_x, train_q, _ = split_data(task, model, root, "train", *names)
    test_x, test_q, test_n = split_data(task, model, root, "test", *names)
    print(f"{a.run}: tower features {tuple(train_x.shape[1:])} per image; {len(train_q)} training questions, "
          f"{len(test_q)} test questions")
    probe = WhereProbe(*(len(n) for n in names), train_x.shape[1], train_x.shape[2])
    opt = torch.optim.Adam(probe.parameters(), lr=a.lr)
    several = test_n[test_q[:, 0]] > 1
    for step in range(1, max(a.steps) + 1):
        b = train_q[torch.randint(len(train_q), (a.batch_size,))]
        loss = F.cross_entropy(probe(train_x[b[:, 0]], b[:, 1], b[:, 2]), b[:, 3])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in a.steps:
            with torch.no_grad():
                right = probe(test_x[test_q[:, 0]], test_q[:, 1], test_q[:, 2]).argmax(-1) == test_q[:, 3]
            print(f"step {step:>5} ({step * a.batch_size:>7} questions): test accuracy {right.float().mean():.3f}, "
                  f"on scenes of 2-3 objects {right[several].float().mean():.3f}")


if __name__ == "__main__":
    main()
