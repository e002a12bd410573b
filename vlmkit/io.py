"""Writing files so that a reader (or a crash) never sees half of one: write beside, then rename.

Every file and folder vlmkit writes goes through here: configs, reports, checkpoints, plots, model
folders. Files get the permissions the user's umask gives a new file (0644 under the usual 022), so a
teammate can read a saved model.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes a temporary file beside `path`, which then replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one temporary name per process and thread, so two threads writing the same file never share one;
    # keep the suffix: savefig reads it
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}{path.suffix}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a fresh temporary folder, which then replaces `folder` in one rename: a crash
    leaves either the old folder or the new one, never a half-written one."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        readable(tmp)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def cut_torn_line(path: str | os.PathLike) -> bytes:
    """The bytes of a file appended to line by line, after cutting off a last line left half-written by
    a killed process (said on stderr), so the file is whole lines again and appends can go on."""
    raw = Path(path).read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        print(f"{path}: removing an incomplete last line from an interrupted run", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(end)
    return raw[:end]


def save_pretrained_atomic(model, processor, folder: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """`save_pretrained` of a model and its processor into `folder`, atomically. `state_dict` replaces
    the model's own tensors (a sharded model's weights, gathered)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)

    return atomic_write_folder(folder, write)


def readable(folder: Path) -> None:
    """Give every file under `folder` the umask's permissions (some writers, e.g. `tempfile`, use 0600)."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)
