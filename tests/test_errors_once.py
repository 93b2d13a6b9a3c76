"""Under a launcher, a bad-input error is printed once (by rank 0) and every process exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_instruct_tune.cli import main

BAD_ROWS = '{"instruction": "hello", "output": "yes"}\n{"instruction": 5\n'


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("errors_once")
    model = save_tiny_checkpoint(root / "tiny")
    data = root / "bad.jsonl"
    data.write_text(BAD_ROWS)
    return root, model, data


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_zero_prints_and_every_rank_exits_2(bad_data, rank, monkeypatch, capsys):
    root, model, data = bad_data
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = root / f"out-{rank}"
    assert main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == (1 if rank == "0" else 0)
    if lines:
        assert str(data) in lines[0] and "line 2" in lines[0]
    assert not out.exists()


def _env(root):
    env = {key: value for key, value in os.environ.items()
           if key not in {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_num_processes_prints_one_line_and_exits_2(bad_data, tmp_path):
    root, model, data = bad_data
    result = subprocess.run([sys.executable, "-m", "hf_instruct_tune", "train", "--model", str(model), "--data",
                             str(data), "--output-dir", str(tmp_path / "out"), "--num-processes", "2"],
                            env=_env(root), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and str(data) in lines[0] and "line 2" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert json.loads(BAD_ROWS.splitlines()[0])  # the first row is fine: the error is the second's
