"""Bad input through the CLI: exit code 2, one line on stderr naming the file, line/row and field, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_instruct_tune.cli import main

ROWS = [{"instruction": "hello", "output": "yes"}, {"instruction": "classify the sentiment", "output": "no"}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def _fails(capsys, tmp_path, argv, *expected: str) -> str:
    """Run ``train`` with ``argv``; check exit 2, one ``error:`` line containing ``expected``, no output dir."""
    out = tmp_path / "out"
    code = main(["train", *argv, "--output-dir", str(out), "--max-steps", "1", "--batch-size", "1", "--grad-accum",
                 "1", "--lora-r", "2", "--target-modules", "q_proj"])
    captured = capsys.readouterr()
    error_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert len(error_lines) == 1, captured.err
    assert "\n" not in error_lines[0]
    for text in expected:
        assert text in error_lines[0], error_lines[0]
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    return error_lines[0]


def _train(tiny_model, data, *extra):
    return ["--model", str(tiny_model), "--data", str(data), *extra]


# -- data files ------------------------------------------------------------------------------------

def test_malformed_jsonl_names_line_and_column(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", [ROWS[0], '{"instruction": "x", "output": }', ROWS[1]])
    _fails(capsys, tmp_path, _train(tiny_model, data), "d.jsonl", "line 2", "column 32", "malformed JSON")


def test_malformed_json_names_line_and_column(capsys, tmp_path, tiny_model):
    data = tmp_path / "d.json"
    data.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    _fails(capsys, tmp_path, _train(tiny_model, data), "d.json", "line 3", "column 23", "malformed JSON")


def test_json_object_instead_of_a_list(capsys, tmp_path, tiny_model):
    data = tmp_path / "d.json"
    data.write_text(json.dumps({"rows": ROWS}))
    _fails(capsys, tmp_path, _train(tiny_model, data), "d.json", "expected a JSON list", "under the key 'rows'")


def test_json_list_of_non_objects(capsys, tmp_path, tiny_model):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([ROWS[0], "just text"]))
    _fails(capsys, tmp_path, _train(tiny_model, data), "d.json", "row 2", "expected an object, got str")


def test_misspelled_field_with_named_formatter(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", [{"instrction": "hello", "output": "yes"}])
    message = _fails(capsys, tmp_path, _train(tiny_model, data, "--formatter", "alpaca"),
                     "d.jsonl", "line 1", "field 'instruction'", "missing",
                     "Rename 'instrction' to 'instruction'.")
    assert "Did you mean 'instrction'" not in message  # the suggestion points from the data's name to the right one


def test_misspelled_field_when_detecting_the_formatter(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", [{"instrction": "hello", "output": "yes"}])
    _fails(capsys, tmp_path, _train(tiny_model, data), "d.jsonl", "line 1", "field 'instrction'",
           "Rename 'instrction' to 'instruction'.")


@pytest.mark.parametrize("formatter", [[], ["--formatter", "alpaca"]])
def test_a_column_under_another_name_gets_a_rename_hint(capsys, tmp_path, tiny_model, formatter):
    data = _jsonl(tmp_path / "d.jsonl", [{"instruction": "hello", "response": "yes"}])
    _fails(capsys, tmp_path, _train(tiny_model, data, *formatter), "d.jsonl", "line 1",
           "Rename 'response' to 'output'.")


@pytest.mark.parametrize("name, text", [("d.json", json.dumps(ROWS)), ("d.jsonl", json.dumps(ROWS[0]) + "\n")])
def test_data_where_the_config_goes_suggests_data(capsys, tmp_path, tiny_model, name, text):
    data = tmp_path / name
    data.write_text(text)
    message = _fails(capsys, tmp_path, [str(data), "--model", str(tiny_model)], name, f"pass it with --data {data}")
    assert "expected a mapping of option names to values, got list" not in message


def test_yaml_that_is_a_list_suggests_data(capsys, tmp_path, tiny_model):
    config = _yaml(tmp_path, "- instruction: hello\n  output: yes\n")
    _fails(capsys, tmp_path, [str(config), "--model", str(tiny_model)], "config.yaml", "got a list",
           f"if this is training data, pass it with --data {config}")


def test_missing_field_in_a_later_row(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", [*ROWS, {"instruction": "no answer here"}])
    _fails(capsys, tmp_path, _train(tiny_model, data), "d.jsonl", "line 3", "field 'output'", "missing")


@pytest.mark.parametrize("value, expected", [(None, "is null, expected text"), (42, "expected text, got int"),
                                             ("", "is empty"), ("   ", "is empty"),
                                             (["a"], "expected text, got list")])
def test_wrong_value_types(capsys, tmp_path, tiny_model, value, expected):
    data = _jsonl(tmp_path / "d.jsonl", [ROWS[0], {"instruction": "hi", "output": value}])
    _fails(capsys, tmp_path, _train(tiny_model, data), "d.jsonl", "line 2", "field 'output'", expected)


def test_wrong_value_in_a_json_list_names_the_row(capsys, tmp_path, tiny_model):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([ROWS[0], ROWS[1], {"instruction": 7, "output": "x"}]))
    _fails(capsys, tmp_path, _train(tiny_model, data), "d.json", "row 3", "field 'instruction'", "expected text")


def test_wrong_value_in_a_conversation_names_the_turn(capsys, tmp_path, tiny_model):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    _fails(capsys, tmp_path, _train(tiny_model, data, "--template", "chatml"), "d.jsonl", "line 1",
           "field 'messages[1].content'", "is null")


@pytest.mark.parametrize("name, text", [("d.jsonl", ""), ("d.jsonl", "\n\n"), ("d.json", "[]"),
                                        ("d.csv", "instruction,output\n")])
def test_empty_dataset(capsys, tmp_path, tiny_model, name, text):
    data = tmp_path / name
    data.write_text(text)
    _fails(capsys, tmp_path, _train(tiny_model, data), name, "empty")


def test_not_utf8_names_the_line(capsys, tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"instruction": "caf\xe9", "output": "yes"}\n')
    _fails(capsys, tmp_path, _train(tiny_model, data), "d.jsonl", "line 2", "not UTF-8")


def test_a_directory_is_not_data(capsys, tmp_path, tiny_model):
    folder = tmp_path / "folder"
    folder.mkdir()
    _fails(capsys, tmp_path, _train(tiny_model, folder), "folder", "is a directory")


def test_missing_data_path(capsys, tmp_path, tiny_model):
    _fails(capsys, tmp_path, _train(tiny_model, tmp_path / "nope.jsonl"), "nope.jsonl", "no such file")


def test_unsupported_suffix(capsys, tmp_path, tiny_model):
    data = tmp_path / "d.txt"
    data.write_text("hello")
    _fails(capsys, tmp_path, _train(tiny_model, data), "d.txt", "unsupported file type", ".jsonl")


# -- names, templates ------------------------------------------------------------------------------

def test_unknown_formatter_lists_the_known_ones(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    _fails(capsys, tmp_path, _train(tiny_model, data, "--formatter", "alpacaa"), "Unknown formatter 'alpacaa'",
           "Available: alpaca, messages, prompt_completion, sharegpt", "Did you mean 'alpaca'?")


def test_unknown_template_lists_the_known_ones(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    _fails(capsys, tmp_path, _train(tiny_model, data, "--template", "chatmll"), "Unknown template 'chatmll'",
           "alpaca", "llama-3", "Did you mean 'chatml'?")


def test_template_syntax_error_names_its_line(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    template = tmp_path / "mine.jinja"
    template.write_text("### Instruction:\n{{ instruction }}\n{% if input %}\n### Response:\n")
    _fails(capsys, tmp_path, _train(tiny_model, data, "--template", str(template)), "mine.jinja", "line",
           "Jinja syntax error")


def test_template_undefined_variable_names_it(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    template = tmp_path / "mine.jinja"
    template.write_text("### Instruction:\n{{ instructions }}\n### Response:\n")
    _fails(capsys, tmp_path, _train(tiny_model, data, "--template", str(template)), "d.jsonl", "line 1",
           "field 'instructions'", "undefined")


def test_missing_template_file(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    _fails(capsys, tmp_path, _train(tiny_model, data, "--template", str(tmp_path / "gone.jinja")), "gone.jinja",
           "not found")


def test_user_template_cannot_escape_the_sandbox(capsys, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_INSTRUCT_TUNE_CANARY", "canary-value-8d1f")
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    template = tmp_path / "evil.jinja"
    template.write_text("{{ cycler.__init__.__globals__.os.environ }}\n### Response:\n")
    message = _fails(capsys, tmp_path, _train(tiny_model, data, "--template", str(template)), "d.jsonl", "line 1",
                     "evil")
    assert "canary-value-8d1f" not in message and "HF_HOME" not in message


# -- the YAML config -------------------------------------------------------------------------------

def _yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_unknown_key_suggests_the_close_one(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    config = _yaml(tmp_path, f"data: {data}\nlearning_rat: 0.1\n")
    _fails(capsys, tmp_path, [str(config), "--model", str(tiny_model)], "config.yaml", "line 2",
           "field 'learning_rat'", "unknown option")
    config = _yaml(tmp_path, f"data: {data}\nmax_step: 3\n")
    _fails(capsys, tmp_path, [str(config), "--model", str(tiny_model)], "config.yaml", "line 2",
           "Did you mean 'max_steps'?")


def test_yaml_dashed_key_is_an_error_with_the_underscored_name(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    config = _yaml(tmp_path, f"data: {data}\noutput-dir: elsewhere\n")
    _fails(capsys, tmp_path, [str(config), "--model", str(tiny_model)], "config.yaml", "line 2",
           "field 'output-dir'", "unknown option", "did you mean 'output_dir'?")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("line, expected", [("seed: ten", "`seed` should be an integer, got 'ten'"),
                                            ("lr: [1, 2]", "`lr` should be a number"),
                                            ("packing: maybe", "`packing` should be true or false"),
                                            ("overlong: cut", "`overlong` should be one of drop, truncate")])
def test_yaml_wrong_type_names_the_file_and_key(capsys, tmp_path, tiny_model, line, expected):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    config = _yaml(tmp_path, f"data: {data}\n{line}\n")
    key = line.split(":")[0]
    _fails(capsys, tmp_path, [str(config), "--model", str(tiny_model)], "config.yaml", "line 2", f"field '{key}'",
           expected)


@pytest.mark.parametrize("key", ["token", "hf_token", "hub-token"])
def test_yaml_token_key_is_refused(capsys, tmp_path, tiny_model, key):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    config = _yaml(tmp_path, f"data: {data}\n{key}: hf_secretsecretsecret123\n")
    message = _fails(capsys, tmp_path, [str(config), "--model", str(tiny_model)], "config.yaml", "line 2",
                     f"field '{key}'", "must not hold secrets", "HF_TOKEN")
    assert "hf_secretsecretsecret123" not in message


def test_malformed_yaml_names_the_line(capsys, tmp_path, tiny_model):
    config = _yaml(tmp_path, "data: d.jsonl\nmax_steps: [1\n")
    _fails(capsys, tmp_path, [str(config), "--model", str(tiny_model)], "config.yaml", "line", "malformed YAML")


def test_wrong_flag_type(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    _fails(capsys, tmp_path, _train(tiny_model, data, "--save-steps", "often"), "`save_steps` should be an integer")


# -- lengths and models ----------------------------------------------------------------------------

def test_best_checkpoint_without_evaluation_data(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    _fails(capsys, tmp_path, _train(tiny_model, data, "--load-best-model-at-end"), "field 'load_best_model_at_end'",
           "--eval-data")


@pytest.mark.parametrize("fusion", ["--liger-kernels", "--fused-lora"])
def test_compiled_layers_and_another_fusion_together(capsys, tmp_path, tiny_model, fusion):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    _fails(capsys, tmp_path, _train(tiny_model, data, "--compile-layers", fusion),
           f"field '{fusion[2:].replace('-', '_')}'", "choose one")


def test_max_length_smaller_than_every_prompt(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    _fails(capsys, tmp_path, _train(tiny_model, data, "--max-length", "4"), "d.jsonl", "field 'max_length'",
           "every one of its 2 rows is longer than --max-length 4")


def test_model_folder_without_weights(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model / "config.json").read_text())
    _fails(capsys, tmp_path, ["--model", str(empty), "--data", str(data)], "model", "has no weights")


def test_missing_model_path(capsys, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    _fails(capsys, tmp_path, ["--model", str(tmp_path / "no" / "such" / "model"), "--data", str(data)],
           "no such model folder")


def test_data_errors_surface_before_the_model_loads(capsys, tmp_path, tiny_model, monkeypatch):
    import hf_instruct_tune.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(models, "load_base_model", refuse)
    monkeypatch.setattr("hf_instruct_tune.training.load_base_model", refuse)
    data = _jsonl(tmp_path / "d.jsonl", [*ROWS * 50, {"instruction": "x", "outptu": "y"}])
    _fails(capsys, tmp_path, _train(tiny_model, data), "d.jsonl", "line 101", "field 'output'",
           "Rename 'outptu' to 'output'.")


def test_debug_shows_the_traceback(tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ['{"instruction": '])
    from hf_instruct_tune.errors import InputError

    with pytest.raises(InputError, match="line 1"):
        main(["--debug", "train", "--model", str(tiny_model), "--data", str(data), "--output-dir",
              str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# -- a real process --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["jsonl", "yaml-token"])
def test_subprocess_exit_code_and_one_line(tmp_path, tiny_model, case):
    if case == "jsonl":
        data = _jsonl(tmp_path / "d.jsonl", [ROWS[0], '{"instruction": "x", "output": }'])
        argv = ["--model", str(tiny_model), "--data", str(data)]
        expected = ["d.jsonl", "line 2", "column"]
    else:
        data = _jsonl(tmp_path / "d.jsonl", ROWS)
        config = _yaml(tmp_path, f"data: {data}\ntoken: hf_secretsecretsecret123\n")
        argv = [str(config), "--model", str(tiny_model)]
        expected = ["config.yaml", "field 'token'", "must not hold secrets"]
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "hf_instruct_tune", "train", *argv, "--output-dir", str(out)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert all(text in error_lines[0] for text in expected), error_lines[0]
    assert "hf_secretsecretsecret123" not in result.stderr + result.stdout
    assert not out.exists()


def test_card_templates_render_in_the_sandbox(tmp_path, tiny_model, monkeypatch):
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    import hf_instruct_tune.hub.card as card

    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(out), "--max-steps",
                 "1", "--batch-size", "1", "--grad-accum", "1", "--lora-r", "2", "--target-modules", "q_proj"]) == 0
    assert isinstance(card._environment(), ImmutableSandboxedEnvironment)
    monkeypatch.setenv("HF_INSTRUCT_TUNE_CANARY", "canary-value-8d1f")
    monkeypatch.setattr(card, "_template_source", lambda: "{{ cycler.__init__.__globals__.os.environ }}")
    with pytest.raises(SecurityError) as info:
        card.render_card(out)
    assert "canary-value-8d1f" not in str(info.value)


@pytest.mark.parametrize("command", ["generate", "export"])
def test_pickle_advice_names_a_flag_the_command_has(capsys, tmp_path, command):
    import torch
    from safetensors.torch import save_file

    from hf_instruct_tune.testing.tiny import build_tiny_tokenizer

    from test_card import make_adapter_dir

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    adapter = make_adapter_dir(tmp_path / "adapter")
    build_tiny_tokenizer().save_pretrained(adapter)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2)}, adapter / "adapter_model.safetensors")
    argv = (["generate", "--adapter", str(adapter), "--model", str(pickled), "--instruction", "hi"]
            if command == "generate" else ["export", "--adapter", str(adapter), "--base", str(pickled),
                                           "--merged", str(tmp_path / "merged")])
    assert main(argv) == 2
    assert "pass --allow-pickle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--allow-pickle" in capsys.readouterr().out


def test_train_login_advice_names_no_flag_train_lacks(capsys, tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    message = _fails(capsys, tmp_path, _train(tiny_model, data, "--push-to", "alice/x", "--endpoint",
                                              "http://127.0.0.1:9"), "Not logged in", "Run 'hf auth login' or set HF_TOKEN.")
    assert "--token" not in message  # train has no --token (configs and flags never carry tokens)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    [line] = [line for line in captured.err.splitlines() if line.startswith("error:")]
    return line


def test_generate_never_writes_its_answers_over_the_data(capsys, tmp_path):
    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    before = data.read_bytes()
    for output in (data, tmp_path / "." / "rows.jsonl"):
        assert main(["generate", "--adapter", str(tmp_path / "adapter"), "--data", str(data),
                     "--output", str(output)]) == 2
        line = _one_error_line(capsys)
        assert "rows.jsonl" in line and "is the --data file" in line and "output" in line
    assert data.read_bytes() == before


def test_export_never_writes_the_merged_model_over_the_adapter_or_the_base(capsys, tmp_path, tiny_model):
    from hf_instruct_tune.testing.tiny import build_tiny_tokenizer

    from test_card import make_adapter_dir

    adapter = make_adapter_dir(tmp_path / "adapter")
    build_tiny_tokenizer().save_pretrained(adapter)
    files = {path: path.read_bytes() for folder in (adapter, tiny_model) for path in folder.rglob("*") if path.is_file()}
    for merged, flag in ((adapter, "--adapter"), (tiny_model, "--base")):
        assert main(["export", "--adapter", str(adapter), "--base", str(tiny_model), "--merged", str(merged),
                     "--overwrite"]) == 2
        line = _one_error_line(capsys)
        assert str(merged) in line and f"is the {flag} folder" in line and "merged" in line
    assert {path: path.read_bytes() for path in files} == files
