"""Interrupted training: SIGKILL then --resume matches an uninterrupted run; Ctrl-C saves; saves are atomic."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import slow_cli_script

from hf_instruct_tune.checkpoints import CHECKPOINTS_DIR, last_checkpoint
from hf_instruct_tune.cli import main
from hf_instruct_tune.metadata import METADATA_FILE_NAME

ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_checkpoint(root / "tiny")
    words = ["hello", "world", "classify", "the", "sentiment", "yes", "no", "maybe", "Paris", "France"]
    rows = [{"instruction": f"{words[i % 10]} {words[(3 * i) % 10]} {i}", "output": words[(7 * i) % 10]}
            for i in range(20)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model, data


def _args(setup, out: Path, *extra: str, steps: int = 12) -> list[str]:
    model, data = setup
    # 20 rows at 2 x 2 per step: an epoch is 5 steps, so checkpoint 4 (and 8) falls mid-epoch.
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", str(steps),
            "--save-steps", "4", "--batch-size", "2", "--grad-accum", "2", "--lora-r", "4", "--target-modules",
            "q_proj,v_proj", "--lr", "5e-3", "--warmup-steps", "2", "--seed", "11", "--max-length", "64",
            "--save-total-limit", "3", *extra]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """An uninterrupted run, in this process."""
    out = tmp_path_factory.mktemp("reference") / "adapter"
    assert main(_args(setup, out)) == 0
    return out


def _start(argv: list[str], *, delay: float) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", slow_cli_script(delay), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(process: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before {path} appeared:\n"
                                 f"{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.02)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ADAPTER))


def _loss_history(folder: Path) -> list[dict]:
    return json.loads((folder / METADATA_FILE_NAME).read_text())["results"]["loss_history"]


def _record_steps(monkeypatch) -> list[int]:
    """The optimizer steps that in-process runs train from now on, by the global step each one reaches.

    A resumed run trains only the steps after its checkpoint; a restart from scratch would train all of them
    and, being deterministic, reproduce the same adapter, so the weights alone cannot tell the two apart.
    """
    from hf_instruct_tune.checkpoints import SaveOnInterrupt

    trained: list[int] = []
    step_end = SaveOnInterrupt.on_step_end

    def record(self, args, state, control, **kwargs):
        trained.append(state.global_step)
        return step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(SaveOnInterrupt, "on_step_end", record)
    return trained


def _assert_same_run(folder: Path, reference: Path) -> None:
    ours, theirs = _weights(folder), _weights(reference)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    history, expected = _loss_history(folder), _loss_history(reference)
    assert [entry["step"] for entry in history] == list(range(1, 13))
    assert [entry["step"] for entry in history] == [entry["step"] for entry in expected]
    torch.testing.assert_close([e["loss"] for e in history], [e["loss"] for e in expected], rtol=1e-5, atol=1e-6)


def test_sigkill_then_resume_matches_an_uninterrupted_run(setup, reference, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    process = _start(_args(setup, out), delay=0.3)
    _wait_for(process, out / CHECKPOINTS_DIR / "checkpoint-4" / "trainer_state.json")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "adapter_config.json").exists(), "the run finished before it was killed"
    kept = last_checkpoint(out)
    assert kept is not None and kept.name in {"checkpoint-4", "checkpoint-8"}
    # What a kill during an unstaged save would leave behind: a run's folder without its trainer state (written
    # last), and one whose trainer state was cut short. Neither may be resumed from. A folder of the user's
    # named like a checkpoint (no run metadata) is neither resumed from nor removed.
    step = int(kept.name.split("-")[1])
    partial = out / CHECKPOINTS_DIR / f"checkpoint-{step + 1}"
    partial.mkdir(exist_ok=True)
    (partial / ADAPTER).write_bytes(b"\0" * 10)
    torn = out / CHECKPOINTS_DIR / f"checkpoint-{step + 2}"
    torn.mkdir(exist_ok=True)
    (torn / "trainer_state.json").write_text('{"global_step": ')
    for folder in (partial, torn):
        (folder / METADATA_FILE_NAME).write_text((kept / METADATA_FILE_NAME).read_text())
    users = out / CHECKPOINTS_DIR / "checkpoint-99"
    users.mkdir()
    (users / "trainer_state.json").write_text('{"global_step": 99}')
    assert last_checkpoint(out) == kept

    trained = _record_steps(monkeypatch)
    assert main(_args(setup, out, "--resume")) == 0
    assert trained == list(range(step + 1, 13))
    assert not partial.exists() and not torn.exists()
    assert (users / "trainer_state.json").read_text() == '{"global_step": 99}'
    _assert_same_run(out, reference)


def test_resume_without_a_checkpoint_is_an_input_error(setup, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(_args(setup, out, "--resume")) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert not out.exists()


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(setup, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    process = _start(_args(setup, out, steps=40), delay=0.3)
    _wait_for(process, out / CHECKPOINTS_DIR / "checkpoint-4" / "trainer_state.json")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "interrupted at step" in line and "--resume" in line
    saved = last_checkpoint(out)
    assert saved is not None and str(saved) in line
    step = json.loads((saved / "trainer_state.json").read_text())["global_step"]
    assert 4 < step < 40 and saved.name == f"checkpoint-{step}"
    assert not (out / "adapter_config.json").exists()

    trained = _record_steps(monkeypatch)
    assert main(_args(setup, out, "--resume", steps=step + 2)) == 0
    assert trained == [step + 1, step + 2]
    assert json.loads((out / METADATA_FILE_NAME).read_text())["results"]["global_step"] == step + 2


# -- the final save --------------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_existing_adapter_needs_overwrite(setup, reference, tmp_path, capsys):
    before = _snapshot(reference)
    assert main(_args(setup, reference)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _snapshot(reference) == before


def test_crash_during_the_final_save_keeps_the_previous_adapter(setup, tmp_path, monkeypatch):
    from hf_instruct_tune.trainer import InstructTrainer

    out = tmp_path / "adapter"
    assert main(_args(setup, out, steps=4)) == 0
    before = _snapshot(out)
    save = InstructTrainer.save_model

    def crash_in_final_save(self, output_dir=None, _internal_call=False):
        if output_dir and ".staged" in str(output_dir):
            save(self, output_dir, _internal_call)  # half of the files are written...
            raise RuntimeError("simulated crash during the final save")
        return save(self, output_dir, _internal_call)

    monkeypatch.setattr(InstructTrainer, "save_model", crash_in_final_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_args(setup, out, "--overwrite", "--lr", "1e-1", steps=4))
    assert _snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")], "a staged folder was left behind"

    monkeypatch.setattr(InstructTrainer, "save_model", save)
    assert main(_args(setup, out, "--overwrite", "--lr", "1e-1", steps=4)) == 0
    assert _snapshot(out)[ADAPTER] != before[ADAPTER]


def _disk_full_in(monkeypatch, fragment: str) -> None:
    import peft.peft_model

    save_file = peft.peft_model.safe_save_file

    def full(tensors, filename, *args, **kwargs):
        if fragment in str(filename):
            with open(filename, "wb") as handle:  # a partial file, as a full disk leaves it
                handle.write(b"\0" * 16)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)


def test_disk_full_during_the_final_save(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "adapter"
    _disk_full_in(monkeypatch, ".staged")
    assert main(_args(setup, out)) == 1
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "disk full" in line and "checkpoint-12" in line and "intact" in line and "Traceback" not in err
    kept = last_checkpoint(out)
    assert kept.name == "checkpoint-12"
    assert set(_weights(kept)) and not (out / "adapter_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]


def test_disk_full_during_a_checkpoint_then_resume(setup, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "adapter"
    _disk_full_in(monkeypatch, "checkpoint-8")
    assert main(_args(setup, out)) == 1
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "disk full while saving a checkpoint" in line and "checkpoint-4" in line and "--resume" in line
    assert last_checkpoint(out).name == "checkpoint-4"
    assert not (out / CHECKPOINTS_DIR / "checkpoint-8").exists()
    assert set(_weights(out / CHECKPOINTS_DIR / "checkpoint-4"))

    import peft.peft_model
    from safetensors.torch import save_file

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)  # space was freed
    trained = _record_steps(monkeypatch)
    assert main(_args(setup, out, "--resume")) == 0
    assert trained == list(range(5, 13))
    _assert_same_run(out, reference)


# -- kills during a checkpoint write -----------------------------------------------------------------

# Runs `hf-instruct-tune ARGV` and SIGKILLs itself at the K-th write event while checkpoint 8 is saved
# (K = 0: never), logging each event. Events: a file opened for writing under the output folder, a rename,
# and the start and end of each tensor file written by torch or safetensors (their writers are not Python).
KILL_MAIN = r"""
import os, signal, sys
import hf_instruct_tune.trainer as trainer_module

