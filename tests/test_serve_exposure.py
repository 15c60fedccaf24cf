"""Who may ask the server: an API key on every /v1 request when one is set, loopback-only Host names on a
loopback server (DNS rebinding), and no open server on a public address unless asked for."""

from __future__ import annotations

import subprocess

import httpx
import pytest
from conftest import PY, LiveServer, image_data_url

from glimpse.errors import GlimpseError
from glimpse.serve import LOOPBACK_HOSTS, create_app, serve

KEY = "sk-test-0123456789"


def test_an_api_key_guards_every_v1_route(vlm, world):
    from openai import AuthenticationError, OpenAI

    image = sorted((world / "images" / "test").glob("*.png"))[0]
    with LiveServer(create_app(vlm, "tiny", api_key=KEY)) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
        assert r.status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200 and httpx.get(s.url + "/").status_code == 200
        good = OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        reply = good.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(image)}}, {"type": "text", "text": "hi"}]}])
        assert reply.choices[0].message.content is not None
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_a_loopback_server_answers_only_loopback_host_names(vlm):
    with LiveServer(create_app(vlm, "tiny", allowed_hosts=LOOPBACK_HOSTS)) as s:
        port = s.url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
            assert httpx.get(s.url + "/health", headers={"Host": host}).status_code == 200, host
        for host in (f"attacker.example:{port}", "rebind.attacker.example", f"127.0.0.1.nip.io:{port}"):
            r = httpx.get(s.url + "/v1/models", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host


def test_no_open_server_on_a_public_address(tiny_vlm_run, cli_env, monkeypatch):
    monkeypatch.delenv("GLIMPSE_API_KEY", raising=False)
    with pytest.raises(GlimpseError, match="refusing to serve on 0.0.0.0 without an API key.*--no-api-key"):
        serve(tiny_vlm_run, host="0.0.0.0")
    env = {k: v for k, v in cli_env.items() if k != "GLIMPSE_API_KEY"}
    r = subprocess.run([PY, "-m", "glimpse", "serve", str(tiny_vlm_run), "--host", "0.0.0.0"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--api-key KEY" in r.stderr
