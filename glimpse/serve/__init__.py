"""`glimpse serve`: any glimpse model behind an OpenAI-compatible HTTP API and a web chat page.

Exposure: with an API key (`--api-key KEY` or $GLIMPSE_API_KEY) every /v1 request must carry
`Authorization: Bearer KEY`, as vLLM and OpenAI's clients expect.  A server on a non-loopback address
without a key is refused unless `--no-api-key` says so.  A server on loopback answers only requests
whose Host header names loopback, so a web page elsewhere cannot reach it by DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from glimpse.errors import GlimpseError
from glimpse.serve.app import LOOPBACK_HOSTS, ServerLimits, create_app

__all__ = ["LOOPBACK_HOSTS", "ServerLimits", "create_app", "serve"]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          model_name: str | None = None, limits: ServerLimits | None = None,
          allow_remote_images: list[str] | None = None, api_key: str | None = None,
          no_api_key: bool = False) -> None:
    import uvicorn

    from glimpse.api import load
    from glimpse.runs import run_dir
    from glimpse.serve.remote import RemoteImageFetcher

    api_key = api_key or os.environ.get("GLIMPSE_API_KEY") or None
    loopback = is_loopback(host)
    if not loopback and api_key is None and not no_api_key:
        raise GlimpseError(f"refusing to serve on {host} without an API key: anyone who reaches it could use the "
                           "model; pass --api-key KEY (or set GLIMPSE_API_KEY), or --no-api-key to serve it openly")
    if str(device).startswith("cpu") and not os.environ.get("OMP_NUM_THREADS"):
        import torch

        # the model worker shares the CPU with the HTTP side (the event loop, image decoding): leave that a
        # core, or torch's intra-op threads, spinning between a small model's many small ops, starve it
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    pipeline = load(run, device=device)
    name = model_name or run_dir(run).name
    remote = RemoteImageFetcher(allow_remote_images) if allow_remote_images else None
    app = create_app(pipeline, name, limits, remote=remote, api_key=api_key,
                     allowed_hosts=LOOPBACK_HOSTS if loopback else None)
    print(f"serving {name} on http://{host}:{port}  (OpenAI API at /v1, chat page at /)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
