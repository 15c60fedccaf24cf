"""Image search: embeddings of a folder of images in a FAISS inner-product index.

An index folder holds `index.faiss`, `paths.json` (one entry per vector, in order) and
`meta.json` (the run that embedded them), so a search embeds the query with the same model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from glimpse.data.images import IMAGE_SUFFIXES
from glimpse.errors import GlimpseError


def find_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise GlimpseError(f"no such image folder: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def build_index(run: str | Path, image_dir: str | Path | list, out: str | Path, batch_size: int = 128,
                progress: bool = True) -> tuple[int, Counter]:
    """Embed every image under `image_dir` (one folder or several); bad files are skipped,
    reported and counted by reason."""
    import faiss

    from glimpse.api import load

    dirs = image_dir if isinstance(image_dir, list) else [image_dir]
    paths = [p for d in dirs for p in find_images(d)]
    if not paths:
        raise GlimpseError(f"no images (png, jpg, webp, gif) under {', '.join(map(str, dirs))}")
    pipe = load(run)
    with tqdm(total=len(paths), desc="embedding", unit="img", disable=not progress) as bar:
        emb, good, failures = pipe.embed_image_stream(paths, batch_size, skip_bad=True, progress=bar)
    if not good:
        raise GlimpseError(f"none of the {len(paths)} images under {image_dir} could be read")
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb.numpy(), dtype=np.float32))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / "index.faiss"))
    (out / "paths.json").write_text(json.dumps([str(paths[i].resolve()) for i in good]))
    (out / "meta.json").write_text(json.dumps({"run": str(Path(run).resolve()), "count": len(good),
                                               "dim": int(emb.shape[1]), "skipped": dict(failures)}))
    return len(good), failures


class ImageIndex:
    def __init__(self, folder: str | Path, run: str | Path | None = None):
        import faiss

        from glimpse.api import load

        folder = Path(folder)
        try:
            self.meta = json.loads((folder / "meta.json").read_text())
            self.paths = json.loads((folder / "paths.json").read_text())
            self.index = faiss.read_index(str(folder / "index.faiss"))
        except FileNotFoundError as e:
            raise GlimpseError(f"{folder} is not an image index: missing {Path(e.filename).name}") from None
        except (json.JSONDecodeError, RuntimeError) as e:  # RecursionError is a RuntimeError
            raise GlimpseError(f"broken image index {folder}: {str(e).splitlines()[0]}") from None
        if not isinstance(self.meta, dict) or not (run or self.meta.get("run")):
            raise GlimpseError(f"broken image index {folder}: meta.json names no run (pass --run)")
        if not isinstance(self.paths, list) or self.index.ntotal != len(self.paths):
            raise GlimpseError(f"broken image index {folder}: {self.index.ntotal} vectors but "
                               f"{len(self.paths) if isinstance(self.paths, list) else 'no'} paths")
        self.pipe = load(run or self.meta["run"])
        if self.pipe.model.cfg.embed_dim != self.index.d:
            raise GlimpseError(f"the run embeds into {self.pipe.model.cfg.embed_dim} dimensions but the index "
                               f"{folder} holds {self.index.d}: search it with the run that built it")

    def search_text(self, text: str, k: int = 5) -> list[tuple[str, float]]:
        return self._search(self.pipe.embed_texts([text]), k)

    def search_image(self, image, k: int = 5) -> list[tuple[str, float]]:
        return self._search(self.pipe.embed_images([image]), k)

    def _search(self, query, k: int) -> list[tuple[str, float]]:
        if k < 1:
            raise GlimpseError(f"--k must be at least 1, got {k}")
        scores, ids = self.index.search(np.ascontiguousarray(query.numpy(), dtype=np.float32), min(k, len(self.paths)))
        return [(self.paths[i], float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