target, log, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
state = {"count": 0, "active": False}

def point(what):
    if not state["active"]:
        return
    state["active"] = False  # no events from the logging itself
    state["count"] += 1
    os.write(log_fd, f"{state['count']} {what}\n".encode())
    if state["count"] == target:
        os.kill(os.getpid(), signal.SIGKILL)
    state["active"] = True

def audit(event, args):
    if event == "open" and root in str(args[0]):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        if (mode and any(c in mode for c in "wax+")) or (not mode and flags & (os.O_WRONLY | os.O_RDWR)):
            point(f"open {os.path.relpath(str(args[0]), root)}")
    elif event in ("os.rename", "os.replace") and root in str(args[0]):
        point(f"rename {os.path.relpath(str(args[0]), root)}")

sys.addaudithook(audit)

def around(module, name):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        where = next((str(a) for a in (*args, *kwargs.values()) if isinstance(a, (str, os.PathLike))), "?")
        point(f"start {name} {os.path.relpath(where, root)}")
        result = original(*args, **kwargs)
        point(f"end {name} {os.path.relpath(where, root)}")
        return result
    setattr(module, name, wrapper)

import torch, peft.peft_model
around(torch, "save")
around(peft.peft_model, "safe_save_file")

save_checkpoint = trainer_module.InstructTrainer._save_checkpoint
def watched(self, model, trial):
    state["active"] = self.state.global_step == 8
    try:
        save_checkpoint(self, model, trial)
        point("saved")
    finally:
        state["active"] = False
