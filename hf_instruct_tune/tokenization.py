"""EOS-safe tokenization: one normalized example to ``input_ids`` and ``labels``.

The rules, each proven by a test in ``tests/test_tokenization.py``:

* every response ends with the template's stop token exactly once, in ``input_ids`` and in ``labels``,
  whatever the pad token is and also when the text already ends with it;
* labels are -100 on the prompt (unless ``train_on_prompt``) and nowhere else here; padding is masked
  by the collator, by position;
* at most one BOS token, at position 0;
* the prompt is tokenized on its own, so its ids are exactly those :meth:`ExampleEncoder.encode_prompt`
  gives at inference: no token can merge across the prompt/response boundary;
* special tokens written in user text (instruction, input, system, response) are tokenized as plain text,
  so a response cannot end early and a prompt cannot gain a second BOS or a stray EOS;
* an example longer than ``max_length`` is dropped (``overlong="drop"``, the default) or its response is
  cut (``overlong="truncate"``), and then it does not end in the stop token, because it did not end.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import InputError
from .templating import PromptTemplate, TemplateRenderError

IGNORE_INDEX = -100
OVERLONG_POLICIES = ("drop", "truncate")


class ExampleError(ValueError):
    """An example cannot be encoded; ``field`` names the culprit. The caller adds the file and row."""

    def __init__(self, message: str, field: str | None = None):
        self.message = message
        self.field = field
        super().__init__(message)


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def as_dict(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


class ExampleEncoder:
    """Encode normalized examples (see :mod:`hf_instruct_tune.formatters`) for a tokenizer and template.

    Args:
        tokenizer: a Hugging Face tokenizer.
        template: the prompt template.
        max_length: the longest sequence to train on, or ``None``.
        train_on_prompt: also compute the loss on prompt tokens.
        overlong: ``"drop"`` examples longer than ``max_length`` or ``"truncate"`` their responses.
    """

    def __init__(self, tokenizer, template: PromptTemplate, *, max_length: int | None = None,
                 train_on_prompt: bool = False, overlong: str = "drop"):
        if overlong not in OVERLONG_POLICIES:
            raise InputError(f"`overlong` should be one of {OVERLONG_POLICIES}, got {overlong!r}.")
        if max_length is not None and max_length < 2:
            raise InputError(f"`max_length` should be at least 2, got {max_length}.")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.train_on_prompt = train_on_prompt
        self.overlong = overlong
        self.stop_text = template.stop_text(tokenizer.eos_token)
        self.stop_token_id = single_token_id(tokenizer, self.stop_text, template.name)
        self.bos_token_id = tokenizer.bos_token_id
        self.adds_bos = adds_bos_token(tokenizer)
        self._added_tokens = tuple(getattr(tokenizer, "added_tokens_encoder", {}) or ())

    # -- public API --------------------------------------------------------------------------------

    def encode(self, example: Mapping) -> EncodedExample | None:
        """Encode one example for training; ``None`` when it is dropped for being longer than ``max_length``."""
        if "text" in example:
            # Already-formatted text keeps its special tokens; only the trailing stop token is normalized.
            segments = [(self._strip_stop(example["text"], "text"), True, False)]
        else:
            segments = self._conversation_segments(example["messages"], for_inference=False)
        input_ids: list[int] = []
        labels: list[int] = []
        for text, trained, split_special in segments:
            ids = self._tokenize(text, split_special=split_special)
            if trained:
                ids.append(self.stop_token_id)
            input_ids += ids
            labels += ids if (trained or self.train_on_prompt) else [IGNORE_INDEX] * len(ids)
        input_ids, labels = self._with_single_bos(input_ids, labels)
        if all(label == IGNORE_INDEX for label in labels):
            raise ExampleError("has no supervised tokens")
        return self._fit(EncodedExample(input_ids, labels))

    def encode_rows(self, example: Mapping) -> list[EncodedExample]:
        """The training rows of one example: itself, or none when it is dropped for its length (a chat-template
        encoder may split a conversation into one row per assistant turn)."""
        encoded = self.encode(example)
        return [encoded] if encoded is not None else []

    def encode_prompt(self, messages: Sequence[Mapping]) -> list[int]:
        """The ids of the prompt for the next assistant turn, exactly as training tokenized it."""
        ids: list[int] = []
        for text, trained, split_special in self._conversation_segments(list(messages), for_inference=True):
            ids += self._tokenize(text, split_special=split_special)
            if trained:
                ids.append(self.stop_token_id)
        return self._with_single_bos(ids, list(ids))[0]

    def render_prompt(self, messages: Sequence[Mapping]) -> str:
        """The prompt text for the next assistant turn (what the model card shows as an example)."""
        return "".join(text + (self.stop_text if trained else "")
                       for text, trained, _ in self._conversation_segments(list(messages), for_inference=True))

    # -- internals ---------------------------------------------------------------------------------

    def _conversation_segments(self, messages: list[Mapping], *, for_inference: bool) -> list[tuple[str, bool, bool]]:
        """Split a conversation into (text, trained, split_special) pieces, in order.

        The template is rendered with placeholders for the user's texts; the rendered template text is
        tokenized with its special tokens, the user's texts as plain text (so ``<|im_end|>`` typed in an
        instruction or a response stays text), and each response is its own piece.
        """
        messages = [dict(m) for m in messages]
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in assistant_turns:
            messages[i]["content"] = self._strip_stop(messages[i]["content"], f"messages[{i}].content")
        if not self.template.multi_turn:
            user_turns = sum(m["role"] == "user" for m in messages)
            if len(assistant_turns) > (0 if for_inference else 1) or user_turns > 1:
                raise ExampleError(f"has several turns, but the template '{self.template.name}' is single-turn; "
                                   "use a chat template such as 'chatml' or 'llama-3'", field="messages")
        placeheld, texts = _with_placeholders(messages)
        ends = assistant_turns + ([len(messages)] if for_inference else [])
        segments: list[tuple[str, bool, bool]] = []
        consumed = ""
        for end in ends:
            prompt = self._render(placeheld[:end])
            if not prompt.startswith(consumed):
                raise ExampleError(
                    f"template '{self.template.name}' renders earlier turns differently from how they were "
                    "trained; a multi-turn template must render each past assistant turn as its content "
                    "followed by the stop token", field="messages")
            for index, piece in enumerate(_PLACEHOLDER.split(prompt[len(consumed):])):
                if index % 2:
                    segments.append((texts[int(piece)], False, True))
                elif piece:
                    segments.append((piece, False, False))
            if end < len(messages):
                segments.append((messages[end]["content"], True, True))
                consumed = prompt + placeheld[end]["content"] + self.stop_text
        return self._joined_prompts(segments)

    def _joined_prompts(self, segments: list[tuple[str, bool, bool]]) -> list[tuple[str, bool, bool]]:
        """Each run of prompt pieces as one string, tokenized as a server tokenizes the rendered prompt (so a
        ``"\n\n"`` across a piece boundary is the same token there), unless a user's text in the run spells a
        special token: then the pieces stay apart and that text is tokenized as plain text."""
        joined: list[tuple[str, bool, bool]] = []
        run: list[tuple[str, bool, bool]] = []
        for segment in segments + [("", True, False)]:
            if not segment[1]:
                run.append(segment)
                continue
            if any(split and any(token in text for token in self._added_tokens) for text, _, split in run):
                joined += run
            elif run:
                joined.append(("".join(text for text, _, _ in run), False, False))
            run = []
            if segment[0]:
                joined.append(segment)
        return joined

    def _render(self, messages: list[Mapping]) -> str:
        try:
            return self.template.render_prompt(messages, bos_token=self.tokenizer.bos_token,
                                               eos_token=self.tokenizer.eos_token)
        except TemplateRenderError as error:
            raise ExampleError(str(error), field=error.field) from None

    def _strip_stop(self, text: str, field: str) -> str:
        stripped = text.rstrip()
        while stripped.endswith(self.stop_text):
            stripped = stripped[: -len(self.stop_text)].rstrip()
        if not stripped.strip():
            raise ExampleError("is empty once the stop token is removed, so nothing would be trained", field=field)
        return stripped if stripped != text.rstrip() else text

    def _tokenize(self, text: str, *, split_special: bool) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=split_special)["input_ids"])

    def _with_single_bos(self, input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """At most one BOS, at position 0: the tokenizer's when it adds one, or the template's own."""
        if self.bos_token_id is None:
            return input_ids, labels
        leading = 0
        while leading < len(input_ids) and input_ids[leading] == self.bos_token_id:
            leading += 1
        if not (self.adds_bos or leading):
            return input_ids, labels
        return [self.bos_token_id] + input_ids[leading:], [IGNORE_INDEX] + labels[leading:]

    def _fit(self, example: EncodedExample) -> EncodedExample | None:
        if self.max_length is None or len(example.input_ids) <= self.max_length:
            return example
        if self.overlong == "drop":
            return None
        labels = example.labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None
        return EncodedExample(example.input_ids[: self.max_length], labels, truncated=True)


_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


def _with_placeholders(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """Messages whose non-empty texts are replaced by numbered placeholders, and the texts they stand for."""
    texts: list[str] = []
    placeheld = []
    for message in messages:
        copy = dict(message)
        for key in ("content", "input"):
            value = message.get(key)
            if isinstance(value, str) and value:
                copy[key] = f"\ue000{len(texts)}\ue001"
                texts.append(value)
        placeheld.append(copy)
    return placeheld, texts


def single_token_id(tokenizer, token: str, template_name: str) -> int:
    """The id of ``token``, which must be one token of ``tokenizer``'s vocabulary."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(
            f"template '{template_name}' ends responses with {token!r}, which is not a single token of this "
            f"tokenizer (it splits into {len(ids)}); choose a template whose stop token the model knows, "
            "e.g. 'chatml' for SmolLM2/Qwen or 'llama-3' for Llama 3"
        )
    return ids[0]


def adds_bos_token(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS token in front of text by default."""
    if tokenizer.bos_token_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == tokenizer.bos_token_id
