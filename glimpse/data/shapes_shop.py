"""The shapes shop: a generated e-commerce world whose buyers have hidden tastes, for recommendation.

Items are shapes-world images (one shape on a background) with titles ("large red circle sticker"),
and hidden attributes: a price tier and a popularity.  Each user has a hidden taste over colours,
shapes and sizes (Dirichlet draws), a popularity bias, and a second taste that takes over midway
through their history (the drift that a sequential user model should follow).  Purchases are drawn
from p(item) ∝ colour_taste[c] * shape_taste[s] * size_taste[z] * popularity^bias, without repeats:
the successive draws are Gumbel-top-k of the log weights, which samples exactly that sequence.
What a picture and title show (colour, shape, size) is most of a user's choice; popularity, which
only purchase counts reveal, is the rest: how much of it there is decides how far cold items can go.

Splits are leave-last-out per user (the second-last purchase validates, the last tests).  A fifth of
the items are cold: the generator never draws them before a user's last two purchases, so they are
never bought in training but are bought in validation and test, where only pictures and titles can
place them.

Written in the formats real toolkits read:
    shop.inter, shop.item   RecBole's atomic files (`user_id:token item_id:token rating:float
                            timestamp:float`; RecBole's own leave-one-out split, `{LS: valid_and_test}`
                            ordered by time, gives the same splits)
    mmrec/shop.inter        MMRec's TSV `userID itemID rating timestamp x_label` (0/1/2 = train/val/test)
                            with its id mappings (u_id_mapping.csv, i_id_mapping.csv)
    images/items/ID.png     the item pictures
    truth.json              the hidden world (tastes, biases, popularity, attributes): the oracle reads it,
                            models never do
    world.json              the settings and counts, written last (it marks the world complete)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from glimpse.data import shapes as world
from glimpse.errors import GlimpseError

KINDS = ["sticker", "magnet", "badge", "patch"]  # in the title only: the pictures do not show it
PRICE_TIERS = ["budget", "standard", "premium"]
_PRICE_POPULARITY = (1.5, 1.0, 0.6)  # cheaper items sell more, a hidden attribute's effect
_POPULARITY_SIGMA = 0.7  # the spread of item popularity (log-normal), hidden from every model
_COLD_SHARE = 0.2
_TASTE_ALPHA = 0.4  # Dirichlet concentration: most users like a few colours and shapes
_MIN_HISTORY, _MAX_HISTORY = 5, 50
_T0 = 1_700_000_000  # timestamps (seconds) start here


def item_title(item: dict) -> str:
    return f"{item['size']} {item['colour']} {item['shape']} {item['kind']}"


def generate_shapes_shop(out: str | Path, *, seed: int = 0, n_users: int = 5000, n_items: int = 2000,
                         image_size: int = 64, progress: bool = True) -> dict:
    """Write the shapes shop into `out` (a new or empty folder) and return its world.json.  The same
    arguments always write the same files."""
    out = Path(out)
    for name, n, low in (("users", n_users, 10), ("items", n_items, 5 * _MAX_HISTORY)):
        if not isinstance(n, int) or n < low:
            raise GlimpseError(f"{out}: the number of {name} must be an integer of at least {low}, not {n!r}")
    if not isinstance(image_size, int) or image_size < 32 or image_size % 2:
        raise GlimpseError(f"{out}: image_size must be an even integer of at least 32, not {image_size!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GlimpseError(f"{out}: already exists and is not an empty folder; choose a new one")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 23]))
    items = _items(rng, n_items)
    cold = np.zeros(n_items, bool)
    cold[rng.choice(n_items, int(round(_COLD_SHARE * n_items)), replace=False)] = True
    users = [_user(rng) for _ in range(n_users)]
    arrays = item_arrays(items)
    histories = [_history(rng, u, arrays, cold) for u in tqdm(users, desc="shapes-shop users", disable=not progress)]

    (out / "images" / "items").mkdir(parents=True)
    draw_rng = np.random.default_rng(np.random.SeedSequence([seed, 24]))
    for it in tqdm(items, desc="shapes-shop items", unit="img", disable=not progress):
        obj = {k: it[k] for k in ("size", "colour", "shape", "position")}
        (out / it["image"]).write_bytes(world._png(world._draw([obj], draw_rng, image_size)[0], image_size))
    _write_recbole(out, items, histories)
    _write_mmrec(out, items, histories)
    truth = {"items": [{k: it[k] for k in ("item_id", "colour", "shape", "size", "kind", "price_tier", "popularity")}
                       | {"cold": bool(c)} for it, c in zip(items, cold)],
             "users": users}
    (out / "truth.json").write_text(json.dumps(truth), encoding="utf-8")
    from glimpse.data.tokenizer import train_tokenizer
    train_tokenizer((item_title(it) for it in items), out / "tokenizer.json")
    n_inter = sum(len(h) for h in histories)
    info = {"kind": "shapes-shop", "version": 1, "seed": seed, "users": n_users, "items": n_items,
            "cold_items": int(cold.sum()), "interactions": n_inter, "image_size": image_size,
            "colours": list(world.COLOURS), "shapes": list(world.SHAPES), "kinds": KINDS, "price_tiers": PRICE_TIERS}
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _items(rng: np.random.Generator, n: int) -> list[dict]:
    items = []
    for i in range(n):
        tier = int(rng.integers(len(PRICE_TIERS)))
        it = {"item_id": f"i{i:05d}", "colour": world.COLOURS[rng.integers(len(world.COLOURS))],
              "shape": world.SHAPES[rng.integers(len(world.SHAPES))], "size": world.SIZES[rng.integers(2)],
              "kind": KINDS[rng.integers(len(KINDS))], "price_tier": PRICE_TIERS[tier],
              "popularity": float(rng.lognormal(0.0, _POPULARITY_SIGMA) * _PRICE_POPULARITY[tier]),
              "position": world.POSITIONS[rng.integers(len(world.POSITIONS))], "image": f"images/items/i{i:05d}.png"}
        it["title"] = item_title(it)
        items.append(it)
    return items


def _user(rng: np.random.Generator) -> dict:
    def taste() -> dict:
        return {"colour": rng.dirichlet([_TASTE_ALPHA] * len(world.COLOURS)).round(6).tolist(),
                "shape": rng.dirichlet([_TASTE_ALPHA] * len(world.SHAPES)).round(6).tolist(),
                "size": rng.dirichlet([_TASTE_ALPHA] * len(world.SIZES)).round(6).tolist()}
    length = int(np.clip(round(np.exp(rng.normal(np.log(14), 0.6))), _MIN_HISTORY, _MAX_HISTORY))
    return {"length": length, "bias": round(float(rng.uniform(0.3, 1.2)), 4), "taste": taste(), "drifted": taste()}


def item_arrays(items: list[dict]) -> tuple[np.ndarray, ...]:
    """(colour index, shape index, size index, log popularity) of each item: what tastes are taken over."""
    return (np.array([world.COLOURS.index(it["colour"]) for it in items]),
            np.array([world.SHAPES.index(it["shape"]) for it in items]),
            np.array([world.SIZES.index(it["size"]) for it in items]),
            np.log(np.array([it["popularity"] for it in items])))


def log_weights(user: dict, arrays: tuple, taste: str = "drifted") -> np.ndarray:
    """log p(item) up to a constant, under one of a user's tastes ("taste" before the drift, "drifted"
    after it): what the generator draws from, and what the oracle ranks by.  `arrays`: item_arrays."""
    ci, si, zi, log_pop = arrays
    t = user[taste]
    colour, shape, size = (np.log(np.maximum(np.array(t[k]), 1e-12)) for k in ("colour", "shape", "size"))
    return colour[ci] + shape[si] + size[zi] + user["bias"] * log_pop


def _history(rng: np.random.Generator, user: dict, arrays: tuple, cold: np.ndarray) -> list[int]:
    """A user's purchases in time order: the first half from the first taste, the rest from the drifted
    one; cold items only in the last two (validation and test)."""
    L = user["length"]
    drift = L // 2
    bought: list[int] = []
    for taste, start, stop in (("taste", 0, drift), ("drifted", drift, L - 2), ("drifted", L - 2, L)):
        w = log_weights(user, arrays, taste) + rng.gumbel(size=len(cold))
        w[bought] = -np.inf
        if stop <= L - 2:
            w[cold] = -np.inf
        bought += np.argsort(-w, kind="stable")[: stop - start].tolist()
    return bought


def _timestamps(rng_seed: int, n: int) -> list[int]:
    rng = np.random.default_rng(rng_seed)
    start = _T0 + int(rng.integers(0, 30 * 86400))
    return (start + np.cumsum(rng.integers(3600, 20 * 86400, n))).tolist()


def _write_recbole(out: Path, items: list[dict], histories: list[list[int]]) -> None:
    with open(out / "shop.item", "w", encoding="utf-8", newline="") as f:
        f.write("item_id:token\ttitle:token_seq\timage:token\n")
        for it in items:
            f.write(f"{it['item_id']}\t{it['title']}\t{it['image']}\n")
    with open(out / "shop.inter", "w", encoding="utf-8", newline="") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u, h in enumerate(histories):
            for i, ts in zip(h, _timestamps(u, len(h))):
                f.write(f"u{u:05d}\t{items[i]['item_id']}\t5.0\t{ts}\n")


def _write_mmrec(out: Path, items: list[dict], histories: list[list[int]]) -> None:
    folder = out / "mmrec"
    folder.mkdir()
    with open(folder / "shop.inter", "w", encoding="utf-8", newline="") as f:
        f.write("userID\titemID\trating\ttimestamp\tx_label\n")
        for u, h in enumerate(histories):
            labels = [0] * (len(h) - 2) + [1, 2]
            for i, ts, x in zip(h, _timestamps(u, len(h)), labels):
                f.write(f"{u}\t{i}\t5\t{ts}\t{x}\n")
    for name, ids in (("u_id_mapping.csv", [f"u{u:05d}" for u in range(len(histories))]),
                      ("i_id_mapping.csv", [it["item_id"] for it in items])):
        with open(folder / name, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["org_id", "remap_id"])
            w.writerows([orig, k] for k, orig in enumerate(ids))


def read_truth(root: str | Path) -> dict:
    try:
        return json.loads((Path(root) / "truth.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise GlimpseError(f"{root}: no readable truth.json ({e}); the oracle needs a generated shapes shop") from None
