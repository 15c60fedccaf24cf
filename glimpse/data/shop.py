"""Interaction data for recommendation: a catalogue of items (id, title, picture) and each user's
purchases split into training history, validation targets and test targets.

Readers, each to one `Shop`:
    recbole   RecBole atomic files: `X.inter` (user_id, item_id, timestamp) and `X.item` (item_id, title,
              image); split leave-last-out per user in time order (RecBole's `{LS: valid_and_test}`)
    mmrec     MMRec's `X.inter` TSV (userID itemID rating timestamp x_label, 0/1/2 = train/val/test), with
              the item titles and pictures from a RecBole-style `.item` file when one is given
    amazon    Amazon Reviews'23 JSONL: reviews (user_id, parent_asin, timestamp) and item metadata (title,
              images whose `large` is a local path, or DIR/ASIN.jpg under data.images.items); leave-last-out

Items never bought in a training history are cold: a model has no ID embedding for them (`Shop.warm`).
Users with fewer than three purchases (nothing left to train on after validation and test) are left out.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glimpse.errors import GlimpseError

FORMATS = ("recbole", "mmrec", "amazon")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class Catalogue:
    """The items alone: what a trained run needs to name what it recommends (kept in its folder)."""
    item_ids: list[str]
    titles: list[str]
    images: list[str | None]  # absolute paths; None: the item has no picture

    def __post_init__(self):
        self.index = {item: i for i, item in enumerate(self.item_ids)}  # item id -> index

    def item_index(self, item: str) -> int:
        if item not in self.index:
            raise GlimpseError(f"no item {item!r} in the catalogue ({len(self.item_ids)} items, e.g. {self.item_ids[0]})")
        return self.index[item]

    def to_json(self) -> str:
        return json.dumps({"item_ids": self.item_ids, "titles": self.titles, "images": self.images})

    @classmethod
    def from_json(cls, path: Path) -> Catalogue:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            catalogue = cls(list(d["item_ids"]), list(d["titles"]), list(d["images"]))
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise GlimpseError(f"{path}: not a readable item catalogue ({type(e).__name__})") from None
        if not len(catalogue.item_ids) == len(catalogue.titles) == len(catalogue.images):
            raise GlimpseError(f"{path}: item_ids, titles and images differ in length")
        return catalogue


@dataclass
class Shop(Catalogue):
    """The items and each user's purchases, split for training, validation and test."""
    user_ids: list[str]
    train: list[list[int]]  # per user: training purchases in time order (item indices)
    val: list[list[int]]  # per user: validation targets (the purchases after `train`)
    test: list[list[int]]  # per user: test targets (after `val`)

    def __post_init__(self):
        super().__post_init__()
        self.warm = np.zeros(len(self.item_ids), bool)
        for h in self.train:
            self.warm[h] = True

    def history(self, user: int, split: str) -> list[int]:
        """What a user had bought before a split's targets: training purchases, and validation's for test."""
        return self.train[user] + (self.val[user] if split == "test" else [])

    def targets(self, user: int, split: str) -> list[int]:
        return {"val": self.val, "test": self.test}[split][user]

    def user_index(self, user: str | int) -> int:
        if isinstance(user, int) or (isinstance(user, str) and user.isdigit() and user not in self.user_ids):
            u = int(user)
            if not 0 <= u < len(self.user_ids):
                raise GlimpseError(f"no user {user}: users are 0 to {len(self.user_ids) - 1}")
            return u
        try:
            return self.user_ids.index(user)
        except ValueError:
            raise GlimpseError(f"no user {user!r} ({len(self.user_ids)} users, e.g. {self.user_ids[0]})") from None


def load_shop(data_cfg, root: Path) -> Shop:
    """The shop a recipe names: data.format with data.files ({inter, item} or {reviews, meta}), relative to
    `root` (the generated world's folder, or data.root)."""
    files = {k: _path(root, v) for k, v in data_cfg.files.items()}
    fmt = data_cfg.format
    if fmt not in FORMATS:
        raise GlimpseError(f"data.format {fmt!r}: a shop is read from one of {', '.join(FORMATS)}")
    need = {"recbole": ("inter", "item"), "mmrec": ("inter",), "amazon": ("reviews", "meta")}[fmt]
    for key in need:
        if key not in files:
            raise GlimpseError(f"data.files.{key}: the {fmt} format needs it (data.files: {{{', '.join(need)}}})")
    if fmt == "amazon":
        images = data_cfg.images.get("items")
        return read_amazon(files["reviews"], files["meta"], _path(root, images) if images else None)
    if fmt == "mmrec":
        return read_mmrec(files["inter"], files.get("item"))
    return read_recbole(files["inter"], files["item"])


