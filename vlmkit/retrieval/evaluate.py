"""`vlmkit eval --task retrieval | zeroshot`: score a dual encoder on a caption data file, write a JSON report.

Retrieval: every distinct image of the file is a gallery item and every caption a query; R@1/5/10, mean and
median rank both ways, several captions per image counted as in CLIP_benchmark (`metrics.py`). With
`match_captions`, a caption query is also right on any image that has the same caption (shapes scenes, or
any data where one description fits many images).

Zero-shot classification: the class names are turned into captions by the templates ("a photo of a {}."),
each class's embedding is the normalised mean over its templates, and each image takes the nearest class.
An image's true class is read from its caption: the class name the caption equals, else the longest class
name it contains as whole words.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from vlmkit.data.captions import caption_key, read_pairs
from vlmkit.errors import VlmkitError
from vlmkit.io import atomic_write_text
from vlmkit.model.dual_encoder import load_dual_encoder
from vlmkit.retrieval.encode import embed_images, embed_texts
from vlmkit.retrieval.metrics import retrieval_scores, zeroshot_accuracy

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def evaluate_retrieval(model: str, data: str, output: str | None = None, match_captions: bool = False,
                       chunk: int = 256, batch_size: int = 32, device: str = "cpu") -> dict:
    """Retrieval scores of the dual encoder `model` on `data`; the report is written to `output` if given."""
    pairs = read_pairs(data)
    encoder, processor = load_dual_encoder(model, device)
    images = list(dict.fromkeys(p.image for p in pairs))
    where = {image: i for i, image in enumerate(images)}
    image_emb, _, _ = embed_images(encoder, processor, images, batch_size, progress=True)
    text_emb = embed_texts(encoder, processor, [p.caption for p in pairs], batch_size, progress=True)
    groups: dict[str, int] = {}
    text_group = [groups.setdefault(caption_key(p.caption), len(groups)) for p in pairs] if match_captions else None
    report = {"task": "retrieval", "model": str(model), "data": str(data), "match_captions": match_captions,
              **retrieval_scores(image_emb, text_emb, [where[p.image] for p in pairs], text_group, chunk)}
    if output:
        atomic_write_text(Path(output), json.dumps(report, indent=2) + "\n")
    return report


def read_list(value: str | list[str], what: str, sep: str = ",") -> list[str]:
    """Names from a file (one a line), a string of them separated by `sep`, or a list."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif os.path.isfile(value):
        items = Path(value).read_text().splitlines()
    else:
        items = value.split(sep)
    items = [i.strip() for i in items if i.strip()]
    if not items:
        raise VlmkitError(f"no {what} given; list them separated by {sep!r}, or in a file, one a line")
    return items


def label_of(caption: str, classes: list[str], where: str) -> int:
    text = caption_key(caption)
    keys = [caption_key(c) for c in classes]
    if text in keys:
        return keys.index(text)
    found = [k for k, name in enumerate(keys) if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text)]
    if not found:
        raise VlmkitError(f"{where}: caption {caption!r} names none of the classes ({', '.join(classes)}); every "
                          "image's caption must name its class")
    return max(found, key=lambda k: len(keys[k]))


def evaluate_zeroshot(model: str, data: str, classes, templates=DEFAULT_TEMPLATES, output: str | None = None,
                      batch_size: int = 32, device: str = "cpu") -> dict:
    """Zero-shot classification accuracy of `model` on the images of `data` (labels read from their captions)."""
    classes = read_list(classes, "classes")
    templates = read_list(templates, "templates", sep="|")  # templates may hold commas
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise VlmkitError(f"template {bad[0]!r} has no {{}} where the class name goes; write e.g. \"a photo of a {{}}.\"")
    first = {}
    for p in read_pairs(data):
        first.setdefault(p.image, p)
    labels = [label_of(p.caption, classes, p.where) for p in first.values()]
    encoder, processor = load_dual_encoder(model, device)
    image_emb, _, _ = embed_images(encoder, processor, list(first), batch_size, progress=True)
    prompts = [t.format(c) for c in classes for t in templates]
    class_emb = embed_texts(encoder, processor, prompts, batch_size).view(len(classes), len(templates), -1).mean(1)
    class_emb = torch.nn.functional.normalize(class_emb, dim=-1)
    result = zeroshot_accuracy(image_emb, class_emb, labels)
    report = {"task": "zeroshot", "model": str(model), "data": str(data), "n": len(labels), "classes": classes,
              "templates": templates, "accuracy": result["accuracy"],
              "per_class": {classes[c]: acc for c, acc in sorted(result["per_class"].items())}}
    if output:
        atomic_write_text(Path(output), json.dumps(report, indent=2) + "\n")
    return report
