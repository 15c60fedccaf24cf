"""Tests for the dataset format readers, on the shapes world and on hand-written real-format files."""

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from glimpse.data import shapes
from glimpse.data.formats import (
    ImageText,
    iter_webdataset,
    read_coco_captions,
    read_csv_captions,
    read_labels,
    read_llava,
    read_vqa,
)
from glimpse.data.shapes import CLASSES, generate_shapes
from glimpse.errors import GlimpseError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = {"train": 12, "val": 6, "test": 6, "test_novel": 6}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("formats") / "world"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shapes, "_SHARD_SIZE", 5)  # train: three shards
        generate_shapes(out, n_train=N["train"], n_val=N["val"], n_test=N["test"], n_test_novel=N["test_novel"],
                        image_size=32, shards=True, progress=False)
    return out


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# --- round trips on the shapes world ---------------------------------------------------------------

def test_coco_and_csv_captions_round_trip(world):
    for split, n in N.items():
        coco = read_coco_captions(world / "annotations" / f"captions_{split}.json", world / "images" / split)
        clip = read_csv_captions(world / f"{split}.csv")
        assert len(coco) == len(clip) == n
        for a, b in zip(coco, clip):
            assert a.image == b.image and os.path.isabs(a.image) and os.path.isfile(a.image)
            assert a.captions == b.captions and len(a.captions) == 5
        assert coco[0].image_id == "0" and clip[0].image_id == f"images/{split}/{split}_000000.png"


def test_webdataset_round_trip(world):
    coco = read_coco_captions(world / "annotations" / "captions_train.json", world / "images" / "train")
    tars = sorted(str(p) for p in (world / "shards").glob("train-*.tar"))
    assert len(tars) == 3
    by_list = list(iter_webdataset(tars))
    by_brace = list(iter_webdataset(str(world / "shards" / "train-{000000..000002}.tar")))
    by_glob = list(iter_webdataset(str(world / "shards" / "train-*.tar")))
    assert by_list == by_brace == by_glob
    assert [s.image_id for s in by_list] == [f"train_{i:06d}" for i in range(N["train"])]
    for sample, item in zip(by_list, coco):
        assert sample.image.startswith(PNG_MAGIC) and sample.image == Path(item.image).read_bytes()
        assert sample.captions == item.captions


def test_llava_round_trip(world):
    records = read_llava(world / "annotations" / "llava_val.json", world / "images")
    assert len(records) == 2 * N["val"]
    assert all(os.path.isfile(r["image"]) and r["images"] == [r["image"]] for r in records)
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")


def test_vqa_round_trip(world):
    ann = world / "annotations"
    questions = json.loads((ann / "vqa_questions_test.json").read_text())["questions"]
    by_file = read_vqa(ann / "vqa_questions_test.json", ann / "vqa_annotations_test.json", world / "images" / "test",
                       images=ann / "captions_test.json")
    names = {i: f"test_{i:06d}.png" for i in range(N["test"])}
    by_dict = read_vqa(ann / "vqa_questions_test.json", ann / "vqa_annotations_test.json", world / "images" / "test",
                       images=names)
    by_pattern = read_vqa(ann / "vqa_questions_test.json", ann / "vqa_annotations_test.json",
                          world / "images" / "test", file_name_pattern="test_{image_id:06d}.png")
    assert by_file == by_dict == by_pattern and len(by_file) == len(questions)
    for item in by_file:
        assert len(item["answers"]) == 10 and item["answer"] in item["answers"]
        assert os.path.isfile(item["image"]) and item["answer_type"] in ("yes/no", "number", "other")


def test_labels_round_trip(world):
    paths, labels, classes = read_labels(world / "labels" / "test.csv")
    assert classes == CLASSES
    scenes = json.loads((world / "annotations" / "captions_test.json").read_text())["images"]
    single = {str(world / "images" / "test" / s["file_name"]): s["scene"][0] for s in scenes if len(s["scene"]) == 1}
    assert sorted(paths) == sorted(single)
    for path, label in zip(paths, labels):
        assert classes[label] == f"{single[path]['colour']} {single[path]['shape']}"


# --- real-format files ------------------------------------------------------------------------------

