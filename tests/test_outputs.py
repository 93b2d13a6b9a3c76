"""The user's files are safe: train never replaces or deletes them, upload never publishes them unasked.

Also: every file a run writes is readable like any other (0644 under umask 022), and an adapter whose
LoRA weights never moved is called out after training and refused by upload unless forced.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from hf_instruct_tune.cli import main

ROWS = [{"instruction": "hello", "output": "yes"}, {"instruction": "classify the sentiment", "output": "no"},
        {"instruction": "Paris is the capital of", "output": "France"}, {"instruction": "hello world", "output": "maybe"}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def _train(tiny_model, tmp_path, out: Path, *extra: str) -> int:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return main(["train", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
                 "--save-steps", "1", "--batch-size", "2", "--lora-r", "2", "--target-modules", "q_proj",
                 "--max-length", "64", "--lr", "1e-2", *extra])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    return line


def test_a_folder_of_the_users_files_is_refused_and_left_alone(tiny_model, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    for extra in ([], ["--overwrite"]):
        assert _train(tiny_model, tmp_path, out, *extra) == 2
        line = _error_line(capsys)
        assert str(out) in line and "output_dir" in line and "notes.txt" in line
        assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
        assert (out / "notes.txt").read_text() == "my notes"
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def _plant_users_checkpoints(out: Path) -> None:
    """A ``checkpoints`` folder holding the user's own files, one of them named like a checkpoint."""
    (out / "checkpoints" / "checkpoint-100").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-100" / "weights.pt").write_text("my weights")
    (out / "checkpoints" / "notes.txt").write_text("my notes")


def _users_checkpoints_intact(out: Path) -> bool:
    return ((out / "checkpoints" / "checkpoint-100" / "weights.pt").read_text() == "my weights"
            and (out / "checkpoints" / "notes.txt").read_text() == "my notes")


def test_a_checkpoints_folder_of_the_users_is_no_earlier_run(tiny_model, tmp_path, capsys):
    out = tmp_path / "project"
    _plant_users_checkpoints(out)
    (out / "README.md").write_text("my project")
    assert _train(tiny_model, tmp_path, out) == 2
    line = _error_line(capsys)
    assert "holds no earlier run" in line and "checkpoints" in line
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "checkpoints"]
    assert _users_checkpoints_intact(out) and (out / "README.md").read_text() == "my project"


def test_a_run_stopped_before_its_first_checkpoint_can_be_run_again(tiny_model, tmp_path):
    """The Trainer makes ``checkpoints`` when it starts: a run killed before its first checkpoint leaves it empty."""
    out = tmp_path / "adapter"
    (out / "checkpoints" / ".staging").mkdir(parents=True)
    assert _train(tiny_model, tmp_path, out) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_the_users_files_among_a_runs_checkpoints_outlive_rotation_overwrite_and_resume(tiny_model, tmp_path):
    out = tmp_path / "adapter"
    assert _train(tiny_model, tmp_path, out) == 0
    _plant_users_checkpoints(out)
    # --overwrite removes the replaced run's checkpoints; three new ones, two kept (save_total_limit)
    assert _train(tiny_model, tmp_path, out, "--overwrite", "--max-steps", "3") == 0
    runs = sorted(path.name for path in (out / "checkpoints").iterdir() if path.name != "checkpoint-100")
    assert runs == ["checkpoint-2", "checkpoint-3", "notes.txt"]
    assert _users_checkpoints_intact(out)
    # --resume removes half-written checkpoints, never a folder of the user's that only looks like one
    assert _train(tiny_model, tmp_path, out, "--resume", "--max-steps", "4") == 0
    assert json.loads((out / "hf_instruct_tune.json").read_text())["results"]["global_step"] == 4
    assert _users_checkpoints_intact(out)


def test_overwrite_replaces_only_what_a_run_wrote(tiny_model, tmp_path):
    out = tmp_path / "adapter"
    assert _train(tiny_model, tmp_path, out) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    (out / "notes.txt").write_text("my notes")
    (out / "answers").mkdir()
    (out / "answers" / "training_answers.jsonl").write_text('{"answer": "yes"}\n')
    assert _train(tiny_model, tmp_path, out, "--overwrite", "--lr", "5e-2") == 0
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "answers" / "training_answers.jsonl").read_text() == '{"answer": "yes"}\n'
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".adapter")]
    # the replaced run's checkpoints are gone, so --resume cannot continue the wrong run
    assert _train(tiny_model, tmp_path, out, "--overwrite", "--max-steps", "1") == 0
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["checkpoint-1"]


def test_every_file_a_run_writes_is_readable(tiny_model, tmp_path):
    out = tmp_path / "adapter"
    previous = os.umask(0o022)
    try:
        assert _train(tiny_model, tmp_path, out) == 0
    finally:
        os.umask(previous)
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.name == "adapter_model.safetensors" for path in files)
    modes = {path.relative_to(out).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in files}
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}


def test_upload_sends_what_the_run_wrote_and_other_files_only_when_named(tiny_model, tmp_path, hub_server, caplog):
    out = tmp_path / "adapter"
    assert _train(tiny_model, tmp_path, out) == 0
    (out / "training_answers.jsonl").write_text('{"instruction": "hello", "answer": "yes"}\n')
    (out / "notes.txt").write_text("my notes")
    recorded = json.loads((out / "hf_instruct_tune.json").read_text())["files"]
    assert "adapter_model.safetensors" in recorded and "notes.txt" not in recorded

    argv = ["upload", "alice/demo", str(out), "--endpoint", hub_server.url, "--token", hub_server.token]
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    files = set(HfApi(endpoint=hub_server.url, token=hub_server.token).list_repo_files("alice/demo"))
    assert {"adapter_model.safetensors", "adapter_config.json", "hf_instruct_tune.json", "README.md"} <= files
    assert not files & {"training_answers.jsonl", "notes.txt", "training_args.bin"}
    assert not any(name.startswith("checkpoints") for name in files)
    assert "training_answers.jsonl" in caplog.text and "--include" in caplog.text

    assert main([*argv, "--include", "training_answers.jsonl"]) == 0
    files = set(HfApi(endpoint=hub_server.url, token=hub_server.token).list_repo_files("alice/demo"))
    assert "training_answers.jsonl" in files and "notes.txt" not in files


def test_an_adapter_that_never_moved_is_reported_and_not_published(tiny_model, tmp_path, hub_server, capsys):
    out = tmp_path / "adapter"
    assert _train(tiny_model, tmp_path, out, "--lr", "1e-50") == 0  # too small to move a float32 weight
    err = capsys.readouterr().err
    assert "did not move" in err and "--force" in err
    argv = ["upload", "alice/still", str(out), "--endpoint", hub_server.url, "--token", hub_server.token]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "never moved" in line and "--force" in line
    api = HfApi(endpoint=hub_server.url, token=hub_server.token)
    assert not api.repo_exists("alice/still")
    assert main([*argv, "--force"]) == 0
    assert "adapter_model.safetensors" in api.list_repo_files("alice/still")

    trained = tmp_path / "trained"
    assert _train(tiny_model, tmp_path, trained) == 0
    assert "did not move" not in capsys.readouterr().err
