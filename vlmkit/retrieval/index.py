"""A search index of image embeddings: build it (resumably), load it, search it by text or by image.

An index is a folder:

    index.json       {"format": "vlmkit-retrieval-index", "version": 1, "model": the dual encoder's folder,
                      "embed_dim": E, "count": N, "skipped": S, "source": the folder or data file}
    embeddings.npy   float32 (N, E), L2-normalised: row k is the image on line k of paths.jsonl
    paths.jsonl      {"path": "/abs/path.png"} a line, in the order of the rows
    skipped.jsonl    {"path": ..., "error": why} for every image that could not be read

While it is built, each block of BLOCK images is written to `parts/` (embeddings and the paths done) in
one rename, and `parts/plan.json` lists every image to do; a build that stops (killed, out of time)
continues from the first block not written when run again with the same inputs, and ends with the same
files as one that never stopped. The final files are written last, so `index.json` marks a whole index.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from vlmkit.data.captions import read_pairs
from vlmkit.errors import VlmkitError
from vlmkit.io import atomic_write, atomic_write_text
from vlmkit.model.dual_encoder import load_dual_encoder
from vlmkit.retrieval.encode import embed_images, embed_texts

FORMAT = "vlmkit-retrieval-index"
BLOCK = 512
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(images: str | None = None, data: str | None = None) -> tuple[list[str], str]:
    """(absolute image paths, source) of a folder (recursively, by extension, sorted) or of a data file."""
    if bool(images) == bool(data):
        raise VlmkitError("give the images to index: --images DIR or --data FILE.jsonl (one of them)")
    if data:
        return list(dict.fromkeys(p.image for p in read_pairs(data))), str(Path(data).resolve())
    root = Path(images).expanduser()
    if not root.is_dir():
        raise VlmkitError(f"--images {images}: not a folder; give a folder of images (searched recursively)")
    found = sorted(str(p.resolve()) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not found:
        raise VlmkitError(f"--images {images}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in it")
    return found, str(root.resolve())


def build_index(model: str, output: str, images: str | None = None, data: str | None = None,
                batch_size: int = 32, device: str = "cpu", stop_after_blocks: int | None = None) -> dict:
    """Embed every image of a folder or data file with the dual encoder `model` into the index folder
    `output`; resumes a build that stopped. Returns the index's `index.json` (plus "resumed_blocks").
    `stop_after_blocks` stops early, leaving the parts (tests of resume use it)."""
    paths, source = list_images(images, data)
    out = Path(output)
    parts = out / "parts"
    plan = {"model": str(Path(model).resolve()), "paths": paths}
    if (out / "index.json").is_file():
        raise VlmkitError(f"{out}: already holds a complete index; choose another --output or delete it")
    if (parts / "plan.json").is_file():
        if json.loads((parts / "plan.json").read_text()) != plan:
            raise VlmkitError(f"{out}: holds a partial index of other images or another model; delete it or choose "
                              "another --output")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(parts / "plan.json", json.dumps(plan))
    encoder, processor = load_dual_encoder(model, device)
    blocks = range(0, len(paths), BLOCK)
    resumed = 0
    for b, start in enumerate(blocks):
        done = parts / f"{b:06d}.json"
        if done.is_file():
            resumed += 1
            continue
        if stop_after_blocks is not None and b >= stop_after_blocks:
            return {"stopped_at_block": b}
        chunk = paths[start : start + BLOCK]
        emb, kept, bad = embed_images(encoder, processor, chunk, batch_size, progress=True, skip_bad=True)
        atomic_write(parts / f"{b:06d}.npy", lambda tmp: np.save(tmp, emb.numpy().astype(np.float32)))
        atomic_write_text(done, json.dumps({"paths": [chunk[k] for k in kept],
                                            "skipped": [{"path": chunk[k], "error": why} for k, why in bad]}))
    embeddings, kept, skipped = [], [], []
    for b in range(len(blocks)):
        embeddings.append(np.load(parts / f"{b:06d}.npy"))
        info = json.loads((parts / f"{b:06d}.json").read_text())
        kept += info["paths"]
        skipped += info["skipped"]
    if not kept:
        raise VlmkitError(f"none of the {len(paths)} images could be read (first: {skipped[0]['error']})")
    matrix = np.concatenate(embeddings)
    atomic_write(out / "embeddings.npy", lambda tmp: np.save(tmp, matrix))
    atomic_write_text(out / "paths.jsonl", "".join(json.dumps({"path": p}) + "\n" for p in kept))
    atomic_write_text(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
    meta = {"format": FORMAT, "version": 1, "model": plan["model"], "embed_dim": int(matrix.shape[1]),
            "count": len(kept), "skipped": len(skipped), "source": source}
    atomic_write_text(out / "index.json", json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(parts)
    return {**meta, "resumed_blocks": resumed}


class Index:
    """A loaded index: `embeddings` (N, E), `paths` (N), its `meta` and a `search`."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        if not (folder / "index.json").is_file():
            partial = " (a build that stopped: run `vlmkit index` again to finish it)" if (folder / "parts").is_dir() else ""
            raise VlmkitError(f"{folder}: not a vlmkit index (no index.json){partial}")
        self.meta = json.loads((folder / "index.json").read_text())
        if self.meta.get("format") != FORMAT:
            raise VlmkitError(f"{folder}/index.json: not a {FORMAT} file")
        self.embeddings = torch.from_numpy(np.load(folder / "embeddings.npy"))
        self.paths = [json.loads(line)["path"] for line in (folder / "paths.jsonl").read_text().splitlines() if line]
        self._model = None

    def model(self, model: str | None = None):
        if model is not None or self._model is None:
            self._model = load_dual_encoder(model or self.meta["model"])
        return self._model

    def search(self, text: str | None = None, image=None, k: int = 5, model: str | None = None) -> list[dict]:
        """The k images nearest a caption (`text`) or an image (a path or PIL image): [{"rank", "path", "score"}]."""
        if (text is None) == (image is None):
            raise VlmkitError("search by --text or by --image (one of them)")
        if k < 1:
            raise VlmkitError(f"-k must be at least 1, not {k}")
        encoder, processor = self.model(model)
        if text is not None:
            query = embed_texts(encoder, processor, [text])
        else:
            query = embed_images(encoder, processor, [image])[0]
        if query.shape[1] != self.embeddings.shape[1]:
            raise VlmkitError(f"the model embeds in {query.shape[1]} dimensions, the index in {self.embeddings.shape[1]}; "
                              "search with the model that built it")
        scores = (self.embeddings @ query[0]).float()
        top = torch.topk(scores, min(k, len(scores)))
        return [{"rank": r + 1, "path": self.paths[i], "score": round(float(s), 6)}
                for r, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))]


def search(index: str | os.PathLike, text: str | None = None, image=None, k: int = 5, model: str | None = None) -> list[dict]:
    """Load the index at `index` and search it once (see `Index.search`)."""
    return Index(index).search(text=text, image=image, k=k, model=model)
