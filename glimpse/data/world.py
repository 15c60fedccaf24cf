"""Where a recipe's data lives: the shapes world is generated on first use and cached.

The cache key holds every generator setting, and generation goes to a temporary folder
that is renamed into place, so a half-written world is never used.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from glimpse.data.tokenizer import train_tokenizer
from glimpse.errors import GlimpseError


def cache_dir() -> Path:
    return Path(os.environ.get("GLIMPSE_CACHE", Path.home() / ".cache" / "glimpse"))


def make_world(out: str | Path, *, seed: int, n_train: int, n_val: int, n_test: int, image_size: int,
               shards: bool = False, progress: bool = True) -> Path:
    """Generate the shapes world into `out` and train its tokenizer on the training split's text."""
    from glimpse.data.shapes import generate_shapes

    out = Path(out)
    generate_shapes(out, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size,
                    shards=shards, progress=progress)
    train_tokenizer(world_texts(out), out / "tokenizer.json")
    return out


def world_texts(root: Path):
    """Every text a model of the world reads in training: captions, conversation turns, VQA
    questions and answers, and the words glimpse's prompts add (roles, the VQA instruction), so
    that none of them falls apart into single bytes."""
    from glimpse.data.chat import PROMPT_WORDS

    ann = Path(root) / "annotations"
    for image in json.loads((ann / "captions_train.json").read_text())["annotations"]:
        yield image["caption"]
    for record in json.loads((ann / "llava_train.json").read_text()):
        for turn in record["conversations"]:
            yield turn["value"].replace("<image>", "")
    for q in json.loads((ann / "vqa_questions_train.json").read_text())["questions"]:
        yield q["question"]
    yield from PROMPT_WORDS


def ensure_shapes(data_cfg, progress: bool = True) -> Path:
    """The root of the recipe's shapes world, generated now if it is not there yet."""
    c = data_cfg
    # v2: the tokenizer learns conversations and prompt words too, not only captions;
    # v3: VQA annotations carry the full-sentence answer too (for language-model pretraining)
    shards = "-wds" if c.format == "wds" else ""
    name = f"shapes-v4-s{c.seed}-n{c.train_size}-{c.val_size}-{c.test_size}-px{c.image_size}{shards}"
    root = _world_root(c, name)
    if c.root and c.format == "wds" and root.joinpath("world.json").is_file() \
            and not any((root / "shards").glob("train-*.tar")):
        raise GlimpseError(f"the shapes world at {root} has no WebDataset shards; "
                           "write one with `glimpse data shapes --shards`")
    return _generate(root, lambda tmp: make_world(tmp, seed=c.seed, n_train=c.train_size, n_val=c.val_size,
                                                  n_test=c.test_size, image_size=c.image_size,
                                                  shards=c.format == "wds", progress=progress))


def ensure_shapes_video(data_cfg, progress: bool = True) -> Path:
    """The root of the recipe's moving-shapes world (glimpse.data.shapes_video), generated if not there yet."""
    c = data_cfg
    # v3: "is there" asked of every clip with a steady shape, its "no" often one attribute away
    name = f"shapes-video-v3-s{c.seed}-n{c.train_size}-{c.val_size}-{c.test_size}-px{c.image_size}-f{c.frames}"
    return _generate(_world_root(c, name), lambda tmp: make_video_world(
        tmp, seed=c.seed, n_train=c.train_size, n_val=c.val_size, n_test=c.test_size, frames=c.frames,
        image_size=c.image_size, progress=progress))


def make_video_world(out: str | Path, *, seed: int, n_train: int, n_val: int, n_test: int, frames: int,
                     image_size: int, shards: bool = False, progress: bool = True) -> Path:
    """Generate the moving-shapes world into `out` and train its tokenizer on the training split's text."""
    from glimpse.data import shapes_video

    out = Path(out)
    shapes_video.generate_shapes_video(out, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, frames=frames,
                                       image_size=image_size, shards=shards, progress=progress)
    train_tokenizer(shapes_video.world_texts(out), out / "tokenizer.json")
    return out


def ensure_shapes_shop(data_cfg, progress: bool = True) -> Path:
    """The root of the recipe's shapes shop (glimpse.data.shapes_shop), generated if not there yet."""
    from glimpse.data.shapes_shop import generate_shapes_shop

    c = data_cfg
    name = f"shapes-shop-v1-s{c.seed}-u{c.users}-i{c.items}-px{c.image_size}"
    return _generate(_world_root(c, name), lambda tmp: generate_shapes_shop(
        tmp, seed=c.seed, n_users=c.users, n_items=c.items, image_size=c.image_size, progress=progress))


def _world_root(c, cache_name: str) -> Path:
    """data.root when the recipe names one (it must hold a world or be empty), else the cache's folder."""
    if not c.root:
        return cache_dir() / cache_name
    root = Path(c.root).expanduser()
    if not (root / "world.json").is_file() and root.exists() and any(root.iterdir()):
        raise GlimpseError(f"data.root {root} exists but holds no generated world (no world.json)")
    return root


def _generate(root: Path, make) -> Path:
    """`root`, made by `make(folder)` in a temporary folder renamed into place unless it is complete already."""
    if (root / "world.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
    try:
        make(tmp)
        if root.exists():
            root.rmdir()  # an empty folder the user named
        os.rename(tmp, root)
    except OSError:
        if not (root / "world.json").is_file():  # lost a race to another process: theirs is complete
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def world_info(root: Path) -> dict:
    return json.loads((Path(root) / "world.json").read_text())


@dataclass
class WorldImage:
    path: str
    scene: list[dict]  # the objects, as the generator wrote them (size, colour, shape, position)
    captions: list[str]


def read_scenes(root: Path, split: str) -> list[WorldImage]:
    """A shapes-world split's images, each with its scene and captions (from captions_{split}.json,
    whose `images[i].scene` is the generator's record)."""
    path = Path(root) / "annotations" / f"captions_{split}.json"
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
        caps: dict[int, list[str]] = {}
        for a in coco["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        folder = Path(root) / "images" / split
        return [WorldImage(str(folder / im["file_name"]), im["scene"], caps.get(im["id"], []))
                for im in coco["images"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GlimpseError(f"cannot read the shapes-world scenes of {path}: {e!r}") from None
