"""Tests for the shapes world generator."""

import csv
import hashlib
import itertools
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from glimpse.data import shapes, shapes_words
from glimpse.data.shapes import CLASSES, NOVEL_COMBOS, SPLITS, generate_shapes, scene_key
from glimpse.data.stream import shard_keys
from glimpse.errors import GlimpseError

# Tiny splits; 10-sample shards so that train spans several of them.
ARGS = {"n_train": 24, "n_val": 12, "n_test": 12, "n_test_novel": 12, "image_size": 32, "shards": True,
        "progress": False}


def _generate(out: Path, seed: int) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shapes, "_SHARD_SIZE", 10)
        return generate_shapes(out, seed=seed, **ARGS)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "world"
    _generate(out, seed=0)
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(world: Path, name: str):
    return json.loads((world / "annotations" / name).read_text())


def _scenes(world: Path, split: str) -> list[list[dict]]:
    return [image["scene"] for image in _load(world, f"captions_{split}.json")["images"]]


def test_same_seed_same_bytes_other_seed_other_bytes(world, tmp_path):
    _generate(tmp_path / "again", seed=0)
    _generate(tmp_path / "other", seed=1)
    again, other = _hashes(tmp_path / "again"), _hashes(tmp_path / "other")
    assert again == _hashes(world)
    assert other.keys() == again.keys()
    changed = [name for name in again if other[name] != again[name]]
    assert all(name in changed for name in again if name.endswith((".png", ".tar", "train.csv")))


def test_layout_and_world_json(world):
    info = json.loads((world / "world.json").read_text())
    assert info["version"] == 2 and info["seed"] == 0 and info["image_size"] == 32
    assert info["splits"] == {"train": 24, "val": 12, "test": 12, "test_novel": 12}
    assert info["classes"] == CLASSES and len(CLASSES) == 24 and CLASSES[:2] == ["red circle", "red square"]
    assert info["novel_combos"] == [list(c) for c in NOVEL_COMBOS]
    assert (world / "labels" / "classes.txt").read_text().splitlines() == CLASSES
    for split in SPLITS:
        names = sorted(p.name for p in (world / "images" / split).iterdir())
        assert names == [f"{split}_{i:06d}.png" for i in range(info["splits"][split])]
        for name in ("captions", "llava", "vqa_questions", "vqa_annotations", "instances"):
            assert (world / "annotations" / f"{name}_{split}.json").is_file()
        assert (world / "labels" / f"{split}.csv").is_file() and (world / f"{split}.csv").is_file()
    assert sorted(p.name for p in (world / "shards").glob("train-*.tar")) == \
        ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    llava = json.loads((world / "annotations" / "llava_train.json").read_text())  # and LLaVA's records, for stage 2
    assert [k for p in sorted((world / "shards").glob("llava_train-*.tar")) for k in shard_keys(str(p))] == \
        [r["id"] for r in llava]
    with Image.open(world / "images" / "val" / "val_000000.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_returns_world_json(tmp_path):
    info = generate_shapes(tmp_path / "w", n_train=2, n_val=1, n_test=1, image_size=16, progress=False)
    assert info == json.loads((tmp_path / "w" / "world.json").read_text())
    assert info["splits"]["test_novel"] == 1  # defaults to n_test
    assert not (tmp_path / "w" / "shards").exists()


def test_novel_combos_only_in_test_novel(world):
    novel = set(NOVEL_COMBOS)
    for split in SPLITS:
        for scene in _scenes(world, split):
            combos = {(o["colour"], o["shape"]) for o in scene}
            assert bool(combos & novel) == (split == "test_novel"), (split, scene)


def test_scene_keys_unique_in_evaluation_splits(world):
    for split in ("val", "test", "test_novel"):
        keys = [scene_key(scene) for scene in _scenes(world, split)]
        assert len(set(keys)) == len(keys)


def test_scenes_are_well_formed(world):
    for scene in itertools.chain.from_iterable(_scenes(world, s) for s in SPLITS):
        assert 1 <= len(scene) <= 3
        assert len({o["position"] for o in scene}) == len(scene)
        for o in scene:
            assert o["size"] in shapes.SIZES and o["colour"] in shapes.COLOURS
            assert o["shape"] in shapes.SHAPES and o["position"] in shapes.POSITIONS


def test_scene_key_ignores_order():
    a = {"size": "small", "colour": "red", "shape": "circle", "position": "left"}
    b = {"size": "large", "colour": "blue", "shape": "cross", "position": "top"}
    assert scene_key([a, b]) == scene_key([b, a]) == scene_key([("large", "blue", "cross", "top"),
                                                                 ("small", "red", "circle", "left")])


def test_shapes_never_overlap_or_leave_the_canvas():
    r, j = max(shapes._RADIUS.values()), shapes._JITTER
    for (x, y) in shapes._ANCHORS.values():
        assert x - j - r > 0 and x + j + r < 1 and y - j - r > 0 and y + j + r < 1
    # Every shape lies inside its box of half-width r; boxes are apart on one axis at least.
    for (x1, y1), (x2, y2) in itertools.combinations(shapes._ANCHORS.values(), 2):
        assert max(abs(x1 - x2), abs(y1 - y2)) - 2 * j > 2 * r


def test_captions_describe_every_object(world):
    for split in SPLITS:
        data = _load(world, f"captions_{split}.json")
        by_image = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann["caption"])
        for image in data["images"]:
            captions = by_image[image["id"]]
            assert len(captions) == 5 == len(set(captions))
            for caption, o in itertools.product(captions, image["scene"]):
                assert f"{o['size']} {o['colour']} {o['shape']}" in caption
        rows = list(csv.DictReader(open(world / f"{split}.csv", newline="")))
        assert [r["caption"] for r in rows] == [a["caption"] for a in data["annotations"]]
        assert rows[0]["filepath"] == f"images/{split}/{split}_000000.png"


