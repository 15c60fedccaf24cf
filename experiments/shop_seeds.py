"""The shapes-shop recipes over several seeds (world and training): mean and standard deviation of each
figure, warm and cold apart, with the popularity, shuffled-history and oracle references.

    python experiments/shop_seeds.py --out runs/shop-seeds [--seeds 0 1 2] [--runs sasrec mean bpr vbpr] \
        [--set data.users=20000 ...]

Each run is `glimpse train RECIPE --set data.seed=S --set train.seed=S`; a finished run is not trained
again.  Run from a folder that holds runs/shapes-clip (the frozen item tower).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

RUNS = {"sasrec": ("shapes-shop", []), "mean": ("shapes-shop", ["model.user=mean"]),
        "bpr": ("shapes-shop-bpr", []), "vbpr": ("shapes-shop-vbpr", [])}
FIGURES = ["recall@20", "ndcg@20", "recall@20_warm", "ndcg@20_warm", "recall@20_cold", "ndcg@20_cold",
           "shuffled_recall@20_warm", "popularity_recall@20_warm", "oracle_recall@20_warm", "oracle_ndcg@20_warm",
           "oracle_recall@20_cold", "blind_oracle_recall@20_cold"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/shop-seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every run (a bigger shop: data.users=20000)")
    a = p.parse_args()
    results: dict[str, list[dict]] = {}
    for name in a.runs:
        recipe, sets = RUNS[name]
        for seed in a.seeds:
            out = Path(a.out) / f"{name}-s{seed}"
            if not (out / "eval.json").is_file():
                cmd = [sys.executable, "-m", "glimpse", "--quiet", "train", recipe, "--out", str(out),
                       "--set", f"data.seed={seed}", "--set", f"train.seed={seed}"]
                for s in sets + a.set:
                    cmd += ["--set", s]
                print(" ".join(cmd[2:]), flush=True)
                subprocess.run(cmd, check=True)
            info = json.loads((out / "run.json").read_text())
            results.setdefault(name, []).append(json.loads((out / "eval.json").read_text()) | {
                "seconds": info["seconds"], "gflops": info["matmul_gflops"]})
    print(f"\n{'figure':28s}" + "".join(f"{n:>18s}" for n in results))
    for fig in FIGURES + ["seconds", "gflops"]:
        cells = []
        for runs in results.values():
            v = [r.get(f"test/{fig}", r.get(fig)) for r in runs]
            cells.append("-" if None in v else f"{np.mean(v):.4f} ± {np.std(v):.4f}" if fig not in ("seconds", "gflops")
                         else f"{np.mean(v):.0f}")
        print(f"{fig:28s}" + "".join(f"{c:>18s}" for c in cells))


if __name__ == "__main__":
    main()
