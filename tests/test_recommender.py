"""The shapes shop, the shop readers, the ranking metrics and the recommender family."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import schemathesis
import torch
from conftest import PY, ROOT, LiveServer, image_data_url
from hypothesis import HealthCheck, settings

from glimpse.errors import GlimpseError


@pytest.fixture(scope="session")
def shop_world(tmp_path_factory):
    from glimpse.data.shapes_shop import generate_shapes_shop

    out = tmp_path_factory.mktemp("shop") / "shop"
    generate_shapes_shop(out, seed=0, n_users=120, n_items=260, image_size=32, progress=False)
    return out


def tiny_shop_overrides(root, recipe_has_towers: bool = True, **extra) -> list[str]:
    base = {"data.root": str(root), "data.users": 120, "data.items": 260, "data.image_size": 32, "tokenizer": "null",
            "train.batch_size": 16, "train.max_steps": 6, "train.warmup_steps": 1, "train.log_every": 1,
            "train.save_every": 3, "train.eval_every": 0, "eval.batch_size": 32, "model.dim": 16}
    if recipe_has_towers:
        base |= {"init_parts": "{}", "model.item_encoder.embed_dim": 16, "model.item_encoder.vision.image_size": 32,
                 "model.item_encoder.vision.width": 32, "model.item_encoder.vision.layers": 1,
                 "model.item_encoder.text.width": 32, "model.item_encoder.text.layers": 1}
    base |= extra
    return [f"{k}={v}" for k, v in base.items()]


# -- metrics -------------------------------------------------------------------------------------------

def test_ranking_metrics_match_hand_computed_cases():
    from glimpse.metrics.ranking import ndcg_at_k, recall_at_k, target_ranks

    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3],
                           [0.2, 0.2, 0.2, 0.2, 0.9]])
    # user 0: item 0 (bought) is left out; target 2 is then behind item 3 only -> rank 1, no ties
    # user 1: target 1 ties with items 0, 2, 3 after item 4: it could take places 1, 2, 3 or 4
    ranks = target_ranks(scores, [[0], []], [[2], [1]])
    assert ranks == [[(1, 0)], [(1, 3)]]
    assert recall_at_k([(1, 0)], 1, 1) == 0.0 and recall_at_k([(1, 0)], 1, 2) == 1.0
    assert ndcg_at_k([(1, 0)], 1, 10) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k([0], 1, 10) == 1.0
    # the tie: places 1..4 equally likely; K = 3 holds places 1 and 2 -> recall 1/2
    assert recall_at_k([(1, 3)], 1, 3) == pytest.approx(0.5)
    assert ndcg_at_k([(1, 3)], 1, 3) == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 4)
    # every item alike: chance, K / N
    flat = target_ranks(torch.zeros(1, 10), [[]], [[4]])
    assert recall_at_k(flat[0], 1, 2) == pytest.approx(0.2)
    # two relevant items at ranks 0 and 3, K = 2: one hit of two; DCG 1, ideal 1 + 1/log2(3)
    assert recall_at_k([0, 3], 2, 2) == 0.5
    assert ndcg_at_k([0, 3], 2, 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert ndcg_at_k([0, 3], 2, 5) == pytest.approx((1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    # a repeat purchase stays rankable although it is in the history; a NaN score ranks last
    assert target_ranks(torch.tensor([[0.1, 0.9]]), [[1]], [[1]]) == [[(0, 0)]]
    assert target_ranks(torch.tensor([[0.1, float("nan"), 0.3]]), [[]], [[1]]) == [[(2, 0)]]


# -- the world and its files -------------------------------------------------------------------------

def test_shapes_shop_is_deterministic_with_cold_items_only_after_training(shop_world, tmp_path):
    from glimpse.data.shapes_shop import generate_shapes_shop
    from glimpse.data.shop import read_mmrec, read_recbole

    again = tmp_path / "again"
    generate_shapes_shop(again, seed=0, n_users=120, n_items=260, image_size=32, progress=False)
    for name in ("shop.inter", "shop.item", "truth.json", "mmrec/shop.inter", "images/items/i00007.png"):
        assert (again / name).read_bytes() == (shop_world / name).read_bytes(), name

    shop = read_recbole(shop_world / "shop.inter", shop_world / "shop.item")
    truth = json.loads((shop_world / "truth.json").read_text())
    cold = {i for i, it in enumerate(truth["items"]) if it["cold"]}
    assert len(cold) == 52  # a fifth of the items
    assert not cold & {i for h in shop.train for i in h}  # never bought in training
    assert cold & {t for ts in shop.test for t in ts}  # but bought in test
    assert all(not shop.warm[i] for i in cold)
    assert len(shop.user_ids) == 120 and all(len(h) >= 3 for h in shop.train)  # histories of 5..50
    assert shop.titles[0].split()[1] == truth["items"][0]["colour"]
    mm = read_mmrec(shop_world / "mmrec" / "shop.inter", shop_world / "shop.item")
    assert mm.train == shop.train and mm.val == shop.val and mm.test == shop.test


def test_shop_readers_refuse_bad_files_in_one_line(shop_world, tmp_path):
    from glimpse.data.shop import read_amazon, read_recbole

    bad = tmp_path / "bad.inter"
    bad.write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti00001\n")
    with pytest.raises(GlimpseError, match="2 fields, the header has 3"):
        read_recbole(bad, shop_world / "shop.item")
    bad.write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\tnope\t1\nu1\ti00001\t2\nu1\ti00002\t3\n")
    with pytest.raises(GlimpseError, match="'nope' is not in the item file"):
        read_recbole(bad, shop_world / "shop.item")
    reviews, meta = tmp_path / "r.jsonl", tmp_path / "m.jsonl"
    meta.write_text('{"parent_asin": "A", "title": "x"}\n')
    reviews.write_text('{"user_id": "u", "parent_asin": "A", "timestamp": 1}\n{not json\n')
    with pytest.raises(GlimpseError, match=r"r.jsonl:2: not JSON"):
        read_amazon(reviews, meta)


def test_amazon_reviews_jsonl_reads_into_a_leave_last_out_shop(shop_world, tmp_path):
    from glimpse.data.shop import read_amazon

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(shop_world / "images" / "items" / "i00000.png", images / "B01.png")
    (tmp_path / "local.png").write_bytes((shop_world / "images" / "items" / "i00001.png").read_bytes())
    meta = tmp_path / "meta_Toys.jsonl"
    meta.write_text("\n".join(json.dumps(m) for m in [
        {"parent_asin": "B01", "title": "red circle sticker", "images": [{"large": "https://example.com/x.jpg"}]},
        {"parent_asin": "B02", "title": "blue square magnet", "images": [{"large": "local.png"}]},
        {"parent_asin": "B03", "title": "green cross badge", "images": []},
        {"parent_asin": "B04", "title": "never reviewed"}]) + "\n")
    reviews = tmp_path / "Toys.jsonl"
    rows = [("u1", "B01", 3), ("u1", "B02", 1), ("u1", "B03", 2), ("u1", "B01", 4),  # out of order in the file
            ("u2", "B02", 1), ("u2", "B03", 2),  # two purchases: left out
            ("u3", "B01", 1), ("u3", "B03", 2), ("u3", "B02", 3), ("u3", "Bxx", 4)]  # Bxx: no metadata, skipped
    reviews.write_text("".join(json.dumps({"user_id": u, "parent_asin": a, "timestamp": t, "rating": 5.0,
                                           "text": "ok"}) + "\n" for u, a, t in rows))
    shop = read_amazon(reviews, meta, images)
    assert shop.user_ids == ["u1", "u3"]
    assert [shop.item_ids[i] for i in shop.train[0]] == ["B02", "B03"]
    assert [shop.item_ids[i] for i in shop.val[0] + shop.test[0]] == ["B01", "B01"]
    assert shop.images[0] == str(images / "B01.png") and shop.images[1] == str(tmp_path / "local.png")
    assert shop.images[2] is None and shop.warm.tolist() == [True, True, True, False]


# -- the parts -------------------------------------------------------------------------------------------

def test_sasrec_states_are_causal_and_the_mean_is_order_blind():
    from glimpse.models.sequential import SequenceEncoder

    torch.manual_seed(0)
    table = torch.randn(10, 8)
    sas = SequenceEncoder(8, "sasrec", layers=1, heads=2, max_len=6, dropout=0.0).eval()
    h = torch.tensor([[-1, -1, 3, 4, 5, 6]])
    changed = torch.tensor([[-1, -1, 3, 4, 5, 9]])
    a, b = sas(h, table), sas(changed, table)
    assert torch.allclose(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5], b[:, 5])
    assert not torch.allclose(sas(torch.tensor([[-1, -1, 6, 5, 4, 3]]), table)[:, -1], a[:, -1])  # order matters
    mean = SequenceEncoder(8, "mean", max_len=6).eval()
    assert torch.allclose(mean(h, table)[:, -1], mean(torch.tensor([[-1, -1, 6, 5, 4, 3]]), table)[:, -1], atol=1e-6)


def test_target_share_keeps_only_each_history_s_newest_targets():
    from glimpse.families.recommender.data import HistoryCollate

    samples = [{"items": [1, 2, 3, 4, 5]}, {"items": [7, 8, 9, 10, 11, 12, 13]}, {"items": [20, 21]}]
    full = HistoryCollate(6)(samples)
    assert full["targets"].tolist() == [[-1, -1, 2, 3, 4, 5], [8, 9, 10, 11, 12, 13], [-1, -1, -1, -1, -1, 21]]
    half = HistoryCollate(6, target_share=0.5)(samples)
    assert torch.equal(half["inputs"], full["inputs"])
    # 4 targets -> the newest 2; 6 -> 3; 1 -> still 1 (every history keeps one)
    assert half["targets"].tolist() == [[-1, -1, -1, -1, 4, 5], [-1, -1, -1, 11, 12, 13], [-1, -1, -1, -1, -1, 21]]


# -- the family end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shop_run(shop_world, tmp_path_factory):
    """A tiny two-tower run on a copy of the shop with one broken item picture (shared, read-only)."""
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    world = tmp_path_factory.mktemp("shop-bad") / "shop"
    shutil.copytree(shop_world, world)
    (world / "images" / "items" / "i00003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # read from its title
    out = tmp_path_factory.mktemp("runs") / "shop"
    train(load_recipe("shapes-shop", tiny_shop_overrides(world)), out, progress=True)
    return out


def test_two_tower_trains_evaluates_and_recommends(shop_run, capfd):
    import glimpse

    out, world = shop_run, None
    res = json.loads((out / "eval.json").read_text())
    for key in ("recall@20", "ndcg@10_warm", "recall@20_cold", "shuffled_recall@20", "popularity_ndcg@20",
                "oracle_recall@20_cold"):
        assert 0.0 <= res[f"test/{key}"] <= 1.0, key
    assert res["test/n"] == 120 and res["test/n_warm"] + res["test/n_cold"] == 120
    assert res["test/oracle_recall@20"] > res["test/chance_recall@20"]

    pipe = glimpse.load(out)
    recs = pipe.recommend([["i00001", "i00002"], [3, 5, 7]], k=5)
    assert [len(r) for r in recs] == [5, 5]
    assert pipe._shop is None  # histories of item ids need only the run's own catalogue (items.json)
    assert json.loads((out / "items.json").read_text())["item_ids"][:2] == ["i00000", "i00001"]
    assert not {"i00001", "i00002"} & {r["item"] for r in recs[0]}  # bought already: left out
    by_user = pipe.recommend_users(["u00004"], k=4)[0]
    scores = [r["score"] for r in by_user]
    assert scores == sorted(scores, reverse=True) and all("cold" in r and "title" in r for r in by_user)
    world = Path(pipe.shop.images[10]).parent
    picture = world / "i00010.png"
    new = pipe.recommend([["i00001", {"image": str(picture), "title": "small red circle sticker"}]], k=3)[0]
    assert len(new) == 3
    with pytest.raises(GlimpseError, match="no item 'nope'"):
        pipe.recommend([["nope"]])
    pytest.importorskip("faiss")
    exact = pipe.recommend([["i00001", "i00002"]], k=10)[0]
    approx = pipe.recommend([["i00001", "i00002"]], k=10, search="faiss")[0]
    assert [r["item"] for r in approx] == [r["item"] for r in exact]


@pytest.mark.parametrize("recipe", ["shapes-shop-bpr", "shapes-shop-vbpr"])
def test_bpr_and_vbpr_train_and_score_cold_items(shop_world, tmp_path, recipe):
    import glimpse
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    out = tmp_path / "run"
    train(load_recipe(recipe, tiny_shop_overrides(shop_world, recipe_has_towers=recipe.endswith("vbpr"))), out,
          progress=False)
    res = json.loads((out / "eval.json").read_text())
    assert 0.0 <= res["test/recall@20_cold"] <= 1.0 and "test/shuffled_recall@20" not in res
    pipe = glimpse.load(out)
    scores = pipe.model.score_users(torch.tensor([0, 1]))
    cold = ~pipe.model.warm
    spread = scores[:, cold].std(dim=1)
    if recipe == "shapes-shop-bpr":  # ID only: every cold item scores alike
        assert torch.all(spread == 0)
    else:  # VBPR's pictures tell cold items apart
        assert torch.all(spread > 0)
    with pytest.raises(GlimpseError, match="has no item or user tower"):
        pipe.recommend([["i00001"]])
    assert len(pipe.recommend_users([0], k=3)[0]) == 3


def test_recommend_command(shop_run, cli_env):
    out = shop_run
    run = [PY, "-m", "glimpse", "recommend", str(out)]
    r = subprocess.run(run + ["--user", "u00002", "--k", "3"], capture_output=True, text=True, env=cli_env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "1"
    r = subprocess.run(run + ["--history", "i00001,i00002", "--k", "2", "--json"], capture_output=True, text=True,
                       env=cli_env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 2
    for args, msg in ((["--history", "i00001,zz"], "no item 'zz'"), ([], "give one of --user"),
                      (["--user", "nobody"], "no user 'nobody'")):
        r = subprocess.run(run + args, capture_output=True, text=True, env=cli_env, cwd=ROOT)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_serve_recommendations(shop_run, shop_world):
    import httpx

    import glimpse
    from glimpse.serve import create_app

    pipe = glimpse.load(shop_run)
    picture = image_data_url(shop_world / "images" / "items" / "i00011.png")
    with LiveServer(create_app(pipe, "shop")) as s:
        url = s.url + "/v1/recommendations"
        r = httpx.post(url, json={"model": "shop", "history": ["i00001", "i00002"], "k": 5})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["rank"] for d in data] == [1, 2, 3, 4, 5]
        assert [d["item"] for d in data] == [x["item"] for x in pipe.recommend([["i00001", "i00002"]], k=5)[0]]
        r = httpx.post(url, json={"model": "shop", "history": ["i00001", picture], "k": 3})
        assert r.status_code == 200 and len(r.json()["data"]) == 3, r.text
        assert httpx.post(url, json={"model": "shop", "user": "u00001"}).status_code == 200
        for body, status, msg in (
                ({"model": "shop", "history": ["zz"]}, 400, "no item 'zz'"),
                ({"model": "shop", "history": ["data:image/png;base64,AAAA"]}, 400, "image"),
                ({"model": "shop"}, 400, "give one of history"),
                ({"model": "shop", "history": ["i00001"], "k": 0}, 400, ""),
                ({"model": "shop", "user": "nobody"}, 400, "no user"),
                ({"model": "other", "user": "u00001"}, 404, "does not exist")):
            r = httpx.post(url, json=body)
            assert r.status_code == status and msg in r.json()["error"]["message"], (body, r.text)


def test_demo_recsys_writes_a_report(world, shop_world, tmp_path, capsys):
    from conftest import tiny_overrides

    from glimpse.cli import main

    clip = tiny_overrides(world, **{"train.max_steps": 2, "eval.splits": "[]", "eval.during_train": "[]"})
    tower = {"model.item_encoder.vision.layers": 2, "model.item_encoder.text.layers": 2,
             "model.item_encoder.vision.patch_size": 8}
    shop = [o for o in tiny_shop_overrides(shop_world, **tower) if not o.startswith(("init_parts", "tokenizer"))]
    bpr = ["train.max_steps=3", "train.batch_size=64"]
    main(["--quiet", "demo", "recsys", "--out", str(tmp_path / "demo"), *[f"--set=clip.{o}" for o in clip],
          *[f"--set={o}" for o in shop], *[f"--set=bpr.{o}" for o in bpr]])
    out = capsys.readouterr().out
    assert "BPR-MF" in out and "oracle" in out and "GFLOP/s" in out and "glimpse recommend" in out
    report = (tmp_path / "demo" / "report.html").read_text()
    assert report.count("<div class='user'>") == 6 and "class=\"cold\"" in report and "src=\"http" not in report


def test_the_item_tower_can_train_with_the_recommender(shop_world, tmp_path):
    from safetensors.torch import load_file

    import glimpse
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    out = tmp_path / "run"
    recipe = load_recipe("shapes-shop", tiny_shop_overrides(shop_world, **{"freeze": "[]", "train.max_steps": 3,
                                                                          "train.save_every": 1}))
    train(recipe, out, progress=False)
    pipe = glimpse.load(out)
    step2, step3 = (load_file(out / "checkpoints" / f"step_{s:07d}" / "model.safetensors") for s in (2, 3))
    for name in ("item_encoder.visual_projection.weight", "item_encoder.text_projection.weight"):
        assert not torch.equal(step2[name], step3[name]), name  # the towers moved in the last step
    # the cached features are the trained tower's (recomputed after the last step)
    from glimpse.families.recommender.data import ItemInputs, content_features

    items = ItemInputs(pipe.shop, pipe.tokenizer, pipe.transform, 10**7, recipe.model.item_encoder.text.context_length)
    assert torch.allclose(content_features(pipe.model, items, torch.device("cpu")), pipe.model.features, atol=1e-5)


def test_the_cold_offset_is_the_validation_maximum_likelihood(shop_run):
    import glimpse
    from glimpse.families.recommender.evaluate import model_scores

    pipe = glimpse.load(shop_run)
    model, shop = pipe.model, pipe.shop
    fitted = float(model.cold_offset)
    users = list(range(len(shop.user_ids)))
    with torch.no_grad():
        model.cold_offset.zero_()
        base = model_scores(model, shop, users, "val")
    for u in users:
        base[u, shop.train[u]] = float("-inf")
    targets = torch.tensor([shop.val[u][0] for u in users])
    no_id = (~model.warm).float()

    def nll(delta):
        s = base + delta * no_id
        return float(-(s[torch.arange(len(users)), targets] - s.logsumexp(1)).sum())

    assert -2.0 <= fitted <= 4.0
    assert nll(fitted) <= min(nll(fitted - 0.1), nll(fitted + 0.1)) + 1e-3


@pytest.fixture(scope="module")
def shop_api_schema(shop_run):
    import glimpse
    from glimpse.serve import create_app

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(glimpse.load(shop_run), "shop"))
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                           schemathesis.GenerationMode.NEGATIVE], deterministic=True)
    return schema.include(path="/v1/recommendations")


shop_schema = schemathesis.pytest.from_fixture("shop_api_schema")


@shop_schema.parametrize()
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzzed_recommendation_requests_get_no_5xx(case):
    response = case.call()
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
