"""Templates: every registered one renders and stops right; the sandbox refuses escapes; user files work."""

from __future__ import annotations

import pytest
from helpers import SINGLE_TURN, assert_single_turn_invariants, tiny_tokenizer

from hf_instruct_tune.errors import InputError
from hf_instruct_tune.templating import (
    EOS_STOP, TEMPLATES, PromptTemplate, TemplateRenderError, get_template, register_template,
)
from hf_instruct_tune.tokenization import ExampleEncoder, ExampleError

TEMPLATE_NAMES = TEMPLATES.names()
PROMPT = [{"role": "user", "content": "Classify the sentiment.", "input": "I like football"}]
EXPECTED_STOP = {"chatml": "<|im_end|>", "llama-3": "<|eot_id|>"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_builtins_are_registered():
    assert {"alpaca", "alpaca-no-input", "alpaca-zh", "chatml", "llama-3", "raw"} <= set(TEMPLATE_NAMES)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_renders_a_sample(name):
    template = get_template(name)
    assert template.name == name and template.description
    messages = [{"role": "user", "content": "Classify the sentiment."}]
    prompt = template.render_prompt(messages, bos_token="<s>", eos_token="</s>")
    assert "Classify the sentiment." in prompt
    assert "{{" not in prompt and "{#" not in prompt and "---" not in prompt


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_stop_token_semantics(name, tok):
    template = get_template(name)
    assert template.stop == EXPECTED_STOP.get(name, EOS_STOP)
    stop_text = template.stop_text("</s>")
    assert stop_text == EXPECTED_STOP.get(name, "</s>")
    encoder = ExampleEncoder(tok, template)
    stop_id = tok.convert_tokens_to_ids(stop_text)
    assert encoder.stop_token_id == stop_id
    example = encoder.encode({"messages": SINGLE_TURN})
    assert_single_turn_invariants(example.input_ids, example.labels, stop_id=stop_id, bos_id=tok.bos_token_id)
    assert tok.decode(example.labels[-2:]) == "yes" + stop_text


def test_eos_stop_needs_an_eos_token():
    with pytest.raises(InputError, match="has none"):
        get_template("alpaca").stop_text(None)


def test_alpaca_input_section_only_with_an_input():
    template = get_template("alpaca")
    with_input = template.render_prompt(PROMPT, bos_token="<s>", eos_token="</s>")
    without = template.render_prompt([{"role": "user", "content": "Classify."}], bos_token="<s>", eos_token="</s>")
    assert "### Input:\nI like football\n\n### Response:\n" in with_input
    assert "### Input:" not in without and without.endswith("### Instruction:\nClassify.\n\n### Response:\n")


def test_alpaca_no_input_refuses_an_input():
    with pytest.raises(TemplateRenderError, match="no place for an input"):
        get_template("alpaca-no-input").render_prompt(PROMPT, bos_token="<s>", eos_token="</s>")


def test_chatml_exact_render():
    prompt = get_template("chatml").render_prompt([{"role": "user", "content": "hi"}], bos_token="<s>", eos_token="</s>")
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_exact_render():
    prompt = get_template("llama-3").render_prompt([{"role": "user", "content": "hi"}], bos_token="<s>",
                                                    eos_token="</s>")
    assert prompt == "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


# -- sandbox ---------------------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ lipsum.__globals__.os.environ['HF_INSTRUCT_TUNE_SECRET'] }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(instruction) }}",
    "{{ os.environ['HF_INSTRUCT_TUNE_SECRET'] }}",
    "{{ environ['HF_INSTRUCT_TUNE_SECRET'] }}",
    "{{ config }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_refuses_escapes(source, monkeypatch):
    monkeypatch.setenv("HF_INSTRUCT_TUNE_SECRET", "s3cr3t-value")
    template = PromptTemplate.from_source(source, name="evil")
    with pytest.raises(TemplateRenderError) as info:
        template.render_prompt([{"role": "user", "content": "hi"}], bos_token="<s>", eos_token="</s>")
    message = str(info.value)
    assert message.startswith("template 'evil'")
    assert "unsafe" in message or "undefined" in message
    assert "s3cr3t-value" not in message and "<module" not in message and "/" not in message


def test_sandbox_error_reaches_the_user_as_input_error(tok, tmp_path):
    from hf_instruct_tune.data import DataSource, tokenize_source
    from hf_instruct_tune.formatters import get_formatter
    from helpers import write_jsonl

    template = PromptTemplate.from_source("{{ lipsum.__globals__['os'] }}", name="evil")
    source = DataSource.open(write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}]))
    with pytest.raises(InputError, match="refused by the sandbox") as info:
        tokenize_source(source, get_formatter("alpaca"), ExampleEncoder(tok, template))
    assert info.value.location == "line 1"


