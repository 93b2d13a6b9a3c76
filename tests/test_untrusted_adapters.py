"""An adapter folder from someone's Hub repo is untrusted input: planted files never run, and each is one line.

Each case plants a hostile or broken file in a copy of a real adapter folder, then runs ``generate``,
``card``, ``export`` and ``upload`` on it. Code that would run leaves a marker file; none may appear.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from hf_instruct_tune.cli import main

ROWS = [{"instruction": "hello", "output": "yes"}, {"instruction": "classify the sentiment", "output": "no"}]


class _Touch:
    """Unpickling this object creates ``path``: what a hostile pickle would do, harmlessly."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("untrusted")
    model = save_tiny_checkpoint(root / "tiny")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = root / "adapter"
    assert main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
                 "--lora-r", "2", "--target-modules", "q_proj", "--max-length", "64"]) == 0
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return model, out


def _plant_pickle(folder: Path, marker: Path) -> str:
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Touch(str(marker))))
    return "adapter_model.bin"


def _plant_remote_code(folder: Path, marker: Path) -> str:
    (folder / "evil_tokenizer.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return "tokenizer_config.json"


def _plant_template_escape(folder: Path, marker: Path) -> str:
    (folder / "prompt_template.jinja").write_text(
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
        "{% for m in messages %}{{ m.content }}{% endfor %}")
    return "prompt_template.jinja"


def _plant_huge_metadata(folder: Path, marker: Path) -> str:
    data = json.loads((folder / "hf_instruct_tune.json").read_text())
    data["padding"] = "x" * (2 << 20)
    (folder / "hf_instruct_tune.json").write_text(json.dumps(data))
    return "hf_instruct_tune.json"


def _plant_wrong_types(folder: Path, marker: Path) -> str:
    data = json.loads((folder / "hf_instruct_tune.json").read_text())
    data["template"] = "not an object"
    (folder / "hf_instruct_tune.json").write_text(json.dumps(data))
    return "hf_instruct_tune.json"


def _plant_corrupt_config(folder: Path, marker: Path) -> str:
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    return "adapter_config.json"


def _plant_corrupt_weights(folder: Path, marker: Path) -> str:
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    return "adapter_model.safetensors"


def _plant_deep_json(folder: Path, marker: Path) -> str:
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    return "adapter_config.json"


PLANTS = {"pickle": _plant_pickle, "remote_code": _plant_remote_code, "template_escape": _plant_template_escape,
          "huge_metadata": _plant_huge_metadata, "wrong_types": _plant_wrong_types,
          "corrupt_config": _plant_corrupt_config, "corrupt_weights": _plant_corrupt_weights,
          "deep_json": _plant_deep_json}


def _commands(model: Path, folder: Path, out: Path) -> dict[str, list[str]]:
    return {
        "generate": ["generate", "--adapter", str(folder), "--model", str(model), "--instruction", "hello",
                     "--max-new-tokens", "2"],
        "card": ["card", str(folder)],
        "export": ["export", "--adapter", str(folder), "--merged", str(out), "--base", str(model)],
    }


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_a_hostile_adapter_folder_runs_nothing_and_fails_in_one_line(trained, plant, tmp_path, capsys):
    model, adapter = trained
    folder = tmp_path / "downloaded"
    shutil.copytree(adapter, folder)
    marker = tmp_path / "code-ran"
    planted = PLANTS[plant](folder, marker)
    capsys.readouterr()
    outcomes = {}
    for name, argv in _commands(model, folder, tmp_path / "merged").items():
        code = main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err, (name, err[-2000:])
        assert not marker.exists(), f"{name} ran code planted in {planted}"
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        if code != 0:
            assert code == 2 and len(lines) == 1 and planted in lines[0], (name, err[-2000:])
        outcomes[name] = code
    assert outcomes["generate"] == 2
    if plant != "template_escape":  # export copies the template without rendering it
        assert outcomes["export"] == 2
        assert not (tmp_path / "merged").exists()  # nothing half-written


def test_a_hostile_folder_uploads_without_running_anything(trained, tmp_path, hub_server, capsys):
    _, adapter = trained
    folder = tmp_path / "downloaded"
    shutil.copytree(adapter, folder)
    marker = tmp_path / "code-ran"
    _plant_corrupt_config(folder, marker)
    argv = ["upload", "alice/hostile", str(folder), "--endpoint", hub_server.url, "--token", hub_server.token]
    assert main(argv) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "adapter_config.json" in line and "Traceback" not in err


def test_the_clean_folder_works_with_every_command(trained, tmp_path, capsys):
    model, adapter = trained
    for name, argv in _commands(model, adapter, tmp_path / "merged").items():
        assert main(argv) == 0, (name, capsys.readouterr().err[-2000:])
    assert (tmp_path / "merged" / "model.safetensors").is_file()
