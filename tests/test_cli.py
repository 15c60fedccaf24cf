"""The command line as a user meets it: real subprocesses, bad input gets one line and a non-zero exit."""

import subprocess

import pytest
from conftest import PY, ROOT


def run(args, env, ok=True):
    r = subprocess.run([PY, "-m", "glimpse", "--quiet", *args], env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def assert_one_line_error(r, fragment):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("glimpse: error:"), r.stderr
    assert fragment in lines[0], lines[0]


def test_data_shapes_writes_every_format(tmp_path, cli_env):
    out = tmp_path / "w"
    run(["data", "shapes", "--out", str(out), "--train", "20", "--val", "4", "--test", "6", "--image-size", "32",
         "--shards"], cli_env)
    for rel in ("world.json", "tokenizer.json", "train.csv", "labels/classes.txt", "annotations/captions_test.json",
                "annotations/llava_train.json", "annotations/vqa_questions_val.json", "shards/train-000000.tar"):
        assert (out / rel).is_file(), rel


def test_index_build_and_search_by_text_and_image(tiny_run, world, tmp_path, cli_env):
    images = tmp_path / "imgs"
    images.mkdir()
    for p in sorted((world / "images" / "test").glob("*.png"))[:12]:
        (images / p.name).write_bytes(p.read_bytes())
    (images / "notes.png").write_text("not an image at all")
    (images / "cut.png").write_bytes((world / "images" / "test" / "test_000000.png").read_bytes()[:100])
    r = run(["index", "build", str(tiny_run), str(images), "--out", str(tmp_path / "idx")], cli_env)
    assert "indexed 12 images" in r.stdout and "skipped 2 bad files" in r.stdout
    r = run(["search", str(tmp_path / "idx"), "a small red circle", "--k", "3"], cli_env)
    rows = r.stdout.strip().splitlines()
    assert len(rows) == 3 and all(row.split()[2].endswith(".png") for row in rows)
    scores = [float(row.split()[1]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    query = images / "test_000003.png"
    r = run(["search", str(tmp_path / "idx"), "--image", str(query), "--k", "1"], cli_env)
    assert r.stdout.split()[2].endswith("test_000003.png")  # an image finds itself first


def test_eval_writes_flat_json(tiny_run, tmp_path, cli_env):
    out = tmp_path / "e.json"
    run(["eval", str(tiny_run), "--split", "test_novel", "--json", str(out)], cli_env)
    import json

    figures = json.loads(out.read_text())
    assert "test_novel/t2i_r1" in figures and "test_novel/zeroshot_acc" in figures


@pytest.mark.parametrize("args, fragment", [
    (["train", "shapes-clip", "--set", "train.lrr=1"], "valid keys in train"),
    (["train", "no-such-recipe"], "no recipe 'no-such-recipe'"),
    (["eval", "/nonexistent/run"], "no such run"),
    (["search", "/nonexistent/index", "red"], "not an image index"),
    (["index", "build", "/nonexistent/run", "/nonexistent/dir", "--out", "x"], "no such image folder"),
])
def test_bad_input_is_one_clear_line(args, fragment, cli_env, tmp_path):
    assert_one_line_error(run(args, cli_env, ok=False), fragment)


def test_broken_checkpoint_empty_folder_and_reused_out(tiny_run, tmp_path, cli_env):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    weights = broken / "checkpoints" / "step_0000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_line_error(run(["eval", str(broken)], cli_env, ok=False), "broken checkpoint")

    images = tmp_path / "empty"
    images.mkdir()
    r = run(["index", "build", str(tiny_run), str(images), "--out", str(tmp_path / "i")], cli_env, ok=False)
    assert_one_line_error(r, "no images")
    r = run(["train", "shapes-clip", "--out", str(tiny_run)], cli_env, ok=False)
    assert_one_line_error(r, "already holds a run")


def test_demo_writes_a_self_contained_report(world, tmp_path, cli_env):
    from conftest import tiny_overrides

    out = tmp_path / "demo"
    sets = tiny_overrides(world, **{"train.max_steps": 4, "train.eval_every": 2})
    sets += ["lm.model.width=32", "lm.model.layers=2", "lm.model.heads=2", "lm.model.kv_heads=1"]
    for stage in ("lm", "stage1", "stage2"):  # the LLaVA part, as tiny
        sets += [f"{stage}.train.max_steps=2", f"{stage}.train.save_every=2", f"{stage}.train.batch_size=8"]
    sets += ["stage2.eval.vqa_limit=8", "stage2.eval.batch_size=16", "stage2.eval.max_new_tokens=4"]
    r = run(["demo", "--out", str(out)] + [x for s in sets for x in ("--set", s)], cli_env)
    assert "test/t2i_r1" in r.stdout and "example searches" in r.stdout
    assert "test/vqa_acc" in r.stdout and r.stdout.count("(annotators: ") == 6
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 * 5 + 1  # every search hit and the loss curve inline
    assert "src=\"http" not in page and "src='http" not in page  # nothing fetched from elsewhere
    assert "test_novel/t2i_r1" in page and "LLaVA: questions about test images" in page
    assert "test/vqa_acc" in page and page.count("annotators: ") == 6
    assert page.count("where it looked</figcaption>") >= 6  # each search's top image explained (glimpse.explain)
    # experiments/demo_llava_ablation.py retrains the LLaVA stages on this demo's tower and LM, with a change
    tiny = [f"{stage}.{k}" for stage in ("stage1", "stage2") for k in
            ("train.max_steps=2", "train.save_every=2", "train.batch_size=8", "train.warmup_steps=1")]
    tiny += ["stage2.eval.vqa_limit=8", "stage2.eval.batch_size=16", "stage2.eval.max_new_tokens=4"]
    r = subprocess.run([PY, str(ROOT / "experiments" / "demo_llava_ablation.py"), str(out), str(tmp_path / "abl"),
                        "--lm", "untrained", "--describe-repeat", "2", "--quiet"]
                       + [x for s in tiny for x in ("--set", s)], env=cli_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test/vqa_acc" in r.stdout and "VQA accuracy by question type" in r.stdout
    assert "where is the" in r.stdout and "another object's position" in r.stdout
    # experiments/where_probe.py: a one-attention probe on the demo LLaVA's tower features
    r = subprocess.run([PY, str(ROOT / "experiments" / "where_probe.py"), str(out / "shapes-llava-stage2"),
                        "--steps", "1", "3"], env=cli_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("test accuracy") == 2 and "on scenes of 2-3 objects" in r.stdout
    # a second demo replaces the first; a folder that is not a demo's is never touched
    run(["demo", "--out", str(out)] + [x for s in sets for x in ("--set", s)], cli_env)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    bad = run(["demo", "--out", str(other)], cli_env, ok=False)
    assert_one_line_error(bad, "not a glimpse demo folder")
    assert (other / "precious.txt").read_text() == "keep me"


def test_broken_or_mismatched_index_is_a_clear_error(tiny_run, world, tmp_path, cli_env):
    import json

    images = tmp_path / "imgs"
    images.mkdir()
    for p in sorted((world / "images" / "test").glob("*.png"))[:4]:
        (images / p.name).write_bytes(p.read_bytes())
    idx = tmp_path / "idx"
    run(["index", "build", str(tiny_run), str(images), "--out", str(idx)], cli_env)
    assert_one_line_error(run(["search", str(idx), "red", "--k", "0"], cli_env, ok=False), "--k must be at least 1")
    paths = json.loads((idx / "paths.json").read_text())
    (idx / "paths.json").write_text(json.dumps(paths[:2]))
    assert_one_line_error(run(["search", str(idx), "red"], cli_env, ok=False), "4 vectors but 2 paths")
    (idx / "paths.json").write_text(json.dumps(paths))
    (idx / "meta.json").write_text("{}")
    assert_one_line_error(run(["search", str(idx), "red"], cli_env, ok=False), "names no run")


def test_data_shapes_is_byte_identical_for_a_seed(tmp_path, cli_env):
    import hashlib

    def digest(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    args = ["data", "shapes", "--train", "12", "--val", "3", "--test", "4", "--image-size", "32", "--shards"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        run([*args, "--seed", seed, "--out", str(tmp_path / name)], cli_env)
    a, b, c = (digest(tmp_path / n) for n in "abc")
    assert "tokenizer.json" in a and a == b  # everything, the trained tokenizer included
    assert a != c
