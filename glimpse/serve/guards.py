"""What stands between a request and the model: the server's limits, OpenAI-style errors, who may ask
(`Gate`: the API key and the Host names a loopback server answers to) and how large a body may be
(`BodyLimit`)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from glimpse.errors import GlimpseError


@dataclass
class ServerLimits:
    max_batch: int = 32  # rows decoded together (a small model's step costs about the same for 1 or 32)
    max_pending: int = 32  # requests admitted (running + waiting); beyond: 429
    max_body_bytes: int = 20_000_000  # beyond: 413
    max_images: int = 8  # per request, every endpoint
    max_image_bytes: int = 10_000_000  # per encoded image
    max_image_pixels: int = 16_000_000  # per decoded image
    max_request_pixels: int = 32_000_000  # decoded pixels of all of a request's images
    max_request_chars: int = 100_000  # characters of all of a request's text, refused before any tokenizing
    max_decoding: int = 2  # images decoded at once, server-wide (each is shrunk to the model's size at once)
    max_video_bytes: int = 16_000_000  # per encoded video (a video model's video_url parts)
    max_video_frames: int = 2_000  # frames decoded from one video before it is refused
    max_video_seconds: int = 600  # a video's declared duration
    retry_after_s: int = 1

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GlimpseError(f"server limit {name.replace('_', '-')} must be a whole number of at least 1, "
                                   f"not {value!r}")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Gate:
    """Who may ask: with `api_key`, every /v1 request must carry `Authorization: Bearer KEY` (401
    otherwise); with `allowed_hosts` (a server on loopback), every request's Host header must name one of
    them, whatever its port (400 otherwise: a page on another site that rebinds its own name to
    127.0.0.1 cannot reach the server)."""

    def __init__(self, app, api_key: str | None, allowed_hosts: tuple[str, ...] | None):
        self.app, self.api_key, self.allowed_hosts = app, api_key, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            name = host.rpartition("]")[0].lstrip("[") if host.startswith("[") else host.split(":")[0]
            if name not in self.allowed_hosts:
                return await error_response(400, "the Host header names no address of this server (it serves "
                                            "loopback only)", code="invalid_host")(scope, receive, send)
        if self.api_key is not None and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key.encode()):
                return await error_response(401, "a missing or wrong API key: send Authorization: Bearer KEY",
                                            code="invalid_api_key")(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with a 413, whether or not Content-Length says so
    (the body is read here, counted, and replayed to the app)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status = 413 if length.isdigit() else 400
            msg = f"request body over the {self.max_bytes}-byte limit" if status == 413 else "bad Content-Length"
            return await error_response(status, msg, code="request_too_large" if status == 413 else None)(
                scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await error_response(413, f"request body over the {self.max_bytes}-byte limit",
                                            code="request_too_large")(scope, receive, send)
            if not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
