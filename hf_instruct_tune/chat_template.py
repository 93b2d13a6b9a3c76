"""The tokenizer's own chat template as a template source: ``--template model``.

The template is the ``chat_template`` that ``transformers``, vLLM and TGI render for the model, so an adapter
trained with it is served in the format it learned. It is rendered here in a sandbox set up as transformers
sets up its own (the same globals: ``raise_exception``, ``strftime_now``, ``namespace``, ``dict``, a ``tojson``
filter, ``{% generation %}`` blocks, loop controls), so the text is exactly what ``apply_chat_template`` gives.

What the package needs from the template, it reads from the template itself:

* the **stop token**: the end-of-turn marker the template writes after an assistant message (``<|im_end|>``,
  ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``, ``<|end|>``, or the next role marker where a turn ends only
  with it), found by rendering a probe conversation;
* the **assistant spans**: the text between the generation prompt (``add_generation_prompt=True``) and that
  marker, or the ``{% generation %}`` blocks where the template has them.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InputError
from .templating import TemplateRenderError

MODEL_TEMPLATE = "model"
"""The template name that means "the tokenizer's own ``chat_template``"."""

_generation_spans: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
    "hf_instruct_tune_generation_spans", default=None)


class _GenerationBlocks(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}``: renders its body and records where it lands in the output."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller) -> str:
        text = caller()
        tracking = _generation_spans.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(map(len, blocks))
            spans.append((start, start + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attributes, as transformers' does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes, got {name!r}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise TemplateRenderError(str(message))


@functools.lru_cache(maxsize=1)
def chat_sandbox() -> ImmutableSandboxedEnvironment:
    """The sandboxed environment chat templates render in, with the settings and globals transformers gives them."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    environment.globals["dict"] = dict
    environment.globals["namespace"] = _Namespace
    return environment


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    return chat_sandbox().from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's ``chat_template``, with the stop token it writes after assistant messages.

    Build one with :meth:`from_tokenizer`. ``now`` is the moment ``strftime_now`` reports, fixed for the
    template's lifetime, so every prompt of a run carries the same date (Llama-3.x date headers).
    """

    name: str
    source: str
    stop: str
    special_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    origin: str = "the tokenizer's chat_template"
    now: datetime = field(default_factory=datetime.now, repr=False)
    multi_turn: bool = True
    description: str = "The model's own chat template (the tokenizer's chat_template)."

    @property
    def has_generation_blocks(self) -> bool:
        return _uses_generation_blocks(self.source)

    @classmethod
    def from_tokenizer(cls, tokenizer, *, name: str = MODEL_TEMPLATE) -> ChatTemplate:
        """The chat template of ``tokenizer`` (``model``, or ``model:NAME`` for one of its named templates).

        Raises :class:`InputError` when it has none or writes no stop token after assistant messages.
        """
        source = getattr(tokenizer, "chat_template", None)
        wanted = name.partition(":")[2] or "default"
        if isinstance(source, Mapping):
            if wanted not in source:
                raise InputError(f"the tokenizer has no chat template named '{wanted}'; it has: "
                                 f"{', '.join(sorted(source))}", field="template")
            source = source[wanted]
        elif wanted != "default":
            raise InputError(f"the tokenizer has a single chat template, not one named '{wanted}'; use "
                             f"--template {MODEL_TEMPLATE}", field="template")
        if not isinstance(source, str) or not source.strip():
            raise InputError("the tokenizer has no chat_template, so `--template model` cannot be used; name a "
                             "template with --template (e.g. chatml, llama-3, or a path to a .jinja file)",
                             field="template")
        return cls.from_source(source, tokenizer, name=name)

    @classmethod
    def from_source(cls, source: str, tokenizer, *, name: str = MODEL_TEMPLATE,
                    origin: str = "the tokenizer's chat_template") -> ChatTemplate:
        """A chat template's Jinja ``source`` for ``tokenizer`` (whose special tokens it renders and splits on)."""
        try:
            _compile(source)
        except TemplateSyntaxError as error:
            raise InputError(f"the chat template is not valid Jinja: {error.message}", source=origin,
                             location=f"line {error.lineno}", field="template") from None
        special_tokens = {key: value for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
        probe = cls(name=name, source=source, stop="", special_tokens=special_tokens, origin=origin)
        return cls(name=name, source=source, stop=probe._find_stop(tokenizer), special_tokens=special_tokens,
                   origin=origin, now=probe.now)

    def stop_text(self, eos_token: str | None = None) -> str:
        return self.stop

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool, **kwargs) -> str:
        """The template's text for ``messages``, as ``apply_chat_template(..., tokenize=False)`` gives it."""
        return self._render(messages, add_generation_prompt, kwargs)[0]

    def render_with_generation_spans(self, messages: Sequence[Mapping]) -> tuple[str, list[tuple[int, int]]]:
        """The text of the whole conversation and the ``(start, end)`` of each ``{% generation %}`` block."""
        return self._render(messages, False, {})

    def render_prompt(self, messages: Sequence[Mapping], *, bos_token: str | None = None,
                      eos_token: str | None = None) -> str:
        """The prompt for the next assistant turn (``add_generation_prompt=True``)."""
        return self.render(messages, add_generation_prompt=True)

    def _render(self, messages, add_generation_prompt: bool, kwargs) -> tuple[str, list[tuple[int, int]]]:
        context = {**self.special_tokens, "messages": [dict(m) for m in messages], "tools": kwargs.pop("tools", None),
                   "documents": kwargs.pop("documents", None), "add_generation_prompt": add_generation_prompt,
                   "strftime_now": self.now.strftime, **kwargs}
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        token = _generation_spans.set((blocks, spans))
        try:
            for block in _compile(self.source).generate(context):
                blocks.append(block)
        except TemplateRenderError as error:
            raise TemplateRenderError(f"the chat template refused the conversation: {error}") from None
        except UndefinedError as error:
            raise TemplateRenderError(f"the chat template failed to render: {error}") from None
        except SecurityError as error:
            raise TemplateRenderError(f"the chat template was refused by the sandbox: {error}") from None
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
            raise TemplateRenderError(f"the chat template failed to render: {type(error).__name__}: {error}") from None
        finally:
            _generation_spans.reset(token)
        return "".join(blocks), spans

    def _find_stop(self, tokenizer) -> str:
        """The first added token the template writes after an assistant message's content."""
        answer = "\u2461 probe answer"
        failure = None
        for probe in (_PROBE + [{"role": "user", "content": "\u2462 next question"}], _PROBE):
            try:
                text = self.render(probe, add_generation_prompt=False)
            except TemplateRenderError as error:
                failure = failure or error
                continue
            after = text[text.find(answer) + len(answer):] if answer in text else ""
            stop = _first_added_token(tokenizer, after)
            if stop:
                return stop
            failure = None
        if failure is not None:
            raise InputError(f"{failure} (rendering a user/assistant conversation)", source=self.origin,
                             field="template")
        raise InputError("the tokenizer's chat_template writes no end-of-turn token after an assistant message, so "
                         "there is no stop token to train; name a template with an explicit stop token with "
                         "--template (a .jinja file with `stop:` in its front matter)", field="template")


_PROBE = [{"role": "user", "content": "\u2460 probe question"}, {"role": "assistant", "content": "\u2461 probe answer"}]


def _first_added_token(tokenizer, text: str) -> str | None:
    """The first added (special) token in ``text``, as the tokenizer splits it."""
    if not text:
        return None
    added = set(tokenizer.added_tokens_encoder)
    for token in tokenizer.tokenize(text):
        if token in added:
            return token
    return None


def _uses_generation_blocks(source: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None