def test_real_coco_captions(tmp_path):
    coco = {
        "info": {"description": "COCO 2014 Dataset", "url": "http://cocodataset.org", "version": "1.0", "year": 2014},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}],
        "images": [
            {"license": 5, "file_name": "COCO_val2014_000000391895.jpg",
             "coco_url": "http://images.cocodataset.org/val2014/COCO_val2014_000000391895.jpg", "height": 360,
             "width": 640, "date_captured": "2013-11-14 11:18:45",
             "flickr_url": "http://farm9.staticflickr.com/8186/8119368305_4e622c8349_z.jpg", "id": 391895},
            {"license": 4, "file_name": "COCO_val2014_000000522418.jpg", "height": 480, "width": 640, "id": 522418},
            {"license": 3, "file_name": "COCO_val2014_000000184613.jpg", "height": 336, "width": 500, "id": 184613},
        ],
        "annotations": [
            {"image_id": 184613, "id": 1, "caption": "A child holding a flowered umbrella and petting a yak."},
            {"image_id": 391895, "id": 770337, "caption": "A man with a red helmet on a small moped on a dirt road. "},
            {"image_id": 184613, "id": 2, "caption": "A young man holding an umbrella next to a herd of cattle.\n"},
        ],
    }
    items = read_coco_captions(_write_json(tmp_path / "captions_val2014.json", coco), tmp_path / "val2014")
    assert [i.image_id for i in items] == ["391895", "184613"]  # the image order; no caption, no item
    assert items[0] == ImageText(str(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg"),
                                 ["A man with a red helmet on a small moped on a dirt road."], "391895")
    assert items[1].captions[1] == "A young man holding an umbrella next to a herd of cattle."


def test_real_llava_records(tmp_path):
    records = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "i6IyJda_0", "model": "", "conversations": [
            {"from": "human", "value": "How to tell if a customer segment is well segmented?"},
            {"from": "gpt", "value": "Look at how homogeneous it is."}]},
        {"id": 7, "images": ["a.jpg", "b.jpg"], "conversations": []},
    ]
    out = read_llava(_write_json(tmp_path / "llava_v1_5_mix665k.json", records), tmp_path)
    assert out[0]["image"] == str(tmp_path / "coco/train2017/000000033471.jpg")
    assert out[0]["conversations"] == records[0]["conversations"]
    assert out[1]["image"] is None and out[1]["images"] == [] and out[1]["id"] == "i6IyJda_0"
    assert out[2]["id"] == "7" and out[2]["images"] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert read_llava(jsonl, tmp_path) == out


def test_real_vqa_with_coco_file_names(tmp_path):
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                 "license": {}, "questions": [{"image_id": 262148, "question": "Where is he looking?",
                                               "question_id": 262148000}]}
    annotations = {"annotations": [{"question_type": "none of the above", "multiple_choice_answer": "down",
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                                for k, a in enumerate(["down"] * 8 + ["at table", "skateboard"])],
                                    "image_id": 262148, "answer_type": "other", "question_id": 262148000}]}
    q = _write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", questions)
    a = _write_json(tmp_path / "v2_mscoco_val2014_annotations.json", annotations)
    (item,) = read_vqa(q, a, tmp_path, file_name_pattern="COCO_val2014_{image_id:012d}.jpg")
    assert item["image"] == str(tmp_path / "COCO_val2014_000000262148.jpg")
    assert item["answer"] == "down" and len(item["answers"]) == 10 and item["answer_type"] == "other"
    (unanswered,) = read_vqa(q, None, tmp_path, file_name_pattern="COCO_val2014_{image_id:012d}.jpg")
    assert unanswered["answers"] == [] and unanswered["answer"] is None


def test_open_clip_tsv_with_title_column(tmp_path):
    (tmp_path / "imgs").mkdir()
    tsv = tmp_path / "cc3m_train.tsv"
    tsv.write_text('filepath\ttitle\nimgs/0.jpg\ta dog, running\nimgs/1.jpg\t"quoted" cat\n'
                   f"{tmp_path}/abs.jpg\ta bird\nimgs/0.jpg\tanother dog\n")
    items = read_csv_captions(tsv, sep="\t")
    assert [i.image_id for i in items] == ["imgs/0.jpg", "imgs/1.jpg", f"{tmp_path}/abs.jpg"]
    assert items[0].image == str(tmp_path / "imgs" / "0.jpg") and items[0].captions == ["a dog, running", "another dog"]
    assert items[1].captions == ["quoted cat"] and items[2].image == str(tmp_path / "abs.jpg")
    assert read_csv_captions(tsv, image_root="/data", sep="\t")[0].image == "/data/imgs/0.jpg"


def test_real_webdataset_layout(tmp_path):
    shard = tmp_path / "laion-000000.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "000000001.jpg", b"\xff\xd8jpeg")
        _add(tar, "000000001.txt", b"a photo of a cat\n")
        _add(tar, "000000001.json", json.dumps({"url": "http://x", "caption": "ignored", "width": 10}).encode())
        _add(tar, "000000002.txt", b"no image here")
        _add(tar, "000000003.webp", b"RIFFwebp")
        _add(tar, "000000003.json", json.dumps({"caption": "a webp dog"}).encode())
        _add(tar, "sub/000000004.png", PNG_MAGIC)
        _add(tar, "sub/000000004.cls", b"3")  # no caption: skipped
    samples = list(iter_webdataset([shard]))
    assert [(s.image_id, s.image, s.captions) for s in samples] == [
        ("000000001", b"\xff\xd8jpeg", ["a photo of a cat"]), ("000000003", b"RIFFwebp", ["a webp dog"])]


# --- errors -----------------------------------------------------------------------------------------

