"""Readers for the image-text dataset formats glimpse trains and evaluates on.

COCO captions, open_clip CSV/TSV, WebDataset tar shards, LLaVA conversations, VQAv2 questions and
answers, and classification label CSVs.  They read the real datasets as well as the shapes world
(glimpse.data.shapes), never decode images (that is left to the safe image loader), and report every
problem with a file as a one-line GlimpseError naming it.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from glimpse.data.images import IMAGE_SUFFIXES
from glimpse.errors import GlimpseError

PathLike = str | os.PathLike

IMAGE_EXTS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)
_BRACES = re.compile(r"\{([^{}]*)\}")


@dataclass
class ImageText:
    """One image and its captions."""

    image: str | bytes  # an absolute file path, or the encoded image bytes (WebDataset)
    captions: list[str]
    image_id: str  # stable id: the COCO image id, the CSV file path or the WebDataset key


def read_coco_captions(annotation_file: PathLike, image_root: PathLike) -> list[ImageText]:
    """Images of a COCO captions file with their captions, in the order of its "images" list.

    Images without a caption are skipped; ``file_name`` is resolved against ``image_root``.
    """
    data = _load_json(annotation_file)
    images = _list(data, "images", annotation_file, "the top level")
    captions: dict[str, list[str]] = {}
    for k, ann in enumerate(_list(data, "annotations", annotation_file, "the top level")):
        where = f"annotations[{k}]"
        image_id = str(_field(ann, "image_id", annotation_file, where))
        captions.setdefault(image_id, []).append(_text(ann, "caption", annotation_file, where).strip())
    items = []
    for k, image in enumerate(images):
        image_id = str(_field(image, "id", annotation_file, f"images[{k}]"))
        if image_id in captions:
            file_name = _text(image, "file_name", annotation_file, f"images[{k}]")
            items.append(ImageText(_resolve(image_root, file_name), captions[image_id], image_id))
    return items


def read_csv_captions(csv_file: PathLike, image_root: PathLike | None = None, img_key: str = "filepath",
                      caption_key: str = "caption", sep: str = ",") -> list[ImageText]:
    """Images of an open_clip-style CSV (or TSV with ``sep="\\t"``), rows of one file path grouped.

    Relative paths are resolved against ``image_root``, by default the CSV's folder.  A file without a
    ``caption_key`` column but with a "title" one (open_clip's default) is read from "title".
    """
    header, rows = _read_csv(csv_file, sep)
    if caption_key not in header and "title" in header:
        caption_key = "title"
    path_col, caption_col = _columns(header, (img_key, caption_key), csv_file)
    root = Path(csv_file).parent if image_root is None else image_root
    captions: dict[str, list[str]] = {}
    for _, row in rows:
        captions.setdefault(row[path_col], []).append(row[caption_col].strip())
    return [ImageText(_resolve(root, file), caps, file) for file, caps in captions.items()]


def iter_webdataset(shards: PathLike | Iterable[PathLike]) -> Iterator[ImageText]:
    """Samples of WebDataset tar shards, streamed in order.

    ``shards`` is a list of tar paths, a glob ("data/*.tar") or a brace pattern
    ("data/train-{000000..000003}.tar"); all shards are checked to exist before the first sample.
    Members are grouped by key (the name up to the first "." of its base name); the image is the
    first of png/jpg/jpeg/webp, the captions the .json "captions" list, else the .txt, else the .json
    "caption".  Samples without an image or a caption are skipped.
    """
    paths = expand_shards(shards)
    return (sample for path in paths for sample in _iter_shard(path))


def read_llava(json_file: PathLike, image_root: PathLike) -> list[dict]:
    """Records of a LLaVA instruction file (a JSON list, or JSON Lines for a ``.jsonl`` file).

    Each is ``{"id", "image", "images", "conversations"}``: ``image`` is the absolute path of the
    (first) image or None for a text-only record, ``images`` all of them (records may use an "image"
    string or an "images" list), ``conversations`` the turns as given ({"from", "value"}, checked).
    """
    data = _load_jsonl(json_file) if Path(json_file).suffix == ".jsonl" else _load_json(json_file)
    if not isinstance(data, list):
        raise GlimpseError(f"{json_file}: expected a list of conversation records, found {_kind(data)}")
    records = []
    for k, record in enumerate(data):
        where = f"record {k}"
        conversations = _list(record, "conversations", json_file, where)
        for t, turn in enumerate(conversations):
            _text(turn, "from", json_file, f"{where} turn {t}")
            _text(turn, "value", json_file, f"{where} turn {t}")
        names = record.get("images") if "images" in record else record.get("image")
        names = [] if names is None else [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise GlimpseError(f"{json_file}: {where} has an image that is not a file name")
        images = [_resolve(image_root, n) for n in names]
        records.append({"id": str(record.get("id", k)), "image": images[0] if images else None, "images": images,
                        "conversations": conversations})
    return records


def read_vqa(questions_file: PathLike, annotations_file: PathLike | None, image_root: PathLike,
             file_name_pattern: str | None = None, images: dict | PathLike | None = None) -> list[dict]:
    """Questions of a VQAv2-format pair of files, each with its answers and image path.

    Images are located by exactly one of:
    - ``file_name_pattern``, formatted with ``image_id`` (real VQAv2: "COCO_val2014_{image_id:012d}.jpg");
    - ``images``: a dict image id -> file name, or the path of a COCO-style JSON file with an "images"
      list of {"id", "file_name"} (for the shapes world: ``annotations/captions_{split}.json``).
    File names are resolved against ``image_root``.  Each item is ``{"question_id", "image_id",
    "image", "question", "answers" (the annotators' answers, 10 in VQAv2), "answer" (the
    multiple_choice_answer), "answer_type", "sentence" (None but in the shapes world)}``; without
    ``annotations_file`` (a test split) "answers" is empty and "answer" and "answer_type" are None.
    """
    if (file_name_pattern is None) == (images is None):
        raise GlimpseError(f"{questions_file}: locate its images with exactly one of images= or file_name_pattern=")
    if isinstance(images, (str, os.PathLike)):
        images = _coco_file_names(images)
    file_names = None if images is None else {str(k): v for k, v in images.items()}
    answers = {} if annotations_file is None else _vqa_answers(annotations_file)
    items = []
    for k, q in enumerate(_list(_load_json(questions_file), "questions", questions_file, "the top level")):
        where = f"questions[{k}]"
        question_id = _field(q, "question_id", questions_file, where)
        image_id = _field(q, "image_id", questions_file, where)
        if file_names is not None:
            if str(image_id) not in file_names:
                raise GlimpseError(f"{questions_file}: no image file known for image_id {image_id} of {where}")
            file_name = file_names[str(image_id)]
        else:
            try:
                file_name = file_name_pattern.format(image_id=image_id)
            except (ValueError, KeyError, IndexError) as e:
                raise GlimpseError(f"{questions_file}: file_name_pattern {file_name_pattern!r} does not fit "
                                   f"image_id {image_id!r} ({e})") from None
        item = {"question_id": question_id, "image_id": image_id, "image": _resolve(image_root, file_name),
                "question": _text(q, "question", questions_file, where), "answers": [], "answer": None,
                "answer_type": None}
        if annotations_file is not None:
            if question_id not in answers:
                raise GlimpseError(f"{annotations_file}: no annotation for question_id {question_id}")
            item.update(answers[question_id])
        items.append(item)
    return items


def read_labels(csv_file: PathLike, image_root: PathLike | None = None,
                classes_file: PathLike | None = None) -> tuple[list[str], list[int], list[str]]:
    """(absolute image paths, class indices, class names) of a "filepath,label" CSV.

    A label is a class name or a class index.  Class names come from ``classes_file``, one per line,
    by default ``classes.txt`` beside the CSV.  Relative paths are resolved against ``image_root``, by
    default the CSV folder's parent (the shapes layout: ``labels/test.csv`` lists ``images/test/...``).
    """
    classes_file = Path(csv_file).parent / "classes.txt" if classes_file is None else classes_file
    classes = _read_classes(classes_file)
    header, rows = _read_csv(csv_file, ",")
    path_col, label_col = _columns(header, ("filepath", "label"), csv_file)
    root = Path(csv_file).parent.parent if image_root is None else image_root
    index = {name: k for k, name in enumerate(classes)}
    paths, labels = [], []
    for line, row in rows:
        label = row[label_col].strip()
        if label in index:
            labels.append(index[label])
        elif label.isascii() and label.isdigit() and int(label) < len(classes):  # not "²", which int() refuses
            labels.append(int(label))
        else:
            raise GlimpseError(f"{csv_file}: line {line} has label {label!r}, which is not a class of {classes_file}")
        paths.append(_resolve(root, row[path_col]))
    return paths, labels, classes


def _resolve(root: PathLike, name: str) -> str:
    return os.path.abspath(os.path.join(root, name))


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _read_text(path: PathLike) -> str:
    try:
        # utf-8-sig: files saved by spreadsheet programs start with a byte-order mark.
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise GlimpseError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise GlimpseError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise GlimpseError(f"{path}: cannot read it ({e.strerror})") from None


def _load_json(path: PathLike) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise GlimpseError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except RecursionError:
        raise GlimpseError(f"{path}: JSON nested too deeply") from None


def _load_jsonl(path: PathLike) -> list:
    records = []
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise GlimpseError(f"{path}: invalid JSON on line {line_no} ({e.msg})") from None
            except RecursionError:
                raise GlimpseError(f"{path}: JSON nested too deeply on line {line_no}") from None
    return records


def _field(obj: object, key: str, path: PathLike, where: str) -> object:
    if not isinstance(obj, dict):
        raise GlimpseError(f"{path}: {where} should be an object, found {_kind(obj)}")
    if key not in obj:
        raise GlimpseError(f"{path}: {where} has no {key!r}")
    return obj[key]


def _list(obj: object, key: str, path: PathLike, where: str) -> list:
    value = _field(obj, key, path, where)
    if not isinstance(value, list):
        raise GlimpseError(f"{path}: {key!r} of {where} should be a list, found {_kind(value)}")
    return value


def _text(obj: object, key: str, path: PathLike, where: str) -> str:
    value = _field(obj, key, path, where)
    if not isinstance(value, str):
        raise GlimpseError(f"{path}: {key!r} of {where} should be a string, found {_kind(value)}")
    return value


def _read_csv(path: PathLike, sep: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the (line number, fields) of each non-blank row of a CSV file."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    try:
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise GlimpseError(f"{path}: empty, expected a header row")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise GlimpseError(f"{path}: line {reader.line_num} has {len(row)} fields, "
                                   f"the header has {len(header)}")
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise GlimpseError(f"{path}: invalid CSV at line {reader.line_num} ({e})") from None
    return header, rows


def _columns(header: list[str], names: tuple[str, ...], path: PathLike) -> list[int]:
    for name in names:
        if name not in header:
            raise GlimpseError(f"{path}: no {name!r} column (the columns are {', '.join(header)})")
    return [header.index(name) for name in names]


def _read_classes(path: PathLike) -> list[str]:
    classes = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if not classes:
        raise GlimpseError(f"{path}: no class names in it")
    if len(set(classes)) != len(classes):
        raise GlimpseError(f"{path}: a class name appears twice")
    return classes


def _coco_file_names(path: PathLike) -> dict[str, str]:
    names = {}
    for k, image in enumerate(_list(_load_json(path), "images", path, "the top level")):
        names[str(_field(image, "id", path, f"images[{k}]"))] = _text(image, "file_name", path, f"images[{k}]")
    return names


def _vqa_answers(path: PathLike) -> dict[object, dict]:
    """question_id -> {"answers", "answer", "answer_type"} of a VQAv2 annotations file."""
    answers = {}
    for k, ann in enumerate(_list(_load_json(path), "annotations", path, "the top level")):
        where = f"annotations[{k}]"
        given = _list(ann, "answers", path, where)
        answers[_field(ann, "question_id", path, where)] = {
            "answers": [_text(a, "answer", path, f"{where} answers[{j}]") for j, a in enumerate(given)],
            "answer": _text(ann, "multiple_choice_answer", path, where),
            "answer_type": ann.get("answer_type"),
            "sentence": ann.get("answer_sentence"),  # the shapes world's full-sentence answer; not VQAv2's
        }
    return answers


def _expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: "{000..002}" ranges (zero-padded like the start) and "{a,b}" lists."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        width, low, high = len(bounds.group(1)), int(bounds.group(1)), int(bounds.group(2))
        options = [f"{n:0{width}d}" for n in range(low, high + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [path for option in options for path in _expand_braces(head + option + tail)]


def expand_shards(shards: PathLike | Iterable[PathLike]) -> list[str]:
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    paths = []
    for pattern in patterns:
        for path in _expand_braces(os.fspath(pattern)):
            if any(c in path for c in "*?["):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise GlimpseError(f"{path}: no WebDataset shard matches")
                paths += matches
            elif not os.path.isfile(path):
                raise GlimpseError(f"{path}: WebDataset shard not found")
            else:
                paths.append(path)
    if not paths:
        raise GlimpseError(f"{shards}: no WebDataset shards given")
    return paths


def _iter_shard(path: str) -> Iterator[ImageText]:
    """The samples of one tar shard; a sample's members are consecutive, as WebDataset writes them."""
    try:
        with tarfile.open(path, "r:*") as tar:
            key, files = None, {}
            for member in tar:
                name = member.name
                dot = name.find(".", name.rfind("/") + 1)
                # Skip directories and names with no extension or no key (such as "._x" macOS files).
                if not member.isfile() or dot <= name.rfind("/") + 1:
                    continue
                if name[:dot] != key:
                    if key is not None and (sample := wds_sample(path, key, files)):
                        yield sample
                    key, files = name[:dot], {}
                files[name[dot + 1:].lower()] = tar.extractfile(member).read()
            if key is not None and (sample := wds_sample(path, key, files)):
                yield sample
    except (tarfile.TarError, EOFError, OSError) as e:
        raise GlimpseError(f"{path}: not a readable tar file ({e})") from None


def wds_usable(suffixes) -> bool:
    """Whether a sample's member suffixes (lower case) can make an image-caption pair: an image and a
    .txt or a .json.  The stream (glimpse.data.stream) decides by the names alone which samples it counts."""
    return any(ext in suffixes for ext in IMAGE_EXTS) and ("txt" in suffixes or "json" in suffixes)


def wds_sample(path: str, key: str, files: dict[str, bytes]) -> ImageText | None:
    """The image and captions of one WebDataset sample (suffix -> bytes), None without an image or a caption."""
    image = next((files[ext] for ext in IMAGE_EXTS if ext in files), None)
    captions = wds_captions(path, key, files)
    return ImageText(image, captions, key) if image is not None and captions else None


def wds_captions(path: str, key: str, files: dict[str, bytes]) -> list[str]:
    """A WebDataset sample's captions: its .json's "captions" list or "caption", else its .txt."""
    meta = None
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise GlimpseError(f"{path}: member {key}.json is not valid JSON ({str(e) or 'nested too deeply'})") from None
    if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
        captions = [c for c in meta["captions"] if isinstance(c, str)]
    elif "txt" in files:
        captions = [files["txt"].decode("utf-8", errors="replace")]
    elif isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        captions = [meta["caption"]]
    else:
        captions = []
    return [c.strip() for c in captions if c.strip()]
