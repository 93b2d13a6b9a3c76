"""The ``chat_template`` saved with an adapter: the format it was trained in, for any server to render.

An adapter trained in one of the package's prompt templates (``alpaca-zh``, ``chatml``, a ``.jinja`` file)
ships a tokenizer whose ``chat_template`` renders exactly that prompt, so ``apply_chat_template(messages,
add_generation_prompt=True)``, vLLM and TGI prompt it the way it was trained, not in the base model's format.
The prompt template's source is wrapped, unchanged, in a macro; Alpaca-style templates read the last user
turn's ``content`` as the instruction and its optional ``input`` key as the input.
"""

from __future__ import annotations

from .chat_template import ChatTemplate
from .templating import _FRONT_MATTER, PromptTemplate

CHAT_TEMPLATE_FILE_NAME = "chat_template.jinja"

_WRAPPER = """{%- macro hf_instruct_tune_prompt(messages, system, instruction, input, stop_token) -%}
__SOURCE__{% endmacro -%}
{%- set answered = not add_generation_prompt and messages and messages[-1]['role'] == 'assistant' -%}
{%- set prompt_messages = messages[:-1] if answered else messages -%}
{%- set systems = prompt_messages | selectattr('role', 'equalto', 'system') | list -%}
{%- set users = prompt_messages | selectattr('role', 'equalto', 'user') | list -%}
{%- set last_user = users[-1] if users else {} -%}
{%- set prompt = hf_instruct_tune_prompt(prompt_messages, systems[0]['content'] if systems else '',
                                         last_user['content'] or '', last_user['input'] or '', __STOP__) -%}
{%- if __ADD_BOS__ and bos_token and not prompt.startswith(bos_token) -%}{{- bos_token -}}{%- endif -%}
{{- prompt -}}
{%- if answered -%}{{- messages[-1]['content'] ~ __STOP__ -}}{%- endif -%}
"""


def served_chat_template(template: PromptTemplate | ChatTemplate, stop_text: str, *, adds_bos: bool = False) -> str:
    """The ``chat_template`` source that renders what ``template`` trained (a chat template: itself).

    ``adds_bos``: training put the tokenizer's BOS token first (servers tokenize the rendered chat without
    adding special tokens, so the template writes it).
    """
    if isinstance(template, ChatTemplate):
        return template.source
    source = _FRONT_MATTER.sub("", template.source, count=1)
    return (_WRAPPER.replace("__STOP__", _jinja_string(stop_text)).replace("__ADD_BOS__", "true" if adds_bos else "false")
            .replace("__SOURCE__", source))


def _jinja_string(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)
