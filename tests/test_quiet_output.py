"""What a user sees: readable loss lines, no third-party warnings they cannot act on, progress and length notices."""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings

import pytest

from hf_instruct_tune.cli import main

ROWS = [{"instruction": "hello", "output": "yes"}, {"instruction": "classify the sentiment", "output": "no"}]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny adapter trained through the command line (1 step), and what the run printed."""
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("quiet")
    model = save_tiny_checkpoint(root / "tiny")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(root / "hf_home"))
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(root / "out"),
                         "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "2",
                         "--target-modules", "q_proj"])
    assert code == 0, err.getvalue()
    return root / "out", out.getvalue() + err.getvalue(), [str(w.message) for w in caught]


def test_training_prints_loss_lines_for_people(adapter):
    _, printed, _ = adapter
    assert "step 1/1  loss " in printed and "lr 2.00e-04" in printed, printed
    assert "{'loss'" not in printed and "'grad_norm'" not in printed  # not Python dicts of strings


def test_the_adapter_is_announced_once(adapter):
    out, printed, _ = adapter
    assert printed.count(str(out)) == 1, printed
    assert "Saved the adapter to" not in printed
    assert "Trained 1 step, final loss " in printed and "Trained 1 steps" not in printed


def test_no_warnings_about_what_the_user_never_set(adapter):
    _, _, warned = adapter
    for unwanted in ("`gradient_checkpointing` is deprecated", "`gradient_checkpointing_kwargs` is deprecated",
                     "`is_gradient_checkpointing` is deprecated",
                     "Could not find a config file", "'pin_memory' argument is set as true"):
        assert not any(unwanted in message for message in warned), warned


def test_the_filters_are_precise():
    from hf_instruct_tune.quiet import filter_third_party_warnings

    filter_third_party_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils")
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "mine.py", 1,
                               module="my_package")  # same text, another module: shown
        warnings.warn_explicit("something else is deprecated", FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils")
    assert [str(w.message) for w in caught] == ["`is_gradient_checkpointing` is deprecated",
                                                "something else is deprecated"]


def test_an_offline_base_model_lookup_on_save_is_not_shown():
    from hf_instruct_tune.quiet import filter_third_party_warnings

    filter_third_party_warnings()
    offline = ("Unable to fetch remote file due to the following error [Errno -2] Name or service not known - "
               "silently ignoring the lookup for the file config.json in HuggingFaceTB/SmolLM2-135M-Instruct.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(offline, UserWarning, "other.py", 1, module="peft.utils.other")
        warnings.warn_explicit(offline.replace("config.json", "adapter_config.json"), UserWarning, "other.py", 1,
                               module="peft.utils.other")  # another file: shown
    assert [str(w.message) for w in caught] == [offline.replace("config.json", "adapter_config.json")]


def test_http_request_logs_only_with_verbose(hub_server, tmp_path, caplog):
    from test_card import make_adapter_dir

    folder = make_adapter_dir(tmp_path / "out")
    argv = ["upload", "alice/quiet", str(folder), "--endpoint", hub_server.url, "--token", hub_server.token]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert not any("HTTP Request" in r.getMessage() or "409" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["--verbose", *argv]) == 0
    assert any("HTTP Request" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_generate_says_when_the_length_limit_cut_the_answer(adapter, capsys, caplog, monkeypatch):
    import hf_instruct_tune.generation_progress as progress

    out, _, _ = adapter
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)  # a line per token, so a short test sees them
    with caplog.at_level(logging.INFO):
        assert main(["generate", "--adapter", str(out), "--instruction", "hello", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("Generating: batch 1/1, 2/3 new tokens") for m in messages), messages
    assert "reached --max-new-tokens 3 before the stop token" in captured.err
    assert "\ufffd" not in captured.out


def test_formatters_list_prints_plain_text(capsys):
    assert main(["formatters", "list"]) == 0
    printed = capsys.readouterr().out
    assert "``" not in printed and "Alpaca rows: instruction, optional input" in printed


def test_train_help_states_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "scale = alpha / r" not in help_text
    assert "alpha/sqrt(r) (rank-stabilized, the default)" in help_text
    assert "LoRA dropout. (default: 0.0)" in help_text


def test_a_character_cut_by_the_length_limit_is_dropped_whole():
    from hf_instruct_tune.generation import _without_a_cut_character
    from hf_instruct_tune.testing.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(adds_bos=False)
    ids = tokenizer("下雪了", add_special_tokens=False)["input_ids"]  # 雪 is two byte-level tokens here
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    text = tokenizer.decode(ids[:cut])
    assert _without_a_cut_character(text) == text[:-1] and "\ufffd" not in _without_a_cut_character(text)
    assert _without_a_cut_character("积极") == "积极"


@pytest.mark.parametrize("logger_name, dropped, kept", [
    ("liger_kernel.backends.registry",
     ("Backend impl '%s' for op '%s' could not be imported: %s: %s", "liger_kernel.ops.backends._cutedsl.rope", "rope",
      "ImportError", "cutedsl backend requires the NVIDIA CUTLASS Python DSL (CuTe DSL)."),
     ("Backend impl '%s' for op '%s' could not be imported: %s: %s", "liger_kernel.ops.backends._triton.rope", "rope",
      "ImportError", "no triton")),
    ("bitsandbytes.backends.cpu.ops",
     ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install "
      "kernels` and the kernels >= 0.11.1", "No module named 'kernels'"),
     ("Failed to load CPU dequantize: %s", "something else")),
])
def test_third_party_records_about_their_optional_parts_are_not_logged(caplog, logger_name, dropped, kept):
    from hf_instruct_tune.quiet import filter_third_party_warnings

    filter_third_party_warnings()
    filter_third_party_warnings()  # idempotent: one filter
    library = logging.getLogger(logger_name)
    assert len(library.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger_name):
        library.warning(*dropped)
        library.warning(*kept)
    assert [record.getMessage() for record in caplog.records] == [kept[0] % kept[1:]]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_importing_the_trainer_writes_nothing_about_bitsandbytes_cpu_kernels():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import hf_instruct_tune.trainer, bitsandbytes"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr + result.stdout
