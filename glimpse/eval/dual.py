"""Evaluating a dual encoder on a split: retrieval R@K both ways and zero-shot accuracy.

Keys are flat `split/metric`, e.g. `test/t2i_r1`, `test_novel/zeroshot_acc`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glimpse.data.formats import read_labels
from glimpse.data.pairs import load_pairs
from glimpse.eval.retrieval import retrieval_metrics, zeroshot_accuracy
from glimpse.infer.dual import DualEncoderPipeline


def evaluate_split(pipe: DualEncoderPipeline, data_cfg, root: Path, split: str,
                   templates: list[str] | None = None, batch_size: int = 256) -> dict[str, float]:
    items = load_pairs(data_cfg, root, split)
    image_embeds, good, _ = pipe.embed_image_stream([it.image for it in items], batch_size)
    items = [items[i] for i in good]
    captions = [c for it in items for c in it.captions]
    text_image = torch.tensor([i for i, it in enumerate(items) for _ in it.captions])
    out = {f"{split}/{k}": v for k, v in retrieval_metrics(image_embeds, pipe.embed_texts(captions), text_image).items()}
    labels_csv = Path(root) / "labels" / f"{split}.csv"
    if data_cfg.source == "shapes" and labels_csv.is_file():
        paths, labels, classes = read_labels(labels_csv, root)
        if paths:
            scores = pipe.class_scores(pipe.embed_images(paths, batch_size), classes, templates)
            out[f"{split}/zeroshot_acc"] = zeroshot_accuracy(scores, torch.tensor(labels))
    return out


def evaluate(pipe: DualEncoderPipeline, data_cfg, root: Path, splits: list[str],
             templates: list[str] | None = None, batch_size: int = 256) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in splits:
        out.update(evaluate_split(pipe, data_cfg, root, split, templates, batch_size))
    return out
