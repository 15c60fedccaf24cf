"""Does the video LLaVA learn temporal questions when it trains on questions alone?  The recipe's
conversations are half descriptions (most of the tokens); this trains `shapes-video-llava` on the
question conversations only and evaluates on the first questions of test.

    python experiments/video_llava_questions_only.py OUT --set "init_parts={vision: RUN}" [--set KEY=V ...]
"""

from __future__ import annotations

import argparse

import glimpse.families.video_llava as family
from glimpse.config import load_recipe
from glimpse.train.trainer import train

_records = family.video_records


def questions_only(data_cfg, root, split):
    return [r for r in _records(data_cfg, root, split)
            if not any(m["content"].startswith("<image>\n") and m["content"].rstrip().endswith(
                ("video.", "clip?", "briefly.", "video?")) for m in r["messages"][:1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    family.video_records = questions_only
    train(load_recipe("shapes-video-llava", a.set), a.out)


if __name__ == "__main__":
    main()
