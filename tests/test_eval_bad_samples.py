"""A bad image in an evaluation split is skipped and counted, as in training: the run's final evaluation
and `glimpse eval` finish, report `split/skipped`, and say how many samples each figure was computed over."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_overrides
from test_fusion import tiny_overrides as fusion_overrides

from glimpse.cli import main
from glimpse.config import load_recipe
from glimpse.train.trainer import train


@pytest.fixture(scope="module")
def damaged(world, tmp_path_factory):
    """The session's world with its first test image (a VQA, caption and zero-shot image) corrupt."""
    copy = tmp_path_factory.mktemp("damaged") / "shapes"
    shutil.copytree(world, copy)
    (copy / "images" / "test" / "test_000000.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return copy


def evaluate(run, world, tmp_path, *extra) -> dict:
    out = tmp_path / "eval.json"
    main(["--quiet", "eval", str(run), "--set", f"data.root={world}", "--split", "test", "--json", str(out), *extra])
    return json.loads(out.read_text())


def test_dual_encoder_training_and_eval_skip_a_bad_test_image(damaged, tiny_run, tmp_path, capsys):
    recipe = load_recipe("shapes-clip", tiny_overrides(damaged, **{"train.max_steps": 2, "eval.splits": "[test]"}))
    figures = train(recipe, tmp_path / "run", progress=False)  # the final evaluation no longer fails
    assert figures["test/skipped"] == 1 and figures["test/n"] == 39
    assert 0 < figures["test/zeroshot_n"] < 39 and "test/t2i_r1" in figures
    again = evaluate(tiny_run, damaged, tmp_path)
    assert again["test/skipped"] == 1 and again["test/n"] == 39
    printed = capsys.readouterr().out
    assert ["test/skipped", "1"] in [line.split() for line in printed.splitlines()]


def test_vlm_eval_skips_a_bad_test_image(damaged, tiny_vlm_run, tmp_path):
    figures = evaluate(tiny_vlm_run, damaged, tmp_path, "--set", "eval.vqa_limit=8")
    # the first questions are about the first test image: those are skipped, the rest scored
    assert figures["test/skipped"] == 1
    assert 0 < figures["test/vqa_n"] < 8 and figures["test/caption_n"] == 1 and "test/vqa_acc" in figures


def test_fusion_eval_skips_a_bad_test_image(damaged, tmp_path):
    run = tmp_path / "fusion"
    figures = train(load_recipe("shapes-fusion-pretrain", fusion_overrides(damaged, **{"train.max_steps": 1})), run,
                    progress=False)
    assert figures["test/skipped"] == 1 and figures["test/n"] == 39 and "test/t2i_r1_rerank" in figures