trainer_module.InstructTrainer._save_checkpoint = watched

from hf_instruct_tune.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _run_killing_at(setup, out: Path, kill_at: int, log: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", KILL_MAIN, str(kill_at), str(log), str(out), *_args(setup, out)],
                          env=env, capture_output=True, text=True, timeout=300)


def _kill_points(count: int) -> list[int]:
    """Every write event with KILL_POINTS=all, else a spread of them that CI can afford (first, last, between)."""
    if os.environ.get("KILL_POINTS") == "all":
        return list(range(1, count + 1))
    wanted = 4
    return sorted({round(1 + i * (count - 1) / (wanted - 1)) for i in range(wanted)})


def test_a_kill_anywhere_in_a_checkpoint_write_resumes_to_the_uninterrupted_run(setup, reference, tmp_path,
                                                                                 monkeypatch):
    probe = tmp_path / "probe"
    probe.mkdir()
    result = _run_killing_at(setup, probe / "adapter", 0, probe / "events.log")
    assert result.returncode == 0, result.stderr[-3000:]
    events = (probe / "events.log").read_text().splitlines()
    assert any("adapter_model.safetensors" in event for event in events)
    assert any("optimizer.pt" in event for event in events)
    assert any(event.split()[1] == "rename" for event in events)
    complete = sorted(path.name for path in (probe / "adapter" / CHECKPOINTS_DIR / "checkpoint-8").iterdir())

    resumed_from = set()
    trained = _record_steps(monkeypatch)
    for kill_at in _kill_points(len(events)):
        out, log = tmp_path / f"kill-{kill_at}" / "adapter", tmp_path / f"kill-{kill_at}.log"
        out.parent.mkdir()
        result = _run_killing_at(setup, out, kill_at, log)
        assert result.returncode == -signal.SIGKILL, (kill_at, result.stderr[-3000:])
        last_event = log.read_text().splitlines()[-1]
        for folder in (out / CHECKPOINTS_DIR).glob("checkpoint-*"):  # any checkpoint in place is whole
            assert sorted(path.name for path in folder.iterdir()) == complete, (last_event, folder.name)
        kept = last_checkpoint(out)
        step = int(kept.name.split("-")[1])
        resumed_from.add(step)

        trained.clear()
        assert main(_args(setup, out, "--resume")) == 0, last_event
        assert trained == list(range(step + 1, 13)), last_event
        _assert_same_run(out, reference)
    assert resumed_from == {4, 8}  # kills landed both before and after the rename
