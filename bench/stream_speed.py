"""Training-data throughput: a WebDataset shard stream (`data.stream`) against the same samples read from
local PNG files, at the same number of loader workers.

Both sides give the trainer's batches of the dual-encoder family: decoded, resized and normalised
images and tokenized captions (PairCollate).  The PNG side is the in-memory path (the COCO captions
file and PairDataset over images/train, keys from StepBatchSampler, its decoded-image cache off, as
in a first epoch); the stream side is ShardStream over shards/train-*.tar with its shuffle buffer.
Rounds alternate between the two; the best and median rounds of each are reported, and their ratios,
and the CPU time a sample over all processes (the loader workers included), which a shared machine
disturbs less than the wall time.

    python bench/stream_speed.py [--world DIR] [--images 4000] [--workers 2] [--batch 64] [--rounds 3]

Without --world, a shapes world of --images training images (64 px, with shards) is generated in a
temporary folder first (not timed).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from glimpse.data.formats import read_coco_captions
from glimpse.data.images import ImageTransform
from glimpse.data.pairs import PairCollate, PairDataset, StreamPairs
from glimpse.data.stream import ShardStream
from glimpse.data.tokenizer import Tokenizer
from glimpse.train.sampler import StepBatchSampler

MAX_PIXELS = 40_000_000


def png_loader(world: Path, transform, collate, workers: int, batch: int) -> tuple[DataLoader, int]:
    items = read_coco_captions(world / "annotations" / "captions_train.json", world / "images" / "train")
    dataset = PairDataset(items, transform, MAX_PIXELS)
    dataset.pixels = None  # a first epoch: every image decoded
    steps = len(items) // batch
    sampler = StepBatchSampler(len(items), batch, seed=0, max_steps=steps)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      prefetch_factor=4 if workers else None), steps * batch


def stream_loader(world: Path, transform, collate, workers: int, batch: int, n: int) -> tuple[DataLoader, int]:
    # one epoch, as the PNG side's sampler stops after its steps: an endless stream's workers would go on
    # into the next epoch (a shuffle buffer to fill, batches to prefetch) while the last batches are counted
    stream = ShardStream(str(world / "shards" / "train-*.tar"), StreamPairs(transform, MAX_PIXELS, 0), seed=0,
                         shuffle_buffer=1000, epochs=1)
    stream.start_at(0, batch, workers)
    return DataLoader(stream, batch_size=batch, collate_fn=collate, num_workers=workers,
                      prefetch_factor=4 if workers else None), n // batch * batch


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(loader: DataLoader, n: int) -> tuple[float, float]:
    """(samples/s, CPU ms per sample over all processes) of reading `n` samples."""
    cpu, t = _cpu_seconds(), time.perf_counter()
    batches, seen = iter(loader), 0
    for b in batches:
        seen += len(b["status"])
        if seen >= n:
            break
    wall = time.perf_counter() - t
    del batches  # joins the workers, so that their CPU time is counted
    gc.collect()
    assert seen == n, (seen, n)
    return n / wall, (_cpu_seconds() - cpu) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, help="a shapes world written with shards (default: generate one)")
    ap.add_argument("--images", type=int, default=4000, help="training images of a generated world")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = None
    world = a.world
    if world is None:
        from glimpse.data.world import make_world

        tmp = tempfile.TemporaryDirectory()
        world = make_world(Path(tmp.name) / "shapes", seed=0, n_train=a.images, n_val=8, n_test=8, image_size=64,
                           shards=True, progress=False)
    transform = ImageTransform(json.loads((world / "world.json").read_text())["image_size"])
    tokenizer = Tokenizer(world / "tokenizer.json")
    png, stream = [], []
    for _ in range(a.rounds):
        loader, n = png_loader(world, transform, PairCollate(tokenizer, 32), a.workers, a.batch)
        png.append(measure(loader, n))
        loader, n = stream_loader(world, transform, PairCollate(tokenizer, 32), a.workers, a.batch, n)
        stream.append(measure(loader, n))
    shards = len(list((world / "shards").glob("train-*.tar")))
    print(f"{n} samples a round, {shards} shards, {a.workers} workers, batch {a.batch}, {a.rounds} rounds, "
          f"torch {torch.__version__}")
    for name, runs in (("local PNG files", png), ("shard stream", stream)):
        rates, cpu = [r for r, _ in runs], [c for _, c in runs]
        print(f"{name:16}: best {max(rates):6.0f} samples/s, median {statistics.median(rates):6.0f} "
              f"(rounds: {', '.join(f'{x:.0f}' for x in rates)}); CPU {statistics.median(cpu):.2f} ms a sample")
    best = max(r for r, _ in stream) / max(r for r, _ in png)
    median = statistics.median(r for r, _ in stream) / statistics.median(r for r, _ in png)
    cpu = statistics.median(c for _, c in png) / statistics.median(c for _, c in stream)
    print(f"stream / PNG    : {best:.2f} (best rounds), {median:.2f} (medians), {cpu:.2f} (CPU time a sample, inverted)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
