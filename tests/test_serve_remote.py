"""Remote image URLs: refused unless allowlisted; never to a private address on any redirect hop;
capped in size and time.  A local HTTP server plays the remote host; since it is on loopback, the
tests that need a successful fetch give the fetcher a policy that admits 127.0.0.1 only."""

from __future__ import annotations

import http.server
import io
import threading
import time

import httpx
import pytest
from conftest import LiveServer
from PIL import Image

from glimpse.errors import GlimpseError
from glimpse.serve import ServerLimits, create_app
from glimpse.serve.remote import RemoteImageFetcher, is_public_address

DRIPPED = [0]  # bytes of /drip's answer sent so far


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        port = self.server.server_address[1]
        routes = {
            "/img.png": (200, {"Content-Type": "image/png"}, png()),
            "/to-private": (302, {"Location": f"http://127.0.0.2:{port}/img.png"}, b""),
            "/to-other-host": (302, {"Location": f"http://localhost:{port}/img.png"}, b""),
            "/to-img": (302, {"Location": "/img.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/big": (200, {"Content-Type": "image/png"}, b"\0" * 50_000),
            "/missing": (404, {}, b""),
        }
        if self.path == "/drip":  # the status line and headers a byte at a time, never the body
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n" + b"X-Pad: " + b"a" * 400 + b"\r\n\r\n"
            try:
                for i in range(len(head)):
                    self.wfile.write(head[i:i + 1])
                    self.wfile.flush()
                    DRIPPED[0] = i + 1
                    time.sleep(0.02)
            except OSError:  # the client hung up
                pass
            self.close_connection = True
            return
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"\0" * 10)
                self.wfile.flush()
                time.sleep(0.1)
            return
        status, headers, body = routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if self.path != "/big":  # no Content-Length: the cap counts the bytes as they come
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def loopback_only(ip: str) -> bool:
    return ip == "127.0.0.1"


def fetcher(**kw) -> RemoteImageFetcher:
    return RemoteImageFetcher(["127.0.0.1", "127.0.0.2"], address_ok=loopback_only, **kw)


@pytest.mark.parametrize("ip,public", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("10.1.2.3", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("127.0.0.1", False), ("169.254.169.254", False), ("::1", False),
    ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False), ("0.0.0.0", False),
    ("224.0.0.1", False), ("100.64.0.1", False), ("::127.0.0.1", False), ("2002:7f00:1::", False),
    ("64:ff9b::7f00:1", False), ("2002:808:808::1", True), ("fec0::1", False), ("fec0:1234::5", False),
])
def test_public_addresses(ip, public):
    assert is_public_address(ip) is public


def test_fetch_follows_redirects_on_allowlisted_public_hosts(origin):
    assert fetcher().fetch(origin + "/img.png") == png()
    assert fetcher().fetch(origin + "/to-img") == png()


@pytest.mark.parametrize("path,message", [
    ("/to-private", "non-public address"),
    ("/to-other-host", "not in the server's allowlist"),
    ("/loop", "redirects more than"),
    ("/big", "byte limit"),
    ("/missing", "HTTP 404"),
])
def test_fetch_refuses(origin, path, message):
    with pytest.raises(GlimpseError, match=message):
        fetcher(max_bytes=10_000).fetch(origin + path)


def test_fetch_times_out(origin):
    with pytest.raises(GlimpseError, match="timed out"):
        fetcher(timeout=0.5).fetch(origin + "/slow")


def test_one_deadline_covers_a_host_that_drips_its_headers(origin):
    # 450 bytes at one per 20 ms would take 9 s; the fetch gives up at its 0.3 s deadline and hangs up,
    # so the host gets to send only part of them (counted, not timed)
    DRIPPED[0] = 0
    with pytest.raises(GlimpseError, match="timed out"):
        fetcher(timeout=0.3).fetch(origin + "/drip")
    time.sleep(0.5)  # the host notices the closed connection at its next write
    assert 0 < DRIPPED[0] < 300


def test_a_url_with_non_ascii_characters_is_fetched_percent_encoded(origin):
    with pytest.raises(GlimpseError, match="HTTP 404"):  # asked for, not a UnicodeEncodeError
        fetcher().fetch(origin + "/bébé.png?q=ü")


def test_the_real_policy_refuses_loopback_and_other_schemes(origin):
    real = RemoteImageFetcher(["127.0.0.1", "localhost"])
    for url in [origin + "/img.png", origin.replace("127.0.0.1", "localhost") + "/img.png"]:
        with pytest.raises(GlimpseError, match="non-public"):
            real.fetch(url)
    for url in ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/"]:
        with pytest.raises(GlimpseError, match="only http"):
            real.fetch(url)


def test_server_with_remote_fetching_uses_the_allowlist(tiny_vlm_run, origin):
    import glimpse

    app = create_app(glimpse.load(tiny_vlm_run), "m", ServerLimits(), remote=fetcher())
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": origin + "/img.png"}},
                                        {"type": "text", "text": "what color?"}]}]
    with LiveServer(app) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "m", "messages": msg, "max_tokens": 2})
        assert r.status_code == 200, r.text
        msg[0]["content"][0]["image_url"]["url"] = origin + "/to-private"
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "m", "messages": msg, "max_tokens": 2})
        assert r.status_code == 400 and "non-public" in r.json()["error"]["message"]
