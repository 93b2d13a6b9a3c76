"""Plugins: inline registration, and entry-point discovery from a tiny distribution built in tmp_path."""

from __future__ import annotations

import sys
import textwrap

import pytest
from helpers import tiny_tokenizer, write_jsonl

from hf_instruct_tune.data import DataSource, tokenize_source
from hf_instruct_tune.errors import InputError
from hf_instruct_tune.formatters import FORMATTERS, get_formatter, register_formatter
from hf_instruct_tune.registry import DISABLE_AUTOLOAD_ENV
from hf_instruct_tune.templating import TEMPLATES, get_template
from hf_instruct_tune.tokenization import IGNORE_INDEX, ExampleEncoder

PLUGIN_MODULE = "hfit_qa_plugin"
PLUGIN_FORMATTER = "qa-pairs"
PLUGIN_TEMPLATE = "qa-template"


# -- inline registration ---------------------------------------------------------------------------


@pytest.fixture
def inline_formatter():
    @register_formatter("question-answer")
    def question_answer(row):
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": row["answer"]}]}

    yield question_answer
    FORMATTERS.unregister("question-answer")


def test_inline_formatter_is_found_by_name(inline_formatter):
    assert get_formatter("question-answer") is inline_formatter
    assert "question-answer" in FORMATTERS.names()
    assert inline_formatter({"question": "q", "answer": "a"})["messages"][1] == {"role": "assistant", "content": "a"}


def test_duplicate_name_is_an_error(inline_formatter):
    with pytest.raises(ValueError, match="There is already a formatter called 'question-answer', please choose a unique"):
        register_formatter("question-answer")(lambda row: row)
    with pytest.raises(ValueError, match="already a formatter called 'alpaca'"):
        register_formatter("alpaca")(lambda row: row)
    assert get_formatter("question-answer") is inline_formatter


@pytest.mark.parametrize("name", ["Alpaca", "my format", "", "-x"])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match="lower-case"):
        register_formatter(name)(lambda row: row)
    assert name not in FORMATTERS.names()


def test_unregistered_formatter_is_gone(inline_formatter):
    FORMATTERS.unregister("question-answer")
    with pytest.raises(InputError, match="Unknown formatter 'question-answer'"):
        get_formatter("question-answer")


# -- entry points ----------------------------------------------------------------------------------

PLUGIN_SOURCE = '''
def qa_pairs(row):
    return {"messages": [{"role": "user", "content": row["q"]}, {"role": "assistant", "content": row["a"]}]}

QA_TEMPLATE = """{#---
description: Question and answer.
stop: eos_token
---#}
Q: {{ instruction }}
A:"""
'''

ENTRY_POINTS = f"""
[hf_instruct_tune.formatters]
{PLUGIN_FORMATTER} = {PLUGIN_MODULE}:qa_pairs

[hf_instruct_tune.templates]
{PLUGIN_TEMPLATE} = {PLUGIN_MODULE}:QA_TEMPLATE
"""


