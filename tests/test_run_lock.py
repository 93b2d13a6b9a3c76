"""One run per output folder: a second train is refused while the first is alive, and a killed run locks nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import slow_cli_script

from hf_instruct_tune.checkpoints import CHECKPOINTS_DIR
from hf_instruct_tune.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("lock")
    model = save_tiny_checkpoint(root / "tiny")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"hello {i}", "output": "yes"}) + "\n" for i in range(8)))
    return model, data


def _args(setup, out: Path, *extra: str) -> list[str]:
    model, data = setup
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "40",
            "--save-steps", "2", "--batch-size", "2", "--lora-r", "2", "--target-modules", "q_proj",
            "--max-length", "64", *extra]


def test_a_second_run_into_a_busy_folder_is_refused_until_the_first_dies(setup, tmp_path, capsys):
    out = tmp_path / "adapter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-c", slow_cli_script(0.5), *_args(setup, out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINTS_DIR / "checkpoint-2").is_dir():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run wrote no checkpoint"
            time.sleep(0.05)
        before = sorted(path.name for path in (out / CHECKPOINTS_DIR).iterdir())

        for extra in ([], ["--resume"], ["--overwrite"]):
            assert main(_args(setup, out, *extra, "--max-steps", "2")) == 2
            err = capsys.readouterr().err
            [line] = [line for line in err.splitlines() if line.startswith("error:")]
            assert "another training run" in line and str(first.pid) in line and str(out) in line
            assert "Traceback" not in err
        assert first.poll() is None
        assert set(before) <= {path.name for path in (out / CHECKPOINTS_DIR).iterdir()}
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)

    assert main(_args(setup, out, "--resume", "--max-steps", "6")) == 0  # a killed run holds no lock
    assert (out / "adapter_config.json").is_file()
    assert not (tmp_path / ".adapter.lock").exists()