def test_vqa_questions_and_answers(world):
    for split in SPLITS:
        questions = _load(world, f"vqa_questions_{split}.json")
        annotations = _load(world, f"vqa_annotations_{split}.json")
        assert questions["task_type"] == "Open-Ended" and questions["data_subtype"] == split
        scenes = {i: scene for i, scene in enumerate(_scenes(world, split))}
        per_image = {}
        for q, a in zip(questions["questions"], annotations["annotations"]):
            assert q["question_id"] == a["question_id"] and q["image_id"] == a["image_id"]
            per_image[q["image_id"]] = per_image.get(q["image_id"], 0) + 1
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            given = [x["answer"] for x in a["answers"]]
            assert given.count(a["multiple_choice_answer"]) >= 6
            assert a["answer_type"] in ("yes/no", "number", "other")
            if q["question"] == "how many shapes are there?":
                assert a["multiple_choice_answer"] == str(len(scenes[q["image_id"]]))
        assert sorted(per_image) == sorted(scenes) and all(3 <= n <= 5 for n in per_image.values())


def test_yes_no_answers_are_right():
    answers = {"yes": 0, "no": 0}
    rng = shapes.np.random.default_rng(0)
    for _ in range(200):
        scene = shapes._sample_scene(rng, novel=False)
        for qa in shapes_words._questions(scene, rng, allow_novel=False):
            if qa["answer_type"] == "yes/no":
                answers[qa["answer"]] += 1
                present = any(qa["question"] in (f"is there a {o['colour']} {o['shape']}?",
                                                 f"is there an {o['colour']} {o['shape']}?") for o in scene)
                assert present == (qa["answer"] == "yes")
    assert min(answers.values()) > 0.3 * sum(answers.values())


def test_llava_conversations(world):
    for split in SPLITS:
        records = _load(world, f"llava_{split}.json")
        assert len(records) == 2 * ARGS[f"n_{split}"]
        for record in records:
            turns = record["conversations"]
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert len(turns) in (2, 4, 6)
            assert (world / "images" / record["image"]).is_file()


def test_labels_only_single_object_images(world):
    for split in SPLITS:
        scenes = {f"images/{split}/{split}_{i:06d}.png": s for i, s in enumerate(_scenes(world, split))}
        rows = list(csv.DictReader(open(world / "labels" / f"{split}.csv", newline="")))
        assert {r["filepath"] for r in rows} == {p for p, s in scenes.items() if len(s) == 1}
        for row in rows:
            (o,) = scenes[row["filepath"]]
            assert row["label"] == f"{o['colour']} {o['shape']}"


def test_shards_are_reproducible_webdataset(world):
    with tarfile.open(world / "shards" / "val-000000.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and len(names) == 3 * 10
    assert names[:3] == ["val_000000.json", "val_000000.png", "val_000000.txt"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)


def test_refuses_a_used_folder_and_bad_arguments(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(GlimpseError, match="used"):
        generate_shapes(tmp_path / "used", progress=False)
    with pytest.raises(GlimpseError, match="n_train|train"):
        generate_shapes(tmp_path / "a", n_train=-1, progress=False)
    with pytest.raises(GlimpseError, match="image_size"):
        generate_shapes(tmp_path / "b", image_size=4, progress=False)


def test_running_out_of_scenes_raises(tmp_path, monkeypatch):
    # Only single-object scenes: there are 5 positions x 2 sizes x 4 novel combos = 40 novel ones.
    monkeypatch.setattr(shapes, "_N_OBJECTS_P", (1.0, 0.0, 0.0))
    monkeypatch.setattr(shapes, "_MAX_REJECTIONS", 300)
    with pytest.raises(GlimpseError, match="ran out of distinct test_novel scenes"):
        generate_shapes(tmp_path / "w", n_train=0, n_val=0, n_test=0, n_test_novel=41, image_size=16,
                        progress=False)
