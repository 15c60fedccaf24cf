"""Evaluating a dual encoder on a split: retrieval R@K both ways and zero-shot accuracy.

Keys are flat `split/metric`, e.g. `test/t2i_r1`, `test_novel/zeroshot_acc`.  An image that cannot be
read is skipped, as in training: retrieval is over `n` images and zero-shot over `zeroshot_n`, and
`skipped` images of the split could not be read.

`zeroshot_paraphrase_acc` classifies the same images with prompts in words the shapes world's
captions never use ("a photo of something crimson and round"): a text tower that only learned the
captions' words cannot read them, one pretrained on language can (LiT, shapes-clip-lit).
"""

from __future__ import annotations

from pathlib import Path

import torch

from glimpse.data.formats import read_labels
from glimpse.data.pairs import load_pairs
from glimpse.families.dual_encoder.pipeline import DualEncoderPipeline
from glimpse.metrics.retrieval import retrieval_metrics, zeroshot_accuracy

# class words -> paraphrases none of the shapes world's captions contain
PARAPHRASES = {
    "red": ["crimson", "scarlet"], "green": ["emerald", "grass-coloured"], "blue": ["azure", "navy"],
    "yellow": ["golden", "lemon-coloured"], "purple": ["violet", "lilac"], "orange": ["tangerine", "amber"],
    "circle": ["round", "disc-shaped"], "square": ["boxy", "four-sided"], "triangle": ["three-sided", "pointy"],
    "cross": ["plus-shaped", "x-shaped"],
}
PARAPHRASE_TEMPLATES = ["a photo of something {colour} and {shape}", "a {colour} thing that is {shape}"]


def paraphrase_scores(pipe: DualEncoderPipeline, image_embeds: torch.Tensor, classes: list[str]) -> torch.Tensor:
    """Cosine scores [N, L] against each class's paraphrased prompts (CLIP's mean ensembling)."""
    import torch.nn.functional as F

    prompts = []
    for c in classes:
        colour, shape = c.split()
        prompts.append([t.format(colour=a, shape=b) for t in PARAPHRASE_TEMPLATES
                        for a in PARAPHRASES[colour] for b in PARAPHRASES[shape]])
    emb = pipe.embed_texts([p for ps in prompts for p in ps]).view(len(classes), len(prompts[0]), -1)
    return image_embeds @ F.normalize(emb.mean(1), dim=-1).T


def evaluate_split(pipe: DualEncoderPipeline, data_cfg, root: Path, split: str,
                   templates: list[str] | None = None, batch_size: int = 256) -> dict[str, float]:
    items = load_pairs(data_cfg, root, split)
    image_embeds, good, failures = pipe.embed_image_stream([it.image for it in items], batch_size)
    items = [items[i] for i in good]
    out: dict[str, float] = {}
    if items:
        captions = [c for it in items for c in it.captions]
        text_image = torch.tensor([i for i, it in enumerate(items) for _ in it.captions], device=image_embeds.device)
        recall = retrieval_metrics(image_embeds, pipe.embed_texts(captions), text_image)
        out.update({f"{split}/{k}": v for k, v in recall.items()})
    labels_csv = Path(root) / "labels" / f"{split}.csv"
    if data_cfg.source == "shapes" and labels_csv.is_file():
        paths, labels, classes = read_labels(labels_csv, root)
        image_embeds, good, _ = pipe.embed_image_stream(paths, batch_size)  # their bad images are counted above
        labels = torch.tensor([labels[i] for i in good], device=image_embeds.device)
        if good:
            scores = pipe.class_scores(image_embeds, classes, templates)
            out[f"{split}/zeroshot_acc"] = zeroshot_accuracy(scores, labels)
            if all(w in PARAPHRASES for c in classes for w in c.split()):
                out[f"{split}/zeroshot_paraphrase_acc"] = zeroshot_accuracy(
                    paraphrase_scores(pipe, image_embeds, classes), labels)
            out[f"{split}/zeroshot_n"] = len(good)
    out.update({f"{split}/n": len(items), f"{split}/skipped": sum(failures.values())})
    return out


def evaluate(pipe: DualEncoderPipeline, data_cfg, root: Path, splits: list[str],
             templates: list[str] | None = None, batch_size: int = 256) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in splits:
        out.update(evaluate_split(pipe, data_cfg, root, split, templates, batch_size))
    return out