def _forget_plugins():
    for name in (PLUGIN_FORMATTER, "broken-format"):
        FORMATTERS.unregister(name)
    TEMPLATES.unregister(PLUGIN_TEMPLATE)
    FORMATTERS.reset_plugins()
    TEMPLATES.reset_plugins()
    sys.modules.pop(PLUGIN_MODULE, None)


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """A distribution ``hfit-qa-plugin`` on sys.path, declaring a formatter and a template."""
    site = tmp_path / "site"
    (site / PLUGIN_MODULE).mkdir(parents=True)
    (site / PLUGIN_MODULE / "__init__.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    dist_info = site / f"{PLUGIN_MODULE}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: hfit-qa-plugin\nVersion: 0.1\n", encoding="utf-8")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS), encoding="utf-8")
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.syspath_prepend(str(site))
    _forget_plugins()
    yield site
    _forget_plugins()


def test_plugin_formatter_and_template_by_name(plugin_dist):
    formatter = get_formatter(PLUGIN_FORMATTER)
    assert formatter.__module__ == PLUGIN_MODULE
    assert formatter({"q": "hello", "a": "yes"})["messages"][0] == {"role": "user", "content": "hello"}
    template = get_template(PLUGIN_TEMPLATE)
    assert (template.name, template.description, template.origin) == (
        PLUGIN_TEMPLATE, "Question and answer.", f"plugin '{PLUGIN_TEMPLATE}'")
    assert PLUGIN_FORMATTER in FORMATTERS.names() and PLUGIN_TEMPLATE in TEMPLATES.names()


def test_broken_plugin_is_an_error_naming_it(plugin_dist):
    dist_info = plugin_dist / "hfit_broken_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: hfit-broken-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[hf_instruct_tune.formatters]\nbroken-format = {PLUGIN_MODULE}_missing:x\n")
    FORMATTERS.reset_plugins()
    message = (f"The formatter plugin 'broken-format' \\({PLUGIN_MODULE}_missing:x\\) failed to load: "
               f"No module named '{PLUGIN_MODULE}_missing'")
    with pytest.raises(InputError, match=message):
        get_formatter("broken-format")
    with pytest.raises(InputError, match=message):  # asked again, still the real cause, not "Unknown formatter"
        get_formatter("broken-format")
    assert get_formatter("alpaca")  # built-ins need no discovery


def test_plugin_through_tokenize_source(plugin_dist, tmp_path):
    tok = tiny_tokenizer()
    encoder = ExampleEncoder(tok, get_template(PLUGIN_TEMPLATE))
    source = DataSource.open(write_jsonl(tmp_path / "qa.jsonl", [{"q": "hello", "a": "yes"}, {"q": "world", "a": "no"}]))
    data = tokenize_source(source, get_formatter(PLUGIN_FORMATTER), encoder)
    try:
        assert data.rows == 2 and len(data.dataset) == 2
        first = data.dataset[0]
        prompt = encoder.encode_prompt([{"role": "user", "content": "hello"}])
        assert first["input_ids"][: len(prompt)] == prompt
        assert tok.decode(prompt, skip_special_tokens=True) == "Q: hello\nA:"
        assert [label for label in first["labels"] if label != IGNORE_INDEX][-1] == tok.eos_token_id
    finally:
        data.cleanup()


def test_plugin_through_instruct_trainer(plugin_dist, tmp_path):
    from trl import SFTConfig

    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer
    from hf_instruct_tune.trainer import InstructTrainer

    tok = build_tiny_tokenizer()
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "hello", "a": "yes"}, {"q": "world", "a": "no"}])
    trainer = InstructTrainer(build_tiny_model(tok), SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True,
                                                               report_to=[], max_steps=1),
                              train_dataset=str(path), processing_class=tok, formatter=PLUGIN_FORMATTER,
                              template=PLUGIN_TEMPLATE)
    try:
        assert trainer.formatter_name == PLUGIN_FORMATTER and trainer.prompt_template.name == PLUGIN_TEMPLATE
        assert trainer.run_metadata.formatter == PLUGIN_FORMATTER
        assert trainer.run_metadata.example["rendered_prompt"] == "Q: world\nA:" or \
            trainer.run_metadata.example["rendered_prompt"] == "Q: hello\nA:"
        assert len(trainer.train_dataset) == 2
    finally:
        trainer.train_data.cleanup()


def test_disable_autoload_hides_plugins(plugin_dist, monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    with pytest.raises(InputError, match=f"Unknown formatter '{PLUGIN_FORMATTER}'. Available: alpaca"):
        get_formatter(PLUGIN_FORMATTER)
    with pytest.raises(InputError, match=f"Unknown template '{PLUGIN_TEMPLATE}'"):
        get_template(PLUGIN_TEMPLATE)
    assert "alpaca" in FORMATTERS.names() and "chatml" in TEMPLATES.names()  # built-ins stay

    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV)
    assert get_formatter(PLUGIN_FORMATTER).__module__ == PLUGIN_MODULE
