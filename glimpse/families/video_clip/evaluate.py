"""Evaluating a video dual encoder on a split: text-to-video and video-to-text R@K, and the controls
that show whether frame order is used.

    t2v_r1, v2t_r1 ...        every caption against the split's clips (COCO's protocol; ties count
                              against the model, as in glimpse.metrics.retrieval)
    shuffled_t2v_r1           the same with each clip's frames in a fixed random order
    reversed_t2v_r1           the clips played backwards, against their forward captions
    single_frame_t2v_r1       the middle frame alone (ATP's and Singularity's single-frame baseline)
    pairs_acc                 minimal pairs (Vinoground's text score): every clip whose plain caption
                              changes when it is played backwards, and its reversal; each plain caption
                              retrieves between its clip and the twin, R@1 over 2 candidates (chance
                              1/2; a tie counts 1/2, so an order-blind model scores exactly 1/2)
    pairs_t2v_r1              the same captions against all 2n clips of the pairs at once, ties broken
                              at random in expectation (`expected_recall`): harder, since the other
                              pairs hold near-misses too

Clips that cannot be read are skipped and counted in `skipped`; `n` clips were scored.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from glimpse.data.shapes_video_text import reverse_tracks, video_caption
from glimpse.data.video import VideoError
from glimpse.families.video_clip.data import load_clips
from glimpse.metrics.retrieval import expected_recall, ranks_of_targets, retrieval_metrics


def evaluate_split(pipe, data_cfg, root: Path, split: str, batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    clips = load_clips(data_cfg, root, split)
    frames, good, failures = [], [], Counter()
    for i, clip in enumerate(clips):
        try:
            frames.append(pipe.decode(clip.path))
            good.append(i)
        except VideoError as e:
            failures[e.reason] += 1
    clips = [clips[i] for i in good]
    out: dict[str, float] = {f"{split}/n": len(clips), f"{split}/skipped": sum(failures.values())}
    if not clips:
        return out
    rng = np.random.default_rng(seed)
    perms = [_derangement(rng, len(f)) for f in frames]

    def embed(views) -> torch.Tensor:
        return torch.cat([pipe.embed_frames(views[i:i + batch_size]) for i in range(0, len(views), batch_size)])

    videos = embed(frames)
    captions = [c for clip in clips for c in clip.captions]
    owner = torch.tensor([i for i, clip in enumerate(clips) for _ in clip.captions])
    texts = pipe.embed_texts(captions)
    for k, v in retrieval_metrics(videos, texts, owner).items():
        out[f"{split}/{k.replace('i2t', 'v2t').replace('t2i', 't2v')}"] = v
    controls = {"shuffled": [f[p] for f, p in zip(frames, perms)], "reversed": [f[::-1] for f in frames],
                "single_frame": [f[len(f) // 2:len(f) // 2 + 1] for f in frames]}
    for name, views in controls.items():
        sim = texts @ embed(views).T
        out[f"{split}/{name}_t2v_r1"] = (ranks_of_targets(sim, owner) < 1).float().mean().item()

    # minimal pairs: a clip and its reversal, each with the plain caption of what it shows
    pairs = [(i, video_caption(c.tracks), video_caption(reverse_tracks(c.tracks))) for i, c in enumerate(clips)
             if c.tracks is not None]
    pairs = [p for p in pairs if p[1] != p[2]]
    if pairs:
        n = len(pairs)
        gallery = torch.cat([videos[[i for i, _, _ in pairs]], embed([frames[i][::-1] for i, _, _ in pairs])])
        queries = pipe.embed_texts([a for _, a, _ in pairs] + [b for _, _, b in pairs])
        sim = queries @ gallery.T
        target = torch.arange(2 * n)
        out[f"{split}/pairs_t2v_r1"] = expected_recall(sim, target, 1)
        twin = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        own, other = sim.gather(1, target[:, None])[:, 0], sim.gather(1, twin[:, None])[:, 0]
        out[f"{split}/pairs_acc"] = ((own > other).float() + 0.5 * (own == other).float()).mean().item()
        out[f"{split}/pairs_n"] = n
    return out


def _derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random order of n frames that moves every frame (n > 1)."""
    while True:
        p = rng.permutation(n)
        if n < 2 or (p != np.arange(n)).all():
            return p


def evaluate(pipe, data_cfg, root: Path, splits: list[str], batch_size: int = 64) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in splits:
        out.update(evaluate_split(pipe, data_cfg, root, split, batch_size))
    return out
