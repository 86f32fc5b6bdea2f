"""Artifact packaging: provenance in ``metadata_props``, SHA-256, atomic publication.

A model is written into a hidden temporary folder beside its destination and
renamed into place, so an app never sees a half-written artifact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from edgec.rundir import TMP_PREFIX, sha256_file  # noqa: F401 — sha256_file is imported from here


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: Path) -> None:
    """Give a temp file/folder (created 0600/0700) the modes an ordinary one gets (0666/0777 & ~umask),
    so apps and other users can read what edgec publishes."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def publish_model(model_path: Path, dest_dir: Path, metadata: dict,
                  add_files: Callable[[Path], None] | None = None) -> Path:
    """Copy ``model_path`` to ``dest_dir/model.onnx`` with ``metadata`` added, atomically.

    ``add_files(folder)`` may write more files (e.g. an EPContext binary) next to
    ``folder/model.onnx`` before the folder is published. An existing ``dest_dir`` is
    replaced only once the new one is complete. Returns the published model's path.
    """
    from edgec.compile.export import set_metadata  # onnx and torch: not for the CLI's start (help, bad flags)

    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest_dir.parent, prefix=f"{TMP_PREFIX}{dest_dir.name}-"))
    try:
        shutil.copyfile(model_path, tmp / "model.onnx")
        set_metadata(tmp / "model.onnx", metadata)
        if add_files is not None:
            add_files(tmp)
        make_readable(tmp)
        for f in tmp.iterdir():
            make_readable(f)
        if dest_dir.exists():
            old = dest_dir.with_name(f".old-{dest_dir.name}-{os.getpid()}")
            os.replace(dest_dir, old)
            os.replace(tmp, dest_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir / "model.onnx"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    write_atomic_bytes(path, text.encode())


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        make_readable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