def test_missing_files_raise(tmp_path):
    missing = tmp_path / "missing.json"
    calls = [
        lambda: read_coco_captions(missing, tmp_path),
        lambda: read_csv_captions(tmp_path / "missing.csv"),
        lambda: read_llava(missing, tmp_path),
        lambda: read_vqa(missing, None, tmp_path, file_name_pattern="{image_id}.jpg"),
        lambda: read_labels(tmp_path / "missing.csv", classes_file=tmp_path / "missing.txt"),
        lambda: iter_webdataset([tmp_path / "missing.tar"]),
        lambda: iter_webdataset(str(tmp_path / "none-*.tar")),
    ]
    for call in calls:
        with pytest.raises(GlimpseError, match="missing|none-"):
            call()


def test_malformed_json_raises(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    for call in (lambda: read_coco_captions(bad, tmp_path), lambda: read_llava(bad, tmp_path),
                 lambda: read_vqa(bad, None, tmp_path, file_name_pattern="{image_id}.jpg")):
        with pytest.raises(GlimpseError, match=r"bad\.json: invalid JSON at line 1"):
            call()


def test_missing_keys_and_bad_values_raise(tmp_path):
    coco = _write_json(tmp_path / "coco.json", {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]})
    with pytest.raises(GlimpseError, match=r"coco\.json: images\[0\] has no 'file_name'"):
        read_coco_captions(coco, tmp_path)
    with pytest.raises(GlimpseError, match="'annotations'"):
        read_coco_captions(_write_json(tmp_path / "c2.json", {"images": []}), tmp_path)
    with pytest.raises(GlimpseError, match=r"llava\.json: expected a list"):
        read_llava(_write_json(tmp_path / "llava.json", {"id": 1}), tmp_path)
    with pytest.raises(GlimpseError, match="turn 0 has no 'value'"):
        read_llava(_write_json(tmp_path / "l2.json", [{"conversations": [{"from": "human"}]}]), tmp_path)
    q = _write_json(tmp_path / "q.json", {"questions": [{"image_id": 1, "question": "?", "question_id": 5}]})
    with pytest.raises(GlimpseError, match="no annotation for question_id 5"):
        read_vqa(q, _write_json(tmp_path / "a.json", {"annotations": []}), tmp_path, file_name_pattern="{image_id}")
    with pytest.raises(GlimpseError, match="exactly one of"):
        read_vqa(q, None, tmp_path)
    with pytest.raises(GlimpseError, match="no image file known for image_id 1"):
        read_vqa(q, None, tmp_path, images={2: "2.png"})


def test_malformed_csv_and_labels_raise(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("filepath,caption\na.png,one,two\n")
    with pytest.raises(GlimpseError, match=r"bad\.csv: line 2 has 3 fields"):
        read_csv_captions(bad)
    columns = tmp_path / "columns.csv"
    columns.write_text("filepath,text\na.png,a cat\n")
    with pytest.raises(GlimpseError, match=r"columns\.csv: no 'caption' column \(the columns are filepath, text\)"):
        read_csv_captions(columns)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("filepath,label\na.png,dog\nb.png,0\nc.png,bird\n")
    with pytest.raises(GlimpseError, match=r"labels\.csv: line 4 has label 'bird'"):
        read_labels(labels)
    labels.write_text("filepath,label\na.png,dog\nb.png,0\n")
    assert read_labels(labels, image_root="/data") == (["/data/a.png", "/data/b.png"], [1, 0], ["cat", "dog"])


def test_broken_shards_raise(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(GlimpseError, match=r"junk\.tar: not a readable tar file"):
        list(iter_webdataset([junk]))
    shard = tmp_path / "badjson.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "k.png", PNG_MAGIC)
        _add(tar, "k.json", b"{oops")
    with pytest.raises(GlimpseError, match=r"badjson\.tar: member k\.json is not valid JSON"):
        list(iter_webdataset(str(shard)))


def test_a_label_that_only_looks_like_a_number_and_json_nested_too_deeply(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("filepath,label\na.png,\u00b2\n")  # "²": str.isdigit() says yes, int() says no
    with pytest.raises(GlimpseError, match=r"labels\.csv: line 2 has label '\u00b2'"):
        read_labels(labels)
    deep = tmp_path / "captions.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(GlimpseError, match=r"captions\.json: JSON nested too deeply"):
        read_coco_captions(deep, tmp_path)
    (tmp_path / "llava.jsonl").write_text("{}\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(GlimpseError, match=r"llava\.jsonl: JSON nested too deeply on line 2"):
        read_llava(tmp_path / "llava.jsonl", tmp_path)


def test_a_folder_or_recipe_nested_too_deeply_is_one_line(tmp_path):
    from glimpse.config import load_recipe
    from glimpse.hub.folder import read_json

    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(GlimpseError, match="config.json is not valid JSON: nested too deeply"):
        read_json(tmp_path / "config.json")
    (tmp_path / "deep.yaml").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(GlimpseError, match="malformed recipe .*deep.yaml: nested too deeply"):
        load_recipe(tmp_path / "deep.yaml")
