"""Secrets: the Hub token never reaches a file, a log record, stdout/stderr or an error message."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest

from hf_instruct_tune.cli import main

ROWS = [{"instruction": "hello", "output": "yes"}, {"instruction": "classify the sentiment", "output": "no"},
        {"instruction": "Paris is the capital of", "output": "France"}, {"instruction": "hello world", "output": "maybe"}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """Route every temporary file of this process into the test's folder, so it can be searched."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _argv(tiny_model, tmp_path, *extra) -> list[str]:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return ["train", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(tmp_path / "out"),
            "--max-steps", "4", "--save-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "2",
            "--target-modules", "q_proj", "--max-length", "64", *extra]


def _files_containing(roots: list[Path], secret: str) -> list[Path]:
    needle = secret.encode()
    return [path for root in roots for path in root.rglob("*") if path.is_file() and needle in path.read_bytes()]


def _records_text(caplog) -> str:
    return "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)


def test_training_and_pushing_leaves_no_token_anywhere(tiny_model, tmp_path, private_tmp, hub_server, monkeypatch,
                                                      capsys, caplog):
    import torch

    token = hub_server.token
    monkeypatch.setenv("HF_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    assert main(_argv(tiny_model, tmp_path, "--push-to", "alice/secret-test")) == 0
    captured = capsys.readouterr()

    out = tmp_path / "out"
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "the run wrote no checkpoint to search"
    from huggingface_hub import HfApi

    published = HfApi(endpoint=hub_server.url, token=token).list_repo_files("alice/secret-test")
    assert "adapter_model.safetensors" in published  # the token was used
    assert not [name for name in published if name.endswith((".bin", ".pt", ".pth"))], published  # no pickles

    roots = [tmp_path, hub_server.root]  # output dir with checkpoints, HF_HOME, TMPDIR, data; what was published
    assert (tmp_path / "hf_home").parent == tmp_path
    assert _files_containing(roots, token) == []
    assert token not in captured.out + captured.err
    assert token not in _records_text(caplog)

    for checkpoint in checkpoints:  # a pickle of the TrainingArguments: the hub_token field must be empty
        args = torch.load(checkpoint / "training_args.bin", weights_only=False)
        assert getattr(args, "hub_token", None) in (None, "")
        assert token not in repr(vars(args))
    assert not (out / "training_args.bin").exists()


def test_a_rejected_token_is_not_echoed(tiny_model, tmp_path, private_tmp, hub_server, monkeypatch, capsys, caplog):
    wrong = "hf_WrongTokenWrongToken0123456789"
    monkeypatch.setenv("HF_TOKEN", wrong)
    caplog.set_level(logging.DEBUG)
    assert main(_argv(tiny_model, tmp_path, "--push-to", "alice/secret-test")) == 2
    captured = capsys.readouterr()
    [line] = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "401" in line and "rejected" in line
    assert wrong not in captured.out + captured.err + _records_text(caplog)
    assert not (tmp_path / "out").exists()
    assert _files_containing([tmp_path], wrong) == []


def test_an_error_message_carrying_the_token_is_scrubbed(tiny_model, tmp_path, private_tmp, hub_server, monkeypatch,
                                                        capsys, caplog):
    from huggingface_hub import HfApi

    token = hub_server.token
    monkeypatch.setenv("HF_TOKEN", token)

    def whoami(self, *args, **kwargs):
        raise ConnectionError(f"could not reach the Hub with Authorization: Bearer {token} (hf_AbCdEf0123456789)")

    monkeypatch.setattr(HfApi, "whoami", whoami)
    caplog.set_level(logging.DEBUG)
    assert main(_argv(tiny_model, tmp_path, "--push-to", "alice/secret-test")) == 2
    captured = capsys.readouterr()
    [line] = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "Cannot check access" in line
    for secret in (token, "hf_AbCdEf0123456789"):
        assert secret not in captured.out + captured.err + _records_text(caplog)


def test_push_failure_after_training_does_not_leak(tiny_model, tmp_path, private_tmp, hub_server, monkeypatch, capsys,
                                                   caplog):
    from huggingface_hub import HfApi

    token = hub_server.token
    monkeypatch.setenv("HF_TOKEN", token)

    def create_commit(self, *args, **kwargs):
        raise RuntimeError(f"upload failed; token={token}")

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    caplog.set_level(logging.DEBUG)
    code = main(_argv(tiny_model, tmp_path, "--push-to", "alice/secret-test"))
    captured = capsys.readouterr()
    assert code == 2
    [line] = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "hf-instruct-tune upload alice/secret-test" in line  # says how to retry; the adapter is kept
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert token not in captured.out + captured.err + _records_text(caplog)
    assert _files_containing([tmp_path], token) == []


def test_the_yaml_config_cannot_carry_a_token(tiny_model, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("token: hf_InTheConfigFile0123456789\n")
    assert main(["train", str(config), "--model", str(tiny_model), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "must not hold secrets" in err and "hf_InTheConfigFile0123456789" not in err


# -- loading safety --------------------------------------------------------------------------------

def _pickle_only_model(tiny_model: Path, folder: Path) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file

    folder.mkdir()
    for path in tiny_model.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    torch.save(load_file(str(tiny_model / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_unless_allowed(tiny_model, tmp_path, capsys):
    model = _pickle_only_model(tiny_model, tmp_path / "pickled")
    argv = [a if a != str(tiny_model) else str(model) for a in _argv(tiny_model, tmp_path)]
    assert main(argv) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "pickled" in line and "only pickle weights" in line and "--allow-pickle" in line
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--allow-pickle", "--max-steps", "1", "--save-steps", "10"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_adapters_load_from_safetensors_without_unpickling(tiny_model, tmp_path, monkeypatch):
    import pickle

    import torch

    from hf_instruct_tune.generation import AdapterGenerator

    assert main([*_argv(tiny_model, tmp_path), "--max-steps", "1", "--save-steps", "10"]) == 0
    adapter = tmp_path / "out"
    assert not list(adapter.glob("*.bin")) and not list(adapter.glob("*.pt"))

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    generator = AdapterGenerator(adapter, model=str(tiny_model))
    [result] = generator.generate([[{"role": "user", "content": "hello"}]], max_new_tokens=2)
    assert result.finish_reason in {"eos", "length"}
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(generator.model)
    assert saved.keys() == loaded.keys() and saved
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)


def test_trust_remote_code_is_off_by_default_and_warns_when_on(tiny_model, tmp_path, monkeypatch, caplog):
    import transformers

    from hf_instruct_tune.config import TrainConfig

    assert TrainConfig().trust_remote_code is False
    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    caplog.set_level(logging.WARNING)
    assert main([*_argv(tiny_model, tmp_path), "--max-steps", "1", "--save-steps", "10"]) == 0
    assert seen and not any(seen)
    assert not [r for r in caplog.records if "trust_remote_code" in r.getMessage()]

    seen.clear()
    assert main([*_argv(tiny_model, tmp_path), "--max-steps", "1", "--save-steps", "10", "--overwrite",
                 "--trust-remote-code"]) == 0
    assert seen and all(seen)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "trust_remote_code is on" in r.getMessage()]
    assert warnings and "code from the model's repository will run" in warnings[0].getMessage()
