"""The README's Python examples run as written, in a folder where tiny runs stand in for the runs they
name (runs/shapes-clip, runs/shapes-lm, runs/shapes-llava-stage2) and test images for a.png and b.png;
the OpenAI-client example talks to a live `glimpse serve` app."""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import ROOT, LiveServer
from test_lm import lm_overrides

import glimpse
from glimpse.config import load_recipe
from glimpse.serve import create_app
from glimpse.train.trainer import train

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
SERVER = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def readme_dir(tiny_run, tiny_vlm_run, world, tmp_path_factory):
    here = tmp_path_factory.mktemp("readme")
    lm = lm_overrides(world, **{"train.eval_every": 0, "eval.splits": "[]"})
    train(load_recipe("shapes-lm", lm), here / "runs" / "shapes-lm", progress=False)
    shutil.copytree(tiny_run, here / "runs" / "shapes-clip")
    shutil.copytree(tiny_vlm_run, here / "runs" / "shapes-llava-stage2")
    for name, i in (("a.png", 0), ("b.png", 1)):
        shutil.copy(world / "images" / "test" / f"test_{i:06d}.png", here / name)
    return here


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2 and any("glimpse.load" in b for b in BLOCKS) and any("OpenAI(" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, readme_dir, monkeypatch, capsys):
    monkeypatch.chdir(readme_dir)
    code = BLOCKS[index]
    if SERVER in code:  # the client example: against the README's demo LLaVA, served on a free port
        app = create_app(glimpse.load(readme_dir / "runs" / "shapes-llava-stage2"), "shapes-llava-stage2")
        with LiveServer(app) as server:
            exec(compile(code.replace(SERVER, server.url), "README.md", "exec"), {})
    else:
        exec(compile(code, "README.md", "exec"), {})
    if "print(" in code:
        assert capsys.readouterr().out.strip()  # the example printed what the model said
