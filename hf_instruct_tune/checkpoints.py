"""Checkpoints written whole or not at all, their discovery, Ctrl-C handling, and the atomic replacement of a folder.

A checkpoint is written into ``checkpoints/.staging/checkpoint-N`` and renamed to ``checkpoints/checkpoint-N``
once every file is on disk, so a ``checkpoint-N`` folder is always complete, wherever the process was killed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

from .errors import InstructTuneError

CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".staging"  # inside CHECKPOINTS_DIR; never resumed from
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(folder: str | Path | None) -> int | None:
    """The step of a ``checkpoint-N`` folder, or None for any other name (or none)."""
    match = _CHECKPOINT.match(Path(folder).name) if folder else None
    return int(match.group(1)) if match else None


def _checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted((step, path) for path in folder.iterdir() if (step := checkpoint_step(path)) is not None)


def is_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was fully written: its trainer state, which the Trainer writes last, parses."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (one with a readable trainer state)."""
    complete = [path for _, path in _checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete checkpoints that a crash or a full disk left half-written; return what was removed."""
    removed = [path for _, path in _checkpoints(output_dir) if not is_complete(path)]
    staging = Path(output_dir) / CHECKPOINTS_DIR / STAGING_DIR
    if staging.is_dir():
        removed += sorted(staging.iterdir())
        shutil.rmtree(staging, ignore_errors=True)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_checkpoint(staged: Path, run_dir: Path) -> Path:
    """Flush the checkpoint written in ``staged`` to disk and rename it into ``run_dir``; return its new path.

    A checkpoint of the same step already there (left by an earlier run) is replaced, never merged.
    """
    for path in staged.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(staged)
    target = run_dir / staged.name
    aside = run_dir / STAGING_DIR / f"{staged.name}.old"
    if target.exists():
        os.rename(target, aside)
    os.rename(staged, target)
    _fsync(run_dir)
    shutil.rmtree(aside, ignore_errors=True)
    try:
        (run_dir / STAGING_DIR).rmdir()
    except OSError:  # not empty: another rank's files, or a leftover removed on --resume
        pass
    return target


class SaveOnInterrupt(TrainerCallback):
    """On Ctrl-C (SIGINT) or SIGTERM, finish the current step, save a checkpoint and stop cleanly."""

    def __init__(self):
        self.interrupted = False
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control

    def _handle(self, signum, frame):
        if self.interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.interrupted = True


class DiskFullError(InstructTuneError):
    exit_code = 1