def _path(root: Path, p: str) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else Path(root) / p


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a tab-separated file, every row as long as the header."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if not header:
                raise GlimpseError(f"{path}: empty file; expected a tab-separated header line")
            rows = []
            for n, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise GlimpseError(f"{path}:{n}: {len(row)} fields, the header has {len(header)}")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as e:
        raise GlimpseError(f"{path}: cannot read ({e})") from None
    return header, rows


def _column(path: Path, header: list[str], name: str) -> int:
    """The column whose name (before RecBole's `:type`) is `name`."""
    names = [h.split(":")[0] for h in header]
    if name not in names:
        raise GlimpseError(f"{path}: no {name} column (columns: {', '.join(header)})")
    return names.index(name)


def _number(path: Path, value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise GlimpseError(f"{path}: {what} {value!r} is not a number") from None


def read_items(item: Path) -> tuple[list[str], list[str], list[str | None]]:
    """(ids, titles, picture paths) of a RecBole-style `.item` file: item_id, title and an optional image
    column (paths relative to the file's folder)."""
    header, rows = _rows(item)
    ci, ct = _column(item, header, "item_id"), _column(item, header, "title")
    cm = _column(item, header, "image") if "image" in [h.split(":")[0] for h in header] else None
    images = [str(_path(item.parent, r[cm])) if cm is not None and r[cm] else None for r in rows]
    return [r[ci] for r in rows], [r[ct] for r in rows], images


def read_recbole(inter: Path, item: Path) -> Shop:
    item_ids, titles, images = read_items(item)
    header, rows = _rows(inter)
    cu, cit, cts = (_column(inter, header, c) for c in ("user_id", "item_id", "timestamp"))
    events = [(r[cu], r[cit], _number(inter, r[cts], "timestamp")) for r in rows]
    return _leave_last_out(inter, item_ids, titles, images, events)


def read_mmrec(inter: Path, item: Path | None = None) -> Shop:
    """MMRec's `.inter` (remapped integer ids).  With `item`, titles and pictures come from that file, matched
    through MMRec's `i_id_mapping.csv` beside the `.inter` (org_id -> remap_id) when there is one, else by
    the item file's row order."""
    header, rows = _rows(inter)
    cu, cit, cts, cx = (_column(inter, header, c) for c in ("userID", "itemID", "timestamp", "x_label"))
    if item is not None:
        item_ids, titles, images = read_items(item)
        order = list(range(len(item_ids)))
        mapping = inter.parent / "i_id_mapping.csv"
        if mapping.is_file():
            mh, mrows = _rows(mapping)
            co, cr = _column(mapping, mh, "org_id"), _column(mapping, mh, "remap_id")
            where = {it: i for i, it in enumerate(item_ids)}
            order = [-1] * len(mrows)
            for r in mrows:
                remap = _int(mapping, r[cr], len(mrows))
                if r[co] not in where:
                    raise GlimpseError(f"{mapping}: item {r[co]!r} is not in {item}")
                order[remap] = where[r[co]]
            if -1 in order:
                raise GlimpseError(f"{mapping}: remap_id {order.index(-1)} is missing")
        id_of = lambda v: item_ids[order[_int(inter, v, len(order))]]  # noqa: E731
    else:  # MMRec's integer ids, no titles or pictures: an ID-only shop
        n = 1 + max((_int(inter, r[cit], 2**31) for r in rows), default=-1)
        item_ids, titles, images = [str(i) for i in range(n)], [""] * n, [None] * n
        id_of = lambda v: str(_int(inter, v, n))  # noqa: E731
    per_user: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for r in rows:
        if r[cx] not in ("0", "1", "2"):
            raise GlimpseError(f"{inter}: x_label {r[cx]!r} must be 0, 1 or 2 (train, val, test)")
        item_id = id_of(r[cit])
        per_user[r[cu]].append((_number(inter, r[cts], "timestamp"), int(r[cx]), item_id))
    index = {it: i for i, it in enumerate(item_ids)}
    users, split = [], ([], [], [])
    for user, events in per_user.items():
        events.sort(key=lambda e: e[0])
        parts = [[index[it] for _, x, it in events if x == k] for k in range(3)]
        if parts[0] and (parts[1] or parts[2]):
            users.append(user)
            for k in range(3):
                split[k].append(parts[k])
    return _checked(inter, Shop(item_ids, titles, images, users, *split))


def _int(path: Path, value: str, n: int) -> int:
    if not value.isdigit() or int(value) >= n:
        raise GlimpseError(f"{path}: {value!r} is not an item index below {n}")
    return int(value)


def read_amazon(reviews: Path, meta: Path, image_dir: Path | None = None) -> Shop:
    """Amazon Reviews'23 (McAuley-Lab): a category's review JSONL and its meta JSONL.  An item's picture is
    its first image whose `large` is a local file (relative to the meta file), else IMAGE_DIR/ASIN.jpg
    (.png, .webp); items without one are read from their titles alone."""
    item_ids, titles, images = [], [], []
    for n, rec in _jsonl(meta):
        asin = rec.get("parent_asin")
        if not isinstance(asin, str) or not asin:
            raise GlimpseError(f"{meta}:{n}: no parent_asin")
        item_ids.append(asin)
        titles.append(str(rec.get("title") or ""))
        images.append(_amazon_image(meta.parent, rec.get("images"), asin, image_dir))
    known = set(item_ids)
    events = []
    for n, rec in _jsonl(reviews):
        user, asin, ts = rec.get("user_id"), rec.get("parent_asin"), rec.get("timestamp")
        if not isinstance(user, str) or not isinstance(asin, str) or not isinstance(ts, (int, float)):
            raise GlimpseError(f"{reviews}:{n}: a review needs user_id, parent_asin and a numeric timestamp")
        if asin in known:  # reviews of items the meta file lacks have no title or picture: left out
            events.append((user, asin, float(ts)))
    return _leave_last_out(reviews, item_ids, titles, images, events)


def _amazon_image(base: Path, entries, asin: str, image_dir: Path | None) -> str | None:
    for e in entries if isinstance(entries, list) else []:
        for key in ("large", "hi_res", "thumb"):
            v = e.get(key) if isinstance(e, dict) else None
            if isinstance(v, str) and v and "://" not in v and (base / v).is_file():
                return str(base / v)
    for suffix in _IMAGE_SUFFIXES if image_dir is not None else ():
        if (image_dir / f"{asin}{suffix}").is_file():
            return str(image_dir / f"{asin}{suffix}")
    return None


def _jsonl(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise GlimpseError(f"{path}:{n}: not JSON ({e.msg})") from None
                    if not isinstance(rec, dict):
                        raise GlimpseError(f"{path}:{n}: a line must be a JSON object")
                    yield n, rec
    except (OSError, UnicodeDecodeError) as e:
        raise GlimpseError(f"{path}: cannot read ({e})") from None


def _leave_last_out(path: Path, item_ids: list[str], titles: list[str], images: list, events) -> Shop:
    """Each user's purchases in time order (ties keep the file's order): the last is test, the one
    before it validation, the rest training."""
    index = {it: i for i, it in enumerate(item_ids)}
    if len(index) != len(item_ids):
        raise GlimpseError(f"{path}: the item file repeats an item id")
    per_user: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for user, item, ts in events:
        if item not in index:
            raise GlimpseError(f"{path}: item {item!r} is not in the item file")
        per_user[user].append((ts, index[item]))
    users, train, val, test = [], [], [], []
    for user, seq in per_user.items():
        seq = [i for _, i in sorted(seq, key=lambda e: e[0])]
        if len(seq) >= 3:
            users.append(user)
            train.append(seq[:-2])
            val.append([seq[-2]])
            test.append([seq[-1]])
    return _checked(path, Shop(item_ids, titles, images, users, train, val, test))


def _checked(path: Path, shop: Shop) -> Shop:
    if not shop.user_ids:
        raise GlimpseError(f"{path}: no user has three purchases (training, validation, test)")
    return shop
