"""`vlmkit distill`: a teacher VLM captions, answers and reads a folder of images; every reply is checked
by the automatic filters and recorded, and the kept ones become a chat dataset for `vlmkit train`.

Per image, the prompts are the tasks' (`caption`, `ocr`: the built-in prompts; `qa`: the questions of
`--questions`, or questions the teacher proposes about the image itself), each asked `samples` times.
Images go to the teacher in batches; each image's records are appended to the manifest together, so a
run killed at any moment resumes where it stopped (`manifest.py`). An unreadable image is listed and
skipped, never replaced by another. With a `scorer` (`scorer.py`), each reply's image-text similarity is
recorded and those below its threshold are dropped (`low_similarity`). The run's settings are saved in `OUT/distill.json`, and a re-run
into the same folder must use the same ones.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from vlmkit.data.images import load_image
from vlmkit.distill import manifest as mf
from vlmkit.distill.filters import Filters, duplicate_key, judge
from vlmkit.distill.scorer import scored_text
from vlmkit.distill.teachers import Request
from vlmkit.errors import VlmkitError
from vlmkit.io import atomic_write_text
from vlmkit.model.families import CAPTION, OCR

TASKS = ("caption", "qa", "ocr")
PROMPTS = {"caption": CAPTION, "ocr": OCR}
PROPOSE = ("Write {n} short questions about this image that can be answered by looking at it. "
           "Write one question a line and nothing else.")
SETTINGS = "distill.json"


@dataclass
class Plan:
    """What to ask about each image."""

    tasks: tuple[str, ...] = ("caption",)
    questions: dict = field(default_factory=dict)  # image path ("" = every image) -> list of questions
    questions_file: str | None = None
    propose: int = 3  # questions the teacher proposes per image, for qa without --questions
    samples: int = 1
    temperature: float = 0.0

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise VlmkitError(f"--tasks {','.join(self.tasks)}: give one or more of {', '.join(TASKS)}, comma-separated")
        if self.samples < 1:
            raise VlmkitError(f"--samples {self.samples}: give at least 1")
        if self.samples > 1 and self.temperature <= 0:
            raise VlmkitError(f"--samples {self.samples} with temperature 0 gives the same reply {self.samples} times; "
                              "give --temperature above 0 (e.g. 0.7)")
        if self.questions and "qa" not in self.tasks:
            self.tasks = (*self.tasks, "qa")

    def fixed_prompts(self, image: str) -> list[tuple[str, str]]:
        """(task, prompt) for one image, the teacher's own questions aside."""
        out = []
        for task in self.tasks:
            if task == "qa":
                out += [("qa", q) for q in self.questions.get("", []) + self.questions.get(image, [])]
            else:
                out.append((task, PROMPTS[task]))
        return out

    @property
    def proposing(self) -> bool:
        return "qa" in self.tasks and not self.questions

    def as_dict(self) -> dict:
        return {"tasks": list(self.tasks), "questions": self.questions_file, "propose": self.propose if self.proposing else 0,
                "samples": self.samples, "temperature": self.temperature}


def read_questions(path: str, images: list[Path]) -> dict:
    """--questions: a .txt file (one question a line, for every image) or JSONL of {"question"} (every
    image) and {"image", "question"} (one image, its path relative to the file's folder)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise VlmkitError(f"--questions {path}: file not found")
    out: dict[str, list[str]] = {}
    known = {str(p) for p in images}
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix.lower() != ".jsonl":
        out[""] = [q.strip() for q in lines if q.strip()]
    for no, line in enumerate(lines if file.suffix.lower() == ".jsonl" else [], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise VlmkitError(f"{file}:{no}: not valid JSON ({e.msg}); write {{\"image\": ..., \"question\": ...}}") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise VlmkitError(f"{file}:{no}: field `question`: missing or not a string; give the question's text")
        image = row.get("image")
        key = "" if image is None else os.path.abspath(file.parent / image)
        if key and key not in known:
            raise VlmkitError(f"{file}:{no}: field `image`: {image} is not one of the --images; give its path relative to {file.parent}")
        out.setdefault(key, []).append(row["question"].strip())
    if not any(out.values()):
        raise VlmkitError(f"--questions {path}: no questions in the file; write one question a line")
    return out


def parse_proposals(text: str, n: int) -> list[str]:
    """The teacher's proposed questions: one a line, numbering and bullets removed, ending in "?"."""
    found = []
    for line in text.splitlines():
        q = re.sub(r"^\s*(?:\d+[.)]|[-*•])\s*", "", line).strip()
        if q.endswith("?") and len(q) > 3 and q not in found:
            found.append(q)
    return found[:n]


def check_settings(out: Path, settings: dict) -> None:
    """A new folder records the settings; an old one must have been made with the same."""
    path = out / SETTINGS
    if path.exists():
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            raise VlmkitError(f"{out} was distilled with other settings ({', '.join(differ)} differ, see {path}); "
                              "give another --output, or the same settings to resume")
    else:
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


@dataclass
class Result:
    done: int = 0  # images done in this run
    skipped: int = 0  # images already in the manifest
    pairs: int = 0  # pairs written in this run
    unreadable: list = field(default_factory=list)  # (image, why)


