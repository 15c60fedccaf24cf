"""`glimpse demo recsys`: the shapes shop, a small dual encoder as the item tower, the two-tower recommender
on it and BPR-MF beside it, with a report that shows a few users' histories and recommendations as
pictures, cold items marked."""

from __future__ import annotations

import html
import time
from pathlib import Path

from glimpse.config import load_recipe
from glimpse.demo import _finish, _img_tag, _start

N_USERS = 6  # test users the report shows
FIGURES = [("recall@20", "Recall@20, all test items"), ("recall@20_warm", "Recall@20, warm items"),
           ("recall@20_cold", "Recall@20, cold items"), ("ndcg@20_warm", "NDCG@20, warm items")]


def run_recsys_demo(out: str | Path = "runs/demo-recsys", progress: bool = True,
                    overrides: list[str] | None = None) -> dict:
    """Train shapes-clip-demo (the item tower), shapes-shop-demo on it and shapes-shop-bpr at demo length,
    evaluate, and write report.html.  `--set KEY=V` goes to the recommender, `--set clip.KEY=V` to the tower,
    `--set bpr.KEY=V` to BPR-MF."""
    from glimpse.api import load
    from glimpse.train.trainer import train

    t0, out, gflops = _start(out)
    sets: dict[str, list[str]] = {"clip": [], "bpr": [], "shop": []}
    for item in overrides or []:
        head, _, rest = item.partition(".")
        sets[head].append(rest) if head in ("clip", "bpr") and rest else sets["shop"].append(item)
    train(load_recipe("shapes-clip-demo", sets["clip"] + ["eval.splits=[]", "eval.during_train=[]"]),
          out / "clip", progress=progress)
    print(f"[1/3] trained the item tower ({time.time() - t0:.0f} s)")
    shop = load_recipe("shapes-shop-demo", sets["shop"])
    shop.init_parts, shop.tokenizer = {"item_encoder": str(out / "clip")}, str(out / "clip")
    results = train(shop, out / "recommender", progress=progress)
    print(f"[2/3] trained the two-tower recommender ({time.time() - t0:.0f} s)")
    bpr = load_recipe("shapes-shop-bpr", ["train.max_steps=1000", "train.eval_every=0", "eval.during_train=[]",
                                          *sets["bpr"]])
    bpr.data = shop.data
    bpr_results = train(bpr, out / "bpr", progress=progress)
    print(f"[3/3] trained BPR-MF ({time.time() - t0:.0f} s)\n")

    rows = [("two-tower (glimpse towers + SASRec)", ""), ("same, histories shuffled", "shuffled_"),
            ("popularity", "popularity_"), ("oracle (hidden tastes)", "oracle_")]
    table = [(name, [results.get(f"test/{p}{k}") for k, _ in FIGURES]) for name, p in rows]
    table.insert(1, ("BPR-MF (IDs only)", [bpr_results.get(f"test/{k}") for k, _ in FIGURES]))
    print(f"{'':38s}" + "".join(f"{k:>16s}" for k, _ in FIGURES))
    for name, values in table:
        print(f"{name:38s}" + "".join(f"{v:>16.3f}" if v is not None else f"{'-':>16s}" for v in values))

    pipe = load(out / "recommender")
    catalogue = pipe.shop
    cold_users = [u for u in range(len(catalogue.user_ids)) if not catalogue.warm[catalogue.test[u][0]]]
    warm_users = [u for u in range(len(catalogue.user_ids)) if catalogue.warm[catalogue.test[u][0]]]
    users = warm_users[: N_USERS // 2] + cold_users[: N_USERS - N_USERS // 2]
    histories = [catalogue.history(u, "test") for u in users]
    ranked = pipe.recommend([[catalogue.item_ids[i] for i in h] for h in histories], k=len(catalogue.item_ids))

    def picture(i: int, extra: str = "") -> str:
        cls = "cold" if not catalogue.warm[i] else ""
        return _img_tag(catalogue.images[i], 56, f"{catalogue.item_ids[i]}: {catalogue.titles[i]}{extra}", cls)

    blocks = []
    for u, h, rec in zip(users, histories, ranked):
        target = catalogue.test[u][0]
        order = [catalogue.index[r["item"]] for r in rec]
        got = order[:10]
        hit = f"ranked {order.index(target) + 1} of {len(order)}"
        blocks.append(
            f"<div class='user'><h3>{html.escape(catalogue.user_ids[u])}</h3>"
            f"<div>history, oldest first: {''.join(picture(i) for i in h[-20:])}</div>"
            f"<div>recommended: {''.join(picture(i) for i in got)}</div>"
            f"<div>bought next: {picture(target)} <span class='note'>{hit}</span></div></div>")
    elapsed = time.time() - t0
    cells = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(
        f"<td>{v:.3f}</td>" if v is not None else "<td>-</td>" for v in values) + "</tr>" for name, values in table)
    report = out / "report.html"
    report.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>glimpse recommendation demo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 3px 12px; border-bottom: 1px solid #ddd; }}
img {{ image-rendering: pixelated; border: 2px solid #ddd; margin: 1px; vertical-align: middle; }}
img.cold {{ border-color: #d33; }} .user {{ margin: 14px 0; }} .note {{ color: #666; }} h3 {{ margin: 4px 0; }}
</style></head><body>
<h1>glimpse recommendation demo</h1>
<p>The shapes shop: {len(catalogue.item_ids)} items (pictures and titles), {len(catalogue.user_ids)} buyers whose
hidden tastes drift midway through their histories.  Items framed in red are <b>cold</b>: never bought in
training, so only their pictures and titles can place them.  Trained from scratch in {elapsed:.0f} s on a
machine whose fp32 matmul runs at {gflops:.0f} GFLOP/s.  Full ranking over every item, test split:</p>
<table><tr><th></th>{''.join(f'<th>{html.escape(t)}</th>' for _, t in FIGURES)}</tr>{cells}</table>
<h2>Users, their histories and their recommendations</h2>{''.join(blocks)}
</body></html>
""")
    summary = _finish(out, report, elapsed, gflops, results=results, bpr_results=bpr_results)
    print(f"recommend more: glimpse recommend {out / 'recommender'} --user {catalogue.user_ids[users[0]]} --k 10")
    return summary
