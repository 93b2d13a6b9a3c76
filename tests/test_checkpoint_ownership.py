"""Which checkpoint folders are a run's, and that rotation, --overwrite and --resume remove only those.

A run's checkpoint is a ``checkpoint-N`` folder holding the run's ``hf_instruct_tune.json``; anything else under
``checkpoints/`` is the user's, whatever its name. (``tests/test_outputs.py`` and ``tests/test_resume.py`` check
the same through the CLI.)
"""

from __future__ import annotations

import os
from pathlib import Path

from hf_instruct_tune.checkpoints import (CHECKPOINTS_DIR, STAGING_DIR, holds_run_checkpoints, last_checkpoint,
                                          remove_incomplete_checkpoints, remove_run_checkpoints,
                                          rotate_run_checkpoints)
from hf_instruct_tune.metadata import METADATA_FILE_NAME


def _run_checkpoint(run_dir: Path, step: int, *, age: int, complete: bool = True) -> Path:
    """A checkpoint a run wrote ``age`` seconds ago (older ones first in rotation)."""
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / METADATA_FILE_NAME).write_text("{}")
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}' if complete else '{"global_')
    when = 1_700_000_000 - age
    os.utime(folder, (when, when))
    return folder


def _users(run_dir: Path) -> list[Path]:
    mine = run_dir / "checkpoint-7"
    mine.mkdir(parents=True)
    (mine / "trainer_state.json").write_text('{"global_step": 7}')  # looks complete, holds no run metadata
    (run_dir / "notes.txt").write_text("mine")
    return [mine / "trainer_state.json", run_dir / "notes.txt"]


def test_rotation_keeps_the_newest_and_the_best_of_the_runs_checkpoints_and_none_of_the_users_goes(tmp_path):
    run_dir = tmp_path / "run"
    first, second, third, fourth = (_run_checkpoint(run_dir, step, age=40 - step) for step in (2, 4, 6, 8))
    users = _users(run_dir)
    rotate_run_checkpoints(run_dir, 2, best=str(first))
    assert sorted(path.name for path in run_dir.iterdir()) == ["checkpoint-2", "checkpoint-7", "checkpoint-8",
                                                                "notes.txt"]
    assert all(path.is_file() for path in users)
    rotate_run_checkpoints(run_dir, 1)  # the newest stays, also at a limit of one
    assert not first.exists() and fourth.exists() and not second.exists() and not third.exists()
    assert all(path.is_file() for path in users)


def test_an_earlier_runs_higher_steps_are_older(tmp_path):
    run_dir = tmp_path / "run"
    earlier = _run_checkpoint(run_dir, 50, age=100)
    now = [_run_checkpoint(run_dir, step, age=10 - step) for step in (1, 2)]
    rotate_run_checkpoints(run_dir, 2)
    assert not earlier.exists() and all(path.exists() for path in now)


def test_overwrite_and_resume_remove_only_the_runs_checkpoints(tmp_path):
    out = tmp_path / "out"
    run_dir = out / CHECKPOINTS_DIR
    kept = _run_checkpoint(run_dir, 4, age=20)
    torn = _run_checkpoint(run_dir, 5, age=10, complete=False)
    staged = run_dir / STAGING_DIR / "checkpoint-6"
    staged.mkdir(parents=True)
    users = _users(run_dir)
    assert last_checkpoint(out) == kept  # neither the torn one nor the user's checkpoint-7
    assert sorted(path.name for path in remove_incomplete_checkpoints(out)) == ["checkpoint-5", "checkpoint-6"]
    assert kept.exists() and not torn.exists() and not (run_dir / STAGING_DIR).exists()
    assert sorted(path.name for path in remove_run_checkpoints(out)) == ["checkpoint-4"]
    assert sorted(path.name for path in run_dir.iterdir()) == ["checkpoint-7", "notes.txt"]
    assert all(path.is_file() for path in users)


def test_a_checkpoints_folder_is_a_runs_when_empty_or_holding_a_runs_checkpoint(tmp_path):
    assert not holds_run_checkpoints(tmp_path / "none")
    (tmp_path / "empty" / CHECKPOINTS_DIR / STAGING_DIR).mkdir(parents=True)
    assert holds_run_checkpoints(tmp_path / "empty")
    _users(tmp_path / "users" / CHECKPOINTS_DIR)
    assert not holds_run_checkpoints(tmp_path / "users")
    (tmp_path / "users" / CHECKPOINTS_DIR / STAGING_DIR / "checkpoint-3").mkdir(parents=True)
    assert holds_run_checkpoints(tmp_path / "users")  # a run was writing its first checkpoint there
    _run_checkpoint(tmp_path / "run" / CHECKPOINTS_DIR, 1, age=1)
    assert holds_run_checkpoints(tmp_path / "run")