def test_templates_cannot_mutate_their_context():
    template = PromptTemplate.from_source("{{ messages.append(1) }}", name="mutate")
    with pytest.raises(TemplateRenderError, match="unsafe|refused"):
        template.render_prompt([{"role": "user", "content": "hi"}], bos_token="<s>", eos_token="</s>")


def test_syntax_error_names_the_line():
    source = "{#---\nstop: eos_token\n---#}\n{{ instruction }}\n{% if %}\n"
    with pytest.raises(InputError, match="line 5") as info:
        PromptTemplate.from_source(source, name="bad", origin="bad.jinja")
    assert str(info.value).startswith("bad.jinja, line 5: Jinja syntax error")


def test_undefined_variable_names_the_field(tok):
    template = PromptTemplate.from_source("{{ instruction }} {{ context }}", name="undef")
    with pytest.raises(TemplateRenderError, match="'context' is undefined") as info:
        template.render_prompt([{"role": "user", "content": "hi"}], bos_token="<s>", eos_token="</s>")
    assert info.value.field == "context"
    with pytest.raises(ExampleError) as info:
        ExampleEncoder(tok, template).encode({"messages": SINGLE_TURN})
    assert info.value.field == "context"


@pytest.mark.parametrize("front_matter,match", [
    ("stop: [1, 2]", "`stop` should be"),
    ("colour: red", "unknown front-matter keys"),
    ("stop: [", "not valid YAML"),
    ("- a list", "YAML mapping"),
])
def test_bad_front_matter(front_matter, match):
    with pytest.raises(InputError, match=match):
        PromptTemplate.from_source(f"{{#---\n{front_matter}\n---#}}\n{{{{ instruction }}}}", name="bad")


# -- user files ------------------------------------------------------------------------------------


def test_user_jinja_file(tmp_path, tok):
    path = tmp_path / "qa.jinja"
    path.write_text("{#---\ndescription: Q and A\nstop: <|im_end|>\n---#}\nQ: {{ instruction }}\nA:", encoding="utf-8")
    for reference in (path, str(path)):
        template = get_template(reference)
        assert (template.name, template.stop, template.description, template.origin) == (
            "qa", "<|im_end|>", "Q and A", str(path))
    assert template.render_prompt(SINGLE_TURN[:1], bos_token="<s>", eos_token="</s>") == "Q: hello world\nA:"
    example = ExampleEncoder(tok, template).encode({"messages": SINGLE_TURN})
    assert example.labels[-1] == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing.jinja", "not found"),
    (lambda p: p, "not a file"),
])
def test_bad_template_paths(tmp_path, make, match):
    with pytest.raises(InputError, match=match):
        get_template(make(tmp_path) if match == "not found" else str(tmp_path) + "/")


def test_template_file_not_utf8(tmp_path):
    path = tmp_path / "latin.jinja"
    path.write_bytes("Réponse: {{ instruction }}".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8") as info:
        get_template(path)
    assert info.value.source == str(path)


@pytest.fixture
def scratch_template():
    yield "scratch-template"
    TEMPLATES.unregister("scratch-template")


def test_register_template_from_source(scratch_template):
    template = register_template(scratch_template, "{#---\nstop: <|eot_id|>\n---#}\n{{ instruction }}")
    assert get_template(scratch_template) is template and template.stop == "<|eot_id|>"
    with pytest.raises(ValueError, match="already a template called 'scratch-template'"):
        register_template(scratch_template, "{{ instruction }}")
