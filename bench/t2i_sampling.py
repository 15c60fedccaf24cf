"""Text-to-image sampling speed: MaskGIT's parallel unmasking (8, 12, 16 steps) against the autoregressive
prior of the same size with a KV cache, at batch 1 and 32, in one run, each with the exact-scene accuracy
it reaches (the shapes-world scene parser on the generated images, one sample per prompt).

    python bench/t2i_sampling.py MASKGIT_RUN AR_RUN [--prompts 64] [--device cpu|cuda]
        [--guidance 1.5] [--temperature 0.5] [--choice-temperature 1.0]

Both priors sample with the same guidance and temperature (given here, not each run's own defaults).

Images/s counts the prior's sampling and the tokenizer's decoding (guidance included: two rows per
image), not CLIP re-ranking.  The prompts are the test split's first captions.  Prints the machine's
fp32 matmul rate first, and the ratio of each MaskGIT setting to the autoregressive prior.
"""

from __future__ import annotations

import argparse
import time

import torch

import glimpse
from glimpse.api import load_run
from glimpse.data.scene_parser import parse_scene, scene_accuracy
from glimpse.data.world import read_scenes
from glimpse.hardware import matmul_gflops
from glimpse.train.trainer import data_root


def images_per_s(pipe, prompts: list[str], batch: int, steps: int | None, repeats: int = 2) -> float:
    pipe.batch_size = batch
    chunk = prompts[:batch]
    pipe.generate_arrays(chunk[:1], 1, seed=0, steps=steps)  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        pipe.generate_arrays(chunk, 1, seed=0, steps=steps)
        best = min(best, time.perf_counter() - t)
    return len(chunk) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("maskgit")
    ap.add_argument("autoregressive")
    ap.add_argument("--prompts", type=int, default=64, help="prompts scored for accuracy (and timed at batch 32)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--choice-temperature", type=float, default=1.0, help="maskgit's")
    a = ap.parse_args()
    print(f"fp32 matmul {matmul_gflops():.0f} GFLOP/s, {torch.get_num_threads()} threads, device {a.device}")
    family, _ = load_run(a.maskgit)
    root = data_root(family.recipe, progress=False)
    scenes = read_scenes(root, "test")[: a.prompts]
    prompts, truth = [s.captions[0] for s in scenes], [s.scene for s in scenes]
    rows = []
    for name, run, steps in [("autoregressive + KV cache", a.autoregressive, None)] + \
            [(f"maskgit, {k} steps", a.maskgit, k) for k in (8, 12, 16)]:
        pipe = glimpse.load(run, device=a.device)
        pipe.batch_size = 64
        c = pipe.model.cfg
        c.guidance, c.temperature, c.choice_temperature = a.guidance, a.temperature, a.choice_temperature
        images = pipe.generate_arrays(prompts, 1, seed=0, steps=steps)[:, 0]
        exact = scene_accuracy([parse_scene(im) for im in images], truth)["exact"]
        rows.append((name, images_per_s(pipe, prompts, 1, steps), images_per_s(pipe, prompts, 32, steps), exact))
    ar1, ar32 = rows[0][1], rows[0][2]
    print(f"{'sampler':<28}{'img/s b1':>10}{'x AR':>7}{'img/s b32':>11}{'x AR':>7}{'exact':>8}")
    for name, b1, b32, exact in rows:
        print(f"{name:<28}{b1:>10.2f}{b1 / ar1:>7.2f}{b32:>11.2f}{b32 / ar32:>7.2f}{exact:>8.3f}")


if __name__ == "__main__":
    main()
