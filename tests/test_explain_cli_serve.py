"""Explanations from the command line (`glimpse explain`, `glimpse eval --explain`) and the server
(`POST /v1/explain`), with one-line errors and 4xx answers for bad input.  The library's explanations are
tested in test_explain_use.py."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess

import httpx
import pytest
from conftest import PY, LiveServer, image_data_url
from PIL import Image

from glimpse.explain import METHODS


@pytest.fixture(scope="module")
def image(world):
    return world / "images" / "test" / "test_000000.png"


# -- 9. the command line ----------------------------------------------------------------------------------
def cli(args, env):
    return subprocess.run([PY, "-m", "glimpse", "--quiet", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def cli_in_process(args, capsys, monkeypatch, tmp_path):
    """`glimpse ARGS` in this process (faster than a subprocess for the errors): (exit code, stdout, stderr)."""
    from glimpse.cli import main

    monkeypatch.setenv("GLIMPSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GLIMPSE_DEBUG", raising=False)
    capsys.readouterr()
    code = 0
    try:
        main(["--quiet", *args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, fragment):
    assert code not in (0, None)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("glimpse: error:"), err
    assert fragment in lines[0] and "Traceback" not in err


def test_cli_explain_writes_a_heatmap_and_prints_the_target(tiny_run, image, tmp_path, cli_env):
    out = tmp_path / "heat.png"
    r = cli(["explain", str(tiny_run), str(image), "--text", "a red circle", "--out", str(out)], cli_env)
    assert r.returncode == 0, r.stderr
    assert "chefer: similarity to 'a red circle'" in r.stdout and f"heatmap written to {out}" in r.stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width >= 256 and im.height >= 256


def test_cli_explain_json_for_both_kinds_of_run(tiny_run, tiny_vlm_run, image, tmp_path, cli_env):
    r = cli(["explain", str(tiny_run), str(image), "--text", "a red circle", "--method", "rollout", "--json",
             "--out", str(tmp_path / "a.png")], cli_env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["method"] == "rollout" and d["target"] == "similarity to 'a red circle'"
    assert len(d["grid"]) == 4 and all(len(row) == 4 for row in d["grid"])
    assert [t["token"] for t in d["tokens"]] == ["<bos>", "a", "red", "circle", "<eos>"]
    r = cli(["explain", str(tiny_vlm_run), str(image), "--question", "what colour is the circle?", "--answer", "red",
             "--method", "gradcam", "--json", "--out", str(tmp_path / "b.png")], cli_env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["target"] == "answer 'red'" and [w["word"] for w in d["words"]] == ["red"]
    assert len(d["words"][0]["grid"]) == 4 and (tmp_path / "b.png").is_file()


def test_cli_explain_a_vlm_answer_it_generates(tiny_vlm_run, image, tmp_path, capsys, monkeypatch):
    code, out, err = cli_in_process(["explain", str(tiny_vlm_run), str(image), "--question", "what colour is it?",
                                     "--method", "raw", "--out", str(tmp_path / "v.png")], capsys, monkeypatch,
                                    tmp_path)
    assert code == 0, err
    assert out.startswith("raw: answer '") and (tmp_path / "v.png").is_file()


def test_cli_explain_errors_are_one_line(tiny_run, tiny_vlm_run, image, tmp_path, capsys, monkeypatch):
    def run(*args):
        return cli_in_process(["explain", *map(str, args), "--out", str(tmp_path / "x.png")], capsys, monkeypatch,
                              tmp_path)

    one_line_error(*run(tiny_run, image)[::2], "--text")
    one_line_error(*run(tiny_vlm_run, image)[::2], "--question")
    one_line_error(*run(tiny_run, tmp_path / "missing.png", "--text", "a red circle")[::2], "missing.png")
    assert not (tmp_path / "x.png").exists()
    code, _, err = run(tiny_run, image, "--text", "a red circle", "--method", "nonsense")
    one_line_error(code, err, "nonsense")


def test_cli_explain_unknown_method_is_one_line(tiny_run, image, tmp_path, capsys, monkeypatch):
    code, _, err = cli_in_process(["explain", str(tiny_run), str(image), "--text", "a red circle", "--method",
                                   "nonsense"], capsys, monkeypatch, tmp_path)
    one_line_error(code, err, "nonsense")


def test_cli_eval_explain(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.json"
    code, stdout, err = cli_in_process(["eval", str(tiny_run), "--explain", "--n", "3", "--methods", "raw,chefer",
                                        "--json", str(out)], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    figures = json.loads(out.read_text())
    for key in ("explain/raw/pointing", "explain/chefer/energy", "explain/chefer/deletion_auc",
                "explain/random/pointing", "explain/n"):
        assert key in figures, key
    assert figures["explain/n"] == 3 and not any(k.startswith("explain/rollout") for k in figures)
    assert "explain/raw/pointing" in stdout
    code, _, err = cli_in_process(["eval", str(tiny_run), "--explain", "--methods", "raw,nonsense"], capsys,
                                  monkeypatch, tmp_path)
    one_line_error(code, err, "nonsense")
    code, _, err = cli_in_process(["eval", str(tiny_run), "--explain", "--n", "0"], capsys, monkeypatch, tmp_path)
    one_line_error(code, err, "--n")


# -- 10. the server's /v1/explain -------------------------------------------------------------------------
MODEL = "tiny-vlm"


@pytest.fixture(scope="module")
def explain_server(vlm):
    from glimpse.serve import ServerLimits, create_app

    with LiveServer(create_app(vlm, MODEL, ServerLimits(max_images=4))) as s:
        yield s


def user(image_urls, text="what colour is the circle?"):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
            + [{"type": "text", "text": text}]}


def post_explain(server, **body):
    return httpx.post(server.url + "/v1/explain", json={"model": MODEL, **body}, timeout=120)


def test_server_explains_an_answer(explain_server, image):
    url = image_data_url(image)
    r = httpx.get(explain_server.url + "/v1/models")
    assert "explain" in r.json()["data"][0]["capabilities"]
    r = post_explain(explain_server, messages=[user([url])], method="raw", max_tokens=3)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "explanation" and d["model"] == MODEL and d["method"] == "raw"
    assert len(d["grid"]) == 4 and all(len(row) == 4 for row in d["grid"])
    assert d["tokens"] and 1 <= len(d["words"]) <= 3 and d["target"].startswith("answer ")
    assert d["heatmap"].startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(d["heatmap"].split(",", 1)[1]))) as im:
        assert im.format == "PNG" and im.width >= 256
    r = post_explain(explain_server, messages=[user([url]), {"role": "assistant", "content": "red"}])
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["method"] == "chefer" and d["target"] == "answer 'red'" and [w["word"] for w in d["words"]] == ["red"]


BAD_EXPLAIN = {
    "no image": lambda url: dict(messages=[{"role": "user", "content": "what colour is the circle?"}]),
    "two images": lambda url: dict(messages=[user([url, url])]),
    "empty assistant message": lambda url: dict(messages=[user([url]), {"role": "assistant", "content": " "}]),
    "only an assistant message": lambda url: dict(messages=[{"role": "assistant", "content": "red"}]),
    "unknown method": lambda url: dict(messages=[user([url])], method="nonsense"),
    "broken base64 image": lambda url: dict(messages=[user(["data:image/png;base64,@@@@"])]),
}


@pytest.mark.parametrize("name", list(BAD_EXPLAIN))
def test_server_explain_bad_requests_get_a_one_line_400(explain_server, image, name):
    r = post_explain(explain_server, **BAD_EXPLAIN[name](image_data_url(image)))
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"]
    assert not re.search(r"Traceback|File \"|\.py\b|site-packages", err["message"])
    assert err["param"] == {"unknown method": "method", "broken base64 image": "messages.0.content"}.get(name, "messages")


def test_a_dual_encoder_server_does_not_explain(dual, image):
    from glimpse.serve import create_app

    with LiveServer(create_app(dual, "tiny-clip")) as s:
        assert "explain" not in httpx.get(s.url + "/v1/models").json()["data"][0]["capabilities"]
        r = httpx.post(s.url + "/v1/explain", json={"model": "tiny-clip", "messages": [user([image_data_url(image)])]},
                       timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_model"


def test_the_servers_explain_methods_are_the_librarys():
    import typing

    from glimpse.serve.schemas import ExplainRequest

    assert set(typing.get_args(ExplainRequest.model_fields["method"].annotation)) == set(METHODS)
