"""What a perfect captioner scores on `shapes-captioner`'s figures: each image's caption is one of its
own references, a correct description in the world's own words.

    python experiments/captioner_ceiling.py WORLD [--splits test test_novel]

WORLD is the shapes world the captioner is evaluated on (the folder with annotations/).  Two rows a
split: the caption held out of the references it is scored against (the world words each scene in
5 distinct ways, so a correct caption in another phrasing than the 4 left is what a model writes), and
the caption left among them (an upper bound no model reaches).  `shuffled_cider` is the captioner's
control (each caption against another image's references): its value here is the floor for any
captioner that describes its images correctly, since the control scores correct captions against
wrong references.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glimpse.config import load_recipe
from glimpse.data.pairs import load_pairs
from glimpse.families.encoder_decoder.evaluate import caption_figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", type=Path)
    ap.add_argument("--splits", nargs="+", default=["test", "test_novel"])
    args = ap.parse_args()
    data = load_recipe("shapes-captioner").data
    for split in args.splits:
        refs = [p.captions for p in load_pairs(data, args.world, split)]
        captions = [r[0] for r in refs]
        for name, scored_against in (("held out", [r[1:] for r in refs]), ("among refs", refs)):
            figures = caption_figures(captions, scored_against)
            print(f"{split:>10} {name:>10}: " + "  ".join(
                f"{k} {figures[k]:.3f}" for k in ("cider", "bleu_4", "exact", "scene_exact", "shuffled_cider")))


if __name__ == "__main__":
    main()
