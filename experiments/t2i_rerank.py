"""Re-rankers for best-of-N text-to-image sampling, scored by the scene parser: the same N candidates a
prompt (those `glimpse eval` draws for `*_rerank`), chosen by several CLIP scores, against the oracle (any
candidate exact).

    python experiments/t2i_rerank.py RUN WORLD [--n 300] [--candidates 8] [--splits test_novel]

Re-rankers (all use only the prompt's text and the run's CLIP; the parser only judges):
- cosine: CLIP's cosine of image and prompt (the pipeline's best-of-N, as DALL-E);
- contrast: the probability CLIP gives the prompt against (up to --negatives) hard negatives made from its words
  (NegCLIP-style swapped bindings and replaced attributes, glimpse.data.negatives), at CLIP's logit scale:
  an image that fits a swapped caption as well as the prompt loses;
- phrases: the least cosine of the image with each object phrase of the prompt alone (one-object prompts: the
  cosine), so every object must be drawn;
- contrast + phrases: the sum of both, each standardised over the prompt's candidates.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import glimpse
from glimpse.data.negatives import swapped_negative
from glimpse.data.scene_parser import parse_scene, scene_accuracy
from glimpse.data.world import read_scenes
from glimpse.families.text_to_image.pipeline import split_phrases


def negatives_of(prompt: str, k: int) -> list[str]:
    out: list[str] = []
    for seed in range(8 * k):
        neg = swapped_negative(prompt, seed)
        if neg and neg != prompt and neg not in out:
            out.append(neg)
        if len(out) == k:
            break
    return out


def standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / (x.std() + 1e-6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("world", type=Path)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--negatives", type=int, default=16)
    ap.add_argument("--splits", default="test_novel")
    args = ap.parse_args()
    pipe = glimpse.load(args.run)
    scale = pipe.model.clip.logit_scale.exp().clamp(max=100).item()
    for split in args.splits.split(","):
        scenes = read_scenes(args.world, split)[:args.n]
        prompts = [s.captions[0] for s in scenes]
        truth = [s.scene for s in scenes]
        t0 = time.time()
        # [P, N, H, W, 3]: the rows eval's best-of-N samples (each prompt N times, in order), none re-ranked
        images = pipe.generate_arrays(prompts, args.candidates, seed=0, candidates=1)
        seconds = time.time() - t0
        P, N = images.shape[:2]
        flat = images.reshape(P * N, *images.shape[2:])
        parses = [parse_scene(im) for im in flat]
        exact = torch.tensor([scene_accuracy([p], [truth[i // N]])["exact"] for i, p in enumerate(parses)]).view(P, N)
        embeds = pipe.image_embeds(flat).view(P, N, -1)
        text = pipe.text_embeds(prompts)
        scores: dict[str, list[torch.Tensor]] = {"cosine": [], "contrast": [], "phrases": [], "contrast + phrases": []}
        for i, prompt in enumerate(prompts):
            cos = embeds[i] @ text[i]
            negs = negatives_of(prompt, args.negatives)
            captions = pipe.text_embeds([prompt, *negs])
            contrast = torch.log_softmax(scale * embeds[i] @ captions.T, dim=-1)[:, 0]
            parts = split_phrases(prompt)
            phrases = (embeds[i] @ pipe.text_embeds(parts).T).min(-1).values if parts else cos
            scores["cosine"].append(cos)
            scores["contrast"].append(contrast)
            scores["phrases"].append(phrases)
            scores["contrast + phrases"].append(standardise(contrast) + standardise(phrases))
        print(f"{split}: {P} prompts x {N} candidates ({seconds:.0f} s to sample); exact of one sample "
              f"{exact[:, 0].mean():.3f}, of all candidates {exact.mean():.3f}, oracle (any exact) "
              f"{exact.max(1).values.mean():.3f}")
        for name, s in scores.items():
            pick = torch.stack(s).argmax(-1)
            chosen = [parses[i * N + int(j)] for i, j in enumerate(pick)]
            acc = scene_accuracy(chosen, truth)
            print(f"  {name:20s} exact {acc['exact']:.3f}  per object {acc['per_object']:.3f}")


if __name__ == "__main__":
    main()