def distill(teacher, images: list[Path], output: str | os.PathLike, plan: Plan, filters: Filters = Filters(),
            images_per_batch: int = 8, seed: int = 0, sheet_size: int = 48,
            after_write: Callable[[int], None] | None = None, scorer=None) -> Result:
    """Distill `images` with `teacher` into `output`; returns what this run did. `after_write(n)` is called
    after each append with the number of records written so far (tests stop a run there). `scorer`: a
    `scorer.Scorer`, to record each reply's image-text similarity and drop those below its threshold."""
    from vlmkit.distill.report import summarise, write_sheet

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    filters_dict = filters.as_dict()
    check_settings(out, {"teacher": teacher.id, "teacher_params": teacher.params, **plan.as_dict(), "seed": seed,
                         "filters": filters_dict, **(scorer.settings() if scorer else {})})
    records = mf.load_manifest(out)
    done = {r["image"] for r in records}
    seen = {duplicate_key(r["sha256"], r["prompt"], r["reply"]) for r in records}  # for the duplicate filter
    result = Result()
    todo = []
    for path in images:
        if str(path) in done:
            result.skipped += 1
        else:
            todo.append(path)
    bar = tqdm(total=len(todo), desc="distilling", unit="image", file=sys.stderr, disable=len(todo) < 2)
    teacher_info = {"id": teacher.id, "temperature": plan.temperature, **teacher.params}
    for start in range(0, len(todo), images_per_batch):
        chunk = todo[start : start + images_per_batch]
        loaded = []
        for path in chunk:
            try:
                loaded.append((str(path), load_image(path), mf.file_sha256(path)))
            except (VlmkitError, OSError) as e:
                result.unreadable.append((str(path), str(e)))
        answers = ask(teacher, plan, loaded, seed)
        scores = similarities(scorer, loaded, answers) if scorer else None
        rows = []
        for image, _, sha in loaded:
            rows += image_records(image, sha, answers[image], teacher_info, plan, filters, seen, scores,
                                  scorer.min_similarity if scorer else None)
        mf.append_lines(out / mf.MANIFEST, rows)
        records += rows
        result.done += len(loaded)
        result.pairs += len(rows)
        bar.update(len(chunk))
        if after_write is not None:
            after_write(result.pairs)
    bar.close()
    mf.export(out, records)
    summarise(out, records, result.unreadable)
    write_sheet(out, records, size=sheet_size, seed=seed)
    return result


def ask(teacher, plan: Plan, loaded: list[tuple], seed: int) -> dict[str, list[tuple]]:
    """Every prompt about each loaded (path, image, sha256), `plan.samples` times, in one call to the teacher
    (after one to propose questions, when it proposes them): path -> [(task, prompt, sample, id, reply)]."""
    prompts = {image: plan.fixed_prompts(image) for image, _, _ in loaded}
    if plan.proposing and loaded:
        asks = [Request(im, "propose", PROPOSE.format(n=plan.propose)) for _, im, _ in loaded]
        for (image, _, _), text in zip(loaded, teacher.reply(asks)):
            prompts[image] += [("qa", q) for q in parse_proposals(text, plan.propose)]
    requests, owners = [], []
    for image, im, _ in loaded:
        for task, prompt in prompts[image]:
            for s in range(plan.samples):
                rid = mf.pair_id(image, task, prompt, s)
                requests.append(Request(im, task, prompt, plan.temperature, seed + int(rid[:7], 16), s))
                owners.append((image, task, prompt, s, rid))
    answers: dict[str, list[tuple]] = {image: [] for image, _, _ in loaded}
    for (image, *rest), reply in zip(owners, teacher.reply(requests) if requests else []):
        answers[image].append((*rest, reply))
    return answers


def similarities(scorer, loaded: list[tuple], answers: dict[str, list[tuple]]) -> dict[str, float | None]:
    """Each reply's image-text similarity, by record id (None for a blank reply), scored in one call for the batch."""
    pairs, ids, out = [], [], {}
    for k, (image, _, _) in enumerate(loaded):
        for task, prompt, _, rid, reply in answers[image]:
            text = scored_text(task, prompt, reply)
            out[rid] = None
            if text is not None:
                pairs.append((k, text))
                ids.append(rid)
    out.update(zip(ids, scorer.similarities([im for _, im, _ in loaded], pairs)))
    return out


def image_records(image: str, sha: str, answers: list[tuple], teacher_info: dict, plan: Plan, filters: Filters,
                  seen: set, scores: dict | None = None, min_similarity: float | None = None) -> list[dict]:
    """One image's manifest records, each reply judged with the others to the same prompt; with `scores`
    (record id -> image-text similarity) each record also holds its `similarity`."""
    by_prompt: dict[tuple, list] = {}
    for task, prompt, s, rid, reply in answers:
        by_prompt.setdefault((task, prompt), []).append((s, rid, reply))
    rows = []
    for (task, prompt), items in by_prompt.items():
        sims = [scores[rid] for _, rid, _ in items] if scores is not None else None
        reasons = judge([r for _, _, r in items], task, sha, prompt, task == "qa" and plan.samples > 1, filters, seen,
                        sims, min_similarity)
        for (s, rid, reply), why in zip(items, reasons):
            rows.append({"id": rid, "image": image, "sha256": sha, "task": task, "prompt": prompt, "sample": s,
                         "teacher": teacher_info, "reply": reply, "status": "dropped" if why else "kept", "reasons": why})
    if not rows:  # nothing to ask (a proposal without questions): one record says so
        rows.append({"id": mf.pair_id(image, "none", "", 0), "image": image, "sha256": sha, "task": "none", "prompt": "",
                     "sample": 0, "teacher": teacher_info, "reply": "", "status": "dropped", "reasons": ["no_questions"]})
    for r in rows:
        r["of"] = len(rows)
        if scores is not None:
            r["similarity"] = scores.get(r["id"])
    return rows
