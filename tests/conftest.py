"""Shared fixtures: a tiny shapes world (generated once per test session) and tiny recipes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from glimpse.data.world import make_world

    out = tmp_path_factory.mktemp("world") / "shapes"
    make_world(out, seed=0, n_train=160, n_val=24, n_test=40, image_size=32, shards=True, progress=False)
    return out


def tiny_overrides(world: Path, **extra) -> list[str]:
    """--set items that make shapes-clip tiny and point it at the session's world."""
    base = {
        "data.root": str(world), "data.image_size": 32, "data.num_workers": 0,
        "model.vision.image_size": 32, "model.vision.patch_size": 8, "model.vision.width": 32,
        "model.vision.layers": 2, "model.vision.heads": 2, "model.text.width": 32, "model.text.layers": 2,
        "model.text.heads": 2, "model.embed_dim": 16, "train.batch_size": 16, "train.max_steps": 6,
        "train.warmup_steps": 2, "train.log_every": 1, "train.save_every": 3, "train.eval_every": 0,
        "eval.batch_size": 64,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def cli_env(tmp_path) -> dict:
    """Environment for running `python -m glimpse` in a subprocess, with its own cache."""
    env = dict(os.environ)
    env["GLIMPSE_CACHE"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("GLIMPSE_DEBUG", None)
    return env


PY = sys.executable


@pytest.fixture(scope="session")
def tiny_run(world, tmp_path_factory) -> Path:
    """A tiny dual encoder trained in-process on the session's world (shared, read-only)."""
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    recipe = load_recipe("shapes-clip", tiny_overrides(world, **{"train.max_steps": 8, "train.eval_every": 4}))
    train(recipe, out, progress=False)
    return out


def tiny_vlm_overrides(world: Path, **extra) -> list[str]:
    """--set items that make a vlm recipe tiny, untied from other runs, on the session's world."""
    base = {
        "data.root": str(world), "data.image_size": 32, "data.num_workers": 0, "init": "null", "init_parts": "{}",
        "model.vision.image_size": 32, "model.vision.width": 32, "model.vision.layers": 2,
        "model.lm.width": 32, "model.lm.layers": 2, "model.lm.heads": 2, "model.lm.kv_heads": 1,
        "train.batch_size": 8, "train.max_steps": 4, "train.save_every": 2, "train.log_every": 1,
        "eval.batch_size": 16, "eval.vqa_limit": 8, "eval.max_new_tokens": 6,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_vlm_run(world, tmp_path_factory) -> Path:
    """A tiny LLaVA stage-2 style model trained in-process on the session's world (shared, read-only)."""
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "vlm"
    train(load_recipe("shapes-llava-stage2", tiny_vlm_overrides(world)), out, progress=False)
    return out


@pytest.fixture(scope="module")
def dual(tiny_run):
    """`tiny_run` loaded, once a test module (a module may mutate its pipeline)."""
    import glimpse

    return glimpse.load(tiny_run)


@pytest.fixture(scope="module")
def vlm(tiny_vlm_run):
    """`tiny_vlm_run` loaded, once a test module."""
    import glimpse

    return glimpse.load(tiny_vlm_run)


@pytest.fixture(scope="session")
def video_world(tmp_path_factory) -> Path:
    """A tiny moving-shapes world (48 training clips of 8 frames at 32 px; shared, read-only)."""
    pytest.importorskip("av")
    from glimpse.data.world import make_video_world

    out = tmp_path_factory.mktemp("video") / "world"
    make_video_world(out, seed=3, n_train=48, n_val=8, n_test=16, frames=8, image_size=32, progress=False)
    return out


def tiny_vq_overrides(world: Path, **extra) -> list[str]:
    """--set items that make shapes-vq tiny (32 px -> 4 x 4 codes of 16) on the session's world."""
    base = {
        "data.root": str(world), "data.image_size": 32, "data.num_workers": 0,
        "model.vq.sample_size": 32, "model.vq.block_out_channels": "[8, 8, 16, 16]", "model.vq.norm_num_groups": 8,
        "model.vq.latent_channels": 8, "model.vq.vq_embed_dim": 4, "model.vq.num_vq_embeddings": 16,
        "model.kmeans_images": 32, "model.restart_after": 2, "train.batch_size": 8, "train.max_steps": 4,
        "train.save_every": 2, "train.log_every": 1, "train.warmup_steps": 1, "eval.batch_size": 16,
        "eval.vqa_limit": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_vq_run(world, tmp_path_factory) -> Path:
    """A tiny image tokenizer trained in-process on the session's world (shared, read-only)."""
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "vq"
    train(load_recipe("shapes-vq", tiny_vq_overrides(world)), out, progress=False)
    return out


def tiny_t2i_overrides(world: Path, clip_run: Path, vq_run: Path, **extra) -> list[str]:
    """--set items that make shapes-t2i tiny, reading the tiny CLIP and tokenizer runs."""
    base = {
        "data.root": str(world), "data.image_size": 32, "data.num_workers": 0,
        "init_parts": f"{{clip: {clip_run}, vq: {vq_run}}}",
        "model.clip.embed_dim": 16, "model.clip.vision.image_size": 32, "model.clip.vision.width": 32,
        "model.clip.vision.layers": 2, "model.clip.vision.heads": 2, "model.clip.text.width": 32,
        "model.clip.text.layers": 2, "model.clip.text.heads": 2,
        "model.vq.sample_size": 32, "model.vq.block_out_channels": "[8, 8, 16, 16]", "model.vq.norm_num_groups": 8,
        "model.vq.latent_channels": 8, "model.vq.vq_embed_dim": 4, "model.vq.num_vq_embeddings": 16,
        "model.prior.width": 32, "model.prior.layers": 2, "model.prior.heads": 2, "model.steps": 3,
        "model.rerank": 2, "train.batch_size": 8, "train.max_steps": 4, "train.save_every": 2,
        "train.log_every": 1, "train.warmup_steps": 1, "eval.batch_size": 16, "eval.vqa_limit": 12,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_t2i_run(world, tiny_run, tiny_vq_run, tmp_path_factory) -> Path:
    """A tiny MaskGIT text-to-image run on the tiny CLIP and tokenizer (shared, read-only)."""
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "t2i"
    train(load_recipe("shapes-t2i", tiny_t2i_overrides(world, tiny_run, tiny_vq_run)), out, progress=False)
    return out


class LiveServer:
    """A glimpse API server on a free loopback port, run by uvicorn in a thread (as `glimpse serve`).  The
    port stays bound from the moment it is chosen (uvicorn serves the socket itself), so no other process
    can take it in between."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.app, self.url = app, f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


def serve_process(args: list[str], env: dict, attempts: int = 3):
    """`glimpse serve ARGS --port P` in a subprocess on a free loopback port: (process, url) once it answers
    /health.  A port taken between choosing it and the server binding it makes the server exit at once:
    then another port is tried."""
    import socket
    import subprocess
    import time

    import httpx

    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([PY, "-m", "glimpse", "serve", *args, "--port", str(port)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                time.sleep(0.1)
        proc.kill()
        err = proc.communicate()[1]
        if "address already in use" not in err.lower():
            raise RuntimeError(f"glimpse serve did not start: {err[-1000:]}")
    raise RuntimeError("glimpse serve found no free port")


def image_data_url(path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def tar_add(tar, name: str, data: bytes) -> None:
    """Add a member `name` holding `data` to an open tarfile (a WebDataset shard's sample member)."""
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
