"""Checkpoints written whole or not at all, their discovery, Ctrl-C handling, and the atomic replacement of a folder.

A checkpoint is written into ``checkpoints/.staging/checkpoint-N`` and renamed to ``checkpoints/checkpoint-N``
once every file is on disk, so a ``checkpoint-N`` folder is always complete, wherever the process was killed.
Every checkpoint holds the run's ``hf_instruct_tune.json``; a folder without it is not a run's, and nothing here
removes it, whatever its name.
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
from .metadata import METADATA_FILE_NAME
from .outputs import CHECKPOINTS_DIR

STAGING_DIR = ".staging"  # inside CHECKPOINTS_DIR; never resumed from
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(folder: str | Path | None) -> int | None:
    """The step of a ``checkpoint-N`` folder, or None for any other name (or none)."""
    match = _CHECKPOINT.match(Path(folder).name) if folder else None
    return int(match.group(1)) if match else None


def is_run_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint a run wrote: a ``checkpoint-N`` folder holding the run's metadata."""
    return checkpoint_step(folder) is not None and (folder / METADATA_FILE_NAME).is_file()


def run_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The ``(step, folder)`` of the checkpoints a run wrote directly under ``run_dir``, by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((checkpoint_step(path), path) for path in run_dir.iterdir() if is_run_checkpoint(path))


def holds_run_checkpoints(output_dir: str | Path) -> bool:
    """Whether ``output_dir/checkpoints`` is a run's: it holds a checkpoint a run wrote or was writing, or nothing
    at all (the Trainer makes the folder when it starts, so a run stopped before its first checkpoint leaves it
    empty)."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return False
    entries = [path for path in folder.iterdir() if not (path.name == STAGING_DIR and not any(path.iterdir()))]
    return not entries or bool(run_checkpoints(folder)) or bool(_staged_entries(folder))


def _staged_entries(run_dir: Path) -> list[Path]:
    """What the staging folder holds of checkpoints being written (``checkpoint-N``) or replaced (``.old``)."""
    staging = run_dir / STAGING_DIR
    if not staging.is_dir():
        return []
    return sorted(path for path in staging.iterdir() if checkpoint_step(path.name.removesuffix(".old")) is not None)


def is_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was fully written: its trainer state, which the Trainer writes last, parses."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (one with a readable trainer state)."""
    complete = [path for _, path in run_checkpoints(Path(output_dir) / CHECKPOINTS_DIR) if is_complete(path)]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete checkpoints that a crash or a full disk left half-written; return what was removed."""
    run_dir = Path(output_dir) / CHECKPOINTS_DIR
    return _remove_with_staged(run_dir, [path for _, path in run_checkpoints(run_dir) if not is_complete(path)])


def remove_run_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete the checkpoints a run wrote under ``output_dir/checkpoints`` (complete, staged or being replaced),
    and the folder if nothing else is left in it; anything else there is the user's and stays."""
    run_dir = Path(output_dir) / CHECKPOINTS_DIR
    removed = _remove_with_staged(run_dir, [path for _, path in run_checkpoints(run_dir)])
    _remove_if_empty(run_dir)
    return removed


def _remove_with_staged(run_dir: Path, checkpoints: list[Path]) -> list[Path]:
    """Delete ``checkpoints`` and what the staging folder holds of a run's, then the staging folder if empty;
    returns what was deleted."""
    removed = checkpoints + _staged_entries(run_dir)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    _remove_if_empty(run_dir / STAGING_DIR)
    return removed


def rotate_run_checkpoints(run_dir: str | Path, save_total_limit: int | None, best: str | None = None) -> None:
    """Delete the oldest of the checkpoints a run wrote in ``run_dir`` until ``save_total_limit`` are left, never
    the newest nor the ``best`` one (as the Trainer's rotation does, but only among a run's checkpoints). Oldest by
    modification time, then step."""
    if not save_total_limit or save_total_limit <= 0:
        return
    by_age = sorted(run_checkpoints(run_dir), key=lambda item: (item[1].stat().st_mtime_ns, item[0]))
    ordered = [path for _, path in by_age]
    if len(ordered) <= save_total_limit:
        return
    protected = {ordered[-1]} | ({Path(best)} if best else set())
    remaining = len(ordered)
    for path in ordered:
        if remaining <= max(save_total_limit, len(protected)):
            break
        if path not in protected:
            shutil.rmtree(path, ignore_errors=True)
            remaining -= 1


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not there, or not empty
        pass


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
    _remove_if_empty(run_dir / STAGING_DIR)  # not empty: another rank's files, or a leftover removed on --resume
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
