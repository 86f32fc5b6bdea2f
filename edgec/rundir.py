"""The run directory: refusing to clobber, a lock a killed run cannot leave stuck, the study store.

Layout (DESIGN.md): ``report.json``, ``report.html``, ``candidates.csv``,
``manifest.json``, ``artifacts/<target>/<candidate-id>/model.onnx`` and
``study/`` (``config.json``, ``evaluations.jsonl``, compiled models under ``models/``), and
``pruned/`` (``edgec compile --prune-flops-target``: a run directory of its own).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from edgec.errors import OutputDirError


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (standard library only: the app-side runtimes use it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


OUTPUTS = ("report.json", "report.html", "candidates.csv", "manifest.json", "artifacts", "study", "pruned")
LOCK = ".edgec.lock"
PREVIOUS = ".tmp-previous-run"  # --force on a job without --resume: the replaced outputs, kept until it succeeds
TMP_PREFIX = ".tmp-"  # every write through a temporary file and a rename names its temporary this way, so what
#                      a kill mid-write leaves is recognised (and swept) here


def _leftover(child: Path) -> bool:
    return child.name.startswith(TMP_PREFIX)


class RunDir:
    """An opened, locked run directory. Use as a context manager."""

    def __init__(self, path: Path, *, resume: bool = False, force: bool = False, resumable: bool = True) -> None:
        """``resumable=False``: a job without ``--resume`` (``edgec prune``) — the refusal of a non-empty
        folder does not offer it, and an interrupted fresh run (Ctrl-C) leaves nothing behind."""
        self.path = path
        self.resumable = resumable
        self._lock_fd: int | None = None
        self._backup: Path | None = None  # --force without --resume: where the replaced outputs wait
        self._created = not path.exists()
        self._fresh = self._created or (path.is_dir() and (not any(path.iterdir()) or self._skeleton_only(path)))
        self._prepare(resume, force)

    @staticmethod
    def _skeleton_only(p: Path) -> bool:
        """``p`` holds only what a run killed before it stored its settings leaves: the lock and an
        empty ``study/models``, or the lock alone when it was killed between the two, and perhaps the
        ``.tmp-`` file of a settings write it was killed in (such a folder counts as empty, so neither a new
        run nor ``--resume`` is refused)."""
        study = p / "study"
        names = {c.name for c in p.iterdir()}
        if not names <= {LOCK, "study"}:
            return False
        if "study" not in names:
            return True
        return (study.is_dir() and not study.is_symlink()
                and {c.name for c in study.iterdir() if not _leftover(c)} <= {"models"}
                and not any((study / "models").iterdir() if (study / "models").is_dir() else ()))

    def _sweep_leftovers(self) -> None:
        """Remove the ``.tmp-`` files and folders a killed run's atomic writes left in the run folder and
        ``study/`` (called with the lock held, so no live writer owns them)."""
        for folder in (self.path, self.path / "study"):
            if not folder.is_dir() or folder.is_symlink():
                continue
            for child in folder.iterdir():
                if _leftover(child):
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)

    def _remove_outputs(self) -> None:
        for name in OUTPUTS:
            target = self.path / name
            if target.is_symlink() or target.is_file():
                target.unlink()  # a link is removed, never followed
            elif target.is_dir():
                shutil.rmtree(target)

    def _prepare(self, resume: bool, force: bool) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise OutputDirError(f"output {p} is a file", "a run directory is needed", "pass another --out")
        skeleton = p.is_dir() and self._skeleton_only(p)
        contents = [c.name for c in p.iterdir() if c.name != LOCK] if p.is_dir() and not skeleton else []
        if resume and not skeleton and not (p / "study" / "config.json").is_file():
            raise OutputDirError(f"nothing to resume in {p}",
                                 "it holds no edgec study" if p.exists() else "it does not exist",
                                 "drop --resume to start a new run")
        if contents and not resume and not force:
            raise OutputDirError(f"output directory {p} is not empty", "edgec will not overwrite it",
                                 "pass --resume to continue that run, --force to replace it, or another --out"
                                 if self.resumable else "pass --force to replace it, or another --out")
        try:
            p.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(p / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputDirError(f"cannot write to output directory {p}", e.strerror or str(e),
                                 "pass a writable --out") from None
        try:
            # flock is released by the kernel when the holder dies, so a killed run never leaves it stuck.
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise OutputDirError(f"output directory {p} is in use", "another edgec run holds its lock",
                                 "wait for it to finish or pass another --out") from None
        self._sweep_leftovers()
        if force and not self.resumable and not self._fresh:  # kept aside, put back if this run fails or stops
            self._backup = p / PREVIOUS
            self._backup.mkdir()
            for name in OUTPUTS:
                if (p / name).exists() or (p / name).is_symlink():
                    os.replace(p / name, self._backup / name)
        elif force:
            self._remove_outputs()
        (p / "study" / "models").mkdir(parents=True, exist_ok=True)

    @property
    def study(self) -> Path:
        return self.path / "study"

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._backup is not None:  # --force without --resume: put the old run back, or drop it
            if exc_type is not None:
                self._remove_outputs()
                for child in self._backup.iterdir():
                    os.replace(child, self.path / child.name)
                self._backup.rmdir()
            else:
                shutil.rmtree(self._backup)
        # A run that failed before storing any evaluation in a folder that was empty leaves nothing
        # behind, so the corrected command is not refused as "not empty". (Ctrl-C keeps it: --resume.)
        if exc_type is not None and (issubclass(exc_type, Exception) or not self.resumable) and self._fresh:
            evals = self.study / "evaluations.jsonl"
            if not evals.is_file() or evals.stat().st_size == 0:
                self._remove_outputs()
                (self.path / LOCK).unlink(missing_ok=True)
                if self._created:
                    shutil.rmtree(self.path, ignore_errors=True)
        self.close()


class EvaluationStore:
    """Append-only JSON-lines store of evaluation results, keyed by candidate id.

    Each line is written and flushed (fsync) when its evaluation completes, so a
    killed run loses at most the evaluation in flight; a torn last line is ignored.
    """

    def __init__(self, path: Path, validate: Callable[[dict], None] | None = None) -> None:
        """``validate(record)`` raises on a malformed record; such lines are skipped (and re-evaluated)."""
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        self.skipped = 0
        if path.is_file():
            text = path.read_text()
            if text and not text.endswith("\n"):  # a line torn by a kill: drop it before appending
                text = text[:text.rfind("\n") + 1]
                path.write_text(text)
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or not isinstance(rec.get("candidate_id"), str):
                        raise ValueError("not an evaluation record")
                    if validate:
                        validate(rec)
                except Exception:  # damaged by hand or by a kill: evaluate that candidate again
                    self.skipped += 1
                    continue
                self.records[rec["candidate_id"]] = rec

    def get(self, candidate_id: str) -> dict[str, Any] | None:
        return self.records.get(candidate_id)

    def add(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["candidate_id"]] = record
