"""Atomic writes, the one helper for the whole project: a crash leaves the old file (or dir) or the new one.

model/ writes checkpoints, so this lives at the lowest layer and every folder may import it.

    atomic_write(path, lambda tmp: save_file(t, tmp))    # a file, written via a temp name + fsync + rename
    atomic_write_text(path, text)
    atomic_dir(path, lambda tmp_dir: ...)               # a directory, swapped in whole
    tmp = staging_dir(path); ...; commit_dir(tmp, path)  # the same in two steps (several writers, e.g. ranks)
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """write(tmp_path) next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def staging_dir(path: str | os.PathLike, name: str | None = None) -> Path:
    """A fresh empty sibling of `path` to write into; a fixed `name` lets several processes share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{name or uuid.uuid4().hex[:8]}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, path: str | os.PathLike) -> Path:
    """fsync `tmp`, then swap it in for `path`; the old copy is removed only after the swap."""
    path = Path(path)
    fsync_tree(tmp)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)
    return path


def atomic_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """write(tmp_dir), fsync it, then swap it in for `path`."""
    tmp = staging_dir(path)
    try:
        write(tmp)
        return commit_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
