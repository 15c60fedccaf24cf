"""`glimpse serve`: any glimpse model behind an OpenAI-compatible HTTP API and a web chat page."""

from __future__ import annotations

from pathlib import Path

from glimpse.serve.app import ServerLimits, create_app

__all__ = ["ServerLimits", "create_app", "serve"]


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          model_name: str | None = None, limits: ServerLimits | None = None,
          allow_remote_images: list[str] | None = None) -> None:
    import uvicorn

    from glimpse.api import load
    from glimpse.runs import run_dir
    from glimpse.serve.remote import RemoteImageFetcher

    pipeline = load(run, device=device)
    name = model_name or run_dir(run).name
    remote = RemoteImageFetcher(allow_remote_images) if allow_remote_images else None
    app = create_app(pipeline, name, limits, remote=remote)
    print(f"serving {name} on http://{host}:{port}  (OpenAI API at /v1, chat page at /)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
