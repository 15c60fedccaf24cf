"""A family is one unit.  The toy family below (a linear classifier of the shapes world's class labels) is
written here and nowhere else; registered, it trains, resumes exactly, evaluates, loads with glimpse.load
and refuses to export, through glimpse's own command line and API."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import glimpse
from glimpse import families
from glimpse.cli import main
from glimpse.data.formats import read_labels
from glimpse.data.images import ImageError, ImageTransform, load_image
from glimpse.families import Family, register


# -- the toy family: all of it ------------------------------------------------------------------------------
@dataclass
class ToyConfig:
    image_size: int = 16
    classes: list[str] = field(default_factory=list)  # empty: the data set's, saved with the run


class LabelledImages(Dataset):
    """The shapes world's single-object images and their colour-shape class; keys are (index, choice)."""

    def __init__(self, root, split: str, transform: ImageTransform):
        self.paths, self.labels, self.classes = read_labels(root / "labels" / f"{split}.csv", root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key) -> dict:
        try:
            pixels = self.transform(load_image(self.paths[key[0]]))
        except ImageError as e:
            return {"error": e.reason, "message": str(e)}
        return {"pixel_values": pixels, "label": self.labels[key[0]]}


def collate(samples: list[dict]) -> dict:
    good = [s for s in samples if "error" not in s]
    return {"status": [s.get("error") for s in samples], "messages": [s["message"] for s in samples if "error" in s],
            "pixel_values": torch.stack([s["pixel_values"] for s in good]),
            "labels": torch.tensor([s["label"] for s in good])}


class ToyPipeline:
    def __init__(self, model: nn.Module, transform: ImageTransform, classes: list[str]):
        self.model, self.transform, self.classes = model, transform, classes

    @torch.no_grad()
    def classify(self, images: list) -> list[str]:
        logits = self.model(torch.stack([self.transform(load_image(im)) for im in images]).flatten(1))
        return [self.classes[i] for i in logits.argmax(-1).tolist()]


@register
class ToyFamily(Family):
    name = "toy_linear"
    config = ToyConfig

    def __init__(self, recipe, root, tokenizer):
        super().__init__(recipe, root, tokenizer)
        self.transform = ImageTransform(recipe.model.image_size, mean=(0.9, 0.9, 0.9), std=(0.15, 0.15, 0.15))
        m = recipe.model
        m.classes = m.classes or (root / "labels" / "classes.txt").read_text().splitlines()

    def build_model(self) -> nn.Module:
        return nn.Linear(3 * self.recipe.model.image_size ** 2, len(self.recipe.model.classes))

    def train_data(self):
        return LabelledImages(self.root, "train", self.transform), collate

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(model(batch["pixel_values"].flatten(1)), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, splits: list[str]) -> dict[str, float]:
        out = {}
        for split in splits:
            data = LabelledImages(self.root, split, self.transform)
            batch = collate([data[(i, 0)] for i in range(len(data))])
            right = model(batch["pixel_values"].flatten(1)).argmax(-1) == batch["labels"]
            out.update({f"{split}/acc": right.float().mean().item(), f"{split}/n": len(right),
                        f"{split}/skipped": sum(s is not None for s in batch["status"])})
        return out

    def pipeline(self, model: nn.Module) -> ToyPipeline:
        return ToyPipeline(model, self.transform, self.recipe.model.classes)


# -- glimpse's commands on it -------------------------------------------------------------------------------
@pytest.fixture
def recipe(world, tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(f"family: toy_linear\nmodel: {{image_size: 16}}\n"
                    f"data: {{root: {world}, image_size: 32, num_workers: 0}}\n"
                    "train: {max_steps: 6, batch_size: 8, lr: 0.01, warmup_steps: 1, log_every: 1, save_every: 3}\n"
                    "eval: {splits: [test]}\n")
    return path


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_family_written_outside_glimpse_trains_resumes_evaluates_loads_and_refuses_export(recipe, world, tmp_path,
                                                                                               capsys):
    assert families.get("toy_linear") is ToyFamily
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(["--quiet", "train", str(recipe), "--out", str(straight)])
    shutil.copytree(straight, resumed)  # as if the run had died after its step-3 checkpoint
    shutil.rmtree(resumed / "checkpoints" / "step_0000006")
    main(["--quiet", "train", str(recipe), "--out", str(resumed), "--resume"])
    assert len(losses(straight)) == 6 and losses(resumed) == losses(straight)  # bit-identical after resume
    assert torch.equal(glimpse.load(straight).model.weight, glimpse.load(resumed).model.weight)

    capsys.readouterr()
    main(["--quiet", "eval", str(straight), "--json", str(tmp_path / "eval.json")])
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= figures["test/acc"] <= 1 and figures["test/n"] > 0 and figures["test/skipped"] == 0
    assert "test/acc" in capsys.readouterr().out

    pipe = glimpse.load(straight)
    assert isinstance(pipe, ToyPipeline)
    paths, _, classes = read_labels(world / "labels" / "test.csv")
    assert pipe.classes == classes and all(c in classes for c in pipe.classify(paths[:3]))

    with pytest.raises(SystemExit) as e:
        main(["--quiet", "convert", str(straight), str(tmp_path / "hf"), "--to", "hf"])
    assert e.value.code == 2
    assert "the toy_linear family has no Hugging Face counterpart" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()

