"""Encoding conversations in the tokenizer's own chat template, exactly as a server prompts the model.

For every assistant turn of a conversation:

* the ids before it are the tokenizer's ids of ``render(turns before it, add_generation_prompt=True)``,
  the prompt string tokenized on its own, as ``apply_chat_template`` and any server tokenize it; no text of
  the answer can merge with the end of the prompt;
* the trained span is the answer as the template writes it, tokenized on its own, then the template's
  stop token, once;
* the rendering must be prefix-stable: the prompt of a later turn starts with the earlier prompt, that
  turn's answer and the stop token, in text and in ids. A conversation that is not (a template that rewrites
  earlier turns, as reasoning templates that drop earlier ``<think>`` blocks do, or an earlier answer that
  merges with the text after it) is never trained on misaligned labels: :meth:`ChatTemplateEncoder.encode_rows`
  trains it as one row per assistant turn, each that turn's served prompt and its answer (``split_turns=True``,
  the default), and :meth:`~ChatTemplateEncoder.encode` refuses it with the reason.

Everything else (system and user turns, role headers, date lines) is masked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from .chat_template import ChatTemplate
from .templating import PromptTemplate, TemplateRenderError
from .tokenization import IGNORE_INDEX, EncodedExample, ExampleEncoder, ExampleError

logger = logging.getLogger(__name__)


class NotOneSequence(ExampleError):
    """A conversation whose turns cannot share one sequence with every turn after its served prompt."""


def encoder_for(tokenizer, template: PromptTemplate | ChatTemplate, **options) -> ExampleEncoder:
    """The encoder for ``template``: :class:`ChatTemplateEncoder` for a chat template, else :class:`ExampleEncoder`."""
    if isinstance(template, ChatTemplate):
        return ChatTemplateEncoder(tokenizer, template, **options)
    return ExampleEncoder(tokenizer, template, **options)


class ChatTemplateEncoder(ExampleEncoder):
    """:class:`~hf_instruct_tune.tokenization.ExampleEncoder` for a :class:`~hf_instruct_tune.chat_template.ChatTemplate`.

    Takes the same options, and ``split_turns``: train a conversation that cannot be one sequence as one row
    per assistant turn (default) rather than refuse it. An Alpaca ``input`` joins its user turn after a blank line.
    """

    template: ChatTemplate

    def __init__(self, tokenizer, template: ChatTemplate, *, split_turns: bool = True, **options):
        super().__init__(tokenizer, template, **options)
        self.split_turns = split_turns
        self.split_conversations = 0

    def encode_rows(self, example: Mapping) -> list[EncodedExample]:
        """The example as one row, or, where its turns cannot share one sequence, one row per assistant turn."""
        if "text" in example or not self.split_turns:
            return super().encode_rows(example)
        try:
            return super().encode_rows(example)
        except NotOneSequence as error:
            if not self.split_conversations:
                logger.warning("Training a conversation as one row per assistant turn (and any like it): %s", error)
            self.split_conversations += 1
        messages = self.normalized_messages(example["messages"])
        rows = [self.last_turn_row(messages[: turn + 1])
                for turn, message in enumerate(messages) if message["role"] == "assistant"]
        return [row for row in rows if row is not None]

    def encode(self, example: Mapping) -> EncodedExample | None:
        if "text" in example:
            return super().encode(example)
        input_ids, labels, _ = self.encode_turns(example["messages"])
        return self._fit(EncodedExample(input_ids, labels))

    def encode_turns(self, messages: Sequence[Mapping]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """``input_ids``, ``labels`` and the ``(start, end)`` token span of each assistant turn."""
        messages = self.normalized_messages(messages)
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant_turns:
            raise ExampleError("has no assistant turn, so nothing would be trained", field="messages")
        blocks = self._generation_blocks(messages, assistant_turns)
        input_ids: list[int] = []
        spans: list[tuple[int, int]] = []
        expected = ""  # the text every later prompt must start with
        for number, turn in enumerate(assistant_turns):
            prompt = self._render(messages[:turn], add_generation_prompt=True)
            if not prompt.startswith(expected):
                raise self._rewrites_error(assistant_turns[number - 1])
            answer = self._answer_text(messages, turn, prompt, blocks[number] if blocks else None)
            prompt_ids = self._tokenize_prompt(prompt)
            if prompt_ids[: len(input_ids)] != input_ids:
                raise NotOneSequence(
                    f"{self._template_label()} tokenizes assistant turn messages[{assistant_turns[number - 1]}] "
                    "differently inside the longer conversation than after its own prompt (text at its edge merges "
                    "into one token), so its labels would not match how a server prompts the model; split the "
                    "conversation so that turn ends a row", field=f"messages[{assistant_turns[number - 1]}].content")
            answer_ids = self._tokenize_answer(answer) + [self.stop_token_id]
            spans.append((len(prompt_ids), len(prompt_ids) + len(answer_ids)))
            input_ids = prompt_ids + answer_ids
            expected = prompt + answer + self.stop_text
        if self.train_on_prompt:
            labels = list(input_ids)
        else:
            labels = [IGNORE_INDEX] * len(input_ids)
            for start, end in spans:
                labels[start:end] = input_ids[start:end]
        return input_ids, labels, spans

    def encode_prompt(self, messages: Sequence[Mapping]) -> list[int]:
        """``apply_chat_template(messages, add_generation_prompt=True)``'s ids: what the model is prompted with."""
        return self._tokenize_prompt(self.render_prompt(messages))

    def render_prompt(self, messages: Sequence[Mapping]) -> str:
        return self._render(self.normalized_messages(messages), add_generation_prompt=True)

    # -- internals ---------------------------------------------------------------------------------

    def normalized_messages(self, messages: Sequence[Mapping]) -> list[dict]:
        """The messages as the chat template receives them: ``input`` joined to its turn, answers without a trailing
        stop token (an answer with the stop token inside is refused)."""
        normalized = []
        for index, message in enumerate(messages):
            message = {key: value for key, value in message.items() if key != "input"}
            if messages[index].get("input"):
                message["content"] = f"{message['content']}\n\n{messages[index]['input']}"
            if message["role"] == "assistant":
                field = f"messages[{index}].content"
                message["content"] = self._strip_stop(message["content"], field)
                if self.stop_text in message["content"]:
                    raise ExampleError(f"contains the stop token {self.stop_text!r} inside the answer; the model "
                                       "would learn to stop there", field=field)
            normalized.append(message)
        return normalized

    def last_turn_row(self, messages: Sequence[Mapping]) -> EncodedExample | None:
        """The row that trains the last message (an answer) after its served prompt, the only turn trained;
        ``None`` when it is dropped for its length."""
        messages = self.normalized_messages(messages)
        prompt = self._render(messages[:-1], add_generation_prompt=True)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        blocks = self._generation_blocks(messages, turns)
        answer = self._answer_text(messages, len(messages) - 1, prompt, blocks[-1] if blocks else None)
        prompt_ids = self._tokenize_prompt(prompt)
        answer_ids = self._tokenize_answer(answer) + [self.stop_token_id]
        labels = prompt_ids if self.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
        return self._fit(EncodedExample(prompt_ids + answer_ids, labels + answer_ids))

    def _generation_blocks(self, messages: list[dict], assistant_turns: list[int]) -> list[tuple[str, int]] | None:
        """``(text before the block, text from the block on)`` per assistant turn, where the template marks them.

        A block marks where a turn's trained text starts; it runs to the stop token, so what the model must write
        before stopping (a space the template puts before the marker, say) is trained even outside the block."""
        if not self.template.has_generation_blocks:
            return None
        try:
            text, spans = self.template.render_with_generation_spans(messages)
        except TemplateRenderError as error:
            raise ExampleError(str(error), field="messages") from None
        if len(spans) != len(assistant_turns):
            raise ExampleError(f"{self._template_label()} marks {len(spans)} {{% generation %}} blocks for "
                               f"{len(assistant_turns)} assistant turns", field="messages")
        return [(text[:start], text[start:]) for start, _ in spans]

    def _answer_text(self, messages: list[dict], turn: int, prompt: str, block: tuple[str, str] | None) -> str:
        """The text the model writes for ``messages[turn]`` after ``prompt``, up to the stop token."""
        field = f"messages[{turn}].content"
        if block is not None:
            before, answer = block
            if before != prompt:
                raise ExampleError(f"{self._template_label()} opens the {{% generation %}} block of this turn "
                                   "elsewhere than where its generation prompt ends", field=field)
        else:
            through = self._render(messages[: turn + 1], add_generation_prompt=False)
            if not through.startswith(prompt):
                raise ExampleError(f"{self._template_label()} renders this assistant turn differently from its "
                                   "generation prompt (add_generation_prompt=True), so the prompt the model is "
                                   "served with would not be the one it was trained after", field=field)
            answer = through[len(prompt):]
        stop = answer.find(self.stop_text)
        return answer[:stop] if stop >= 0 else answer

    def _rewrites_error(self, turn: int) -> NotOneSequence:
        return NotOneSequence(
            f"{self._template_label()} renders assistant turn messages[{turn}] differently once the conversation "
            "goes on (it rewrites earlier turns, as reasoning templates that drop earlier <think> blocks do), so that "
            "turn cannot be trained the way a server prompts the model. Split such conversations so each row ends "
            "at the turn to train, or remove what the template drops (the <think> block) from earlier turns, or "
            "name another --template", field=f"messages[{turn}].content")

    def _template_label(self) -> str:
        return f"template '{self.template.name}' (the tokenizer's chat_template)"

    def _render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        try:
            return self.template.render(messages, add_generation_prompt=add_generation_prompt)
        except TemplateRenderError as error:
            raise ExampleError(str(error), field="messages") from None

    def _tokenize_answer(self, text: str) -> list[int]:
        """The ids of an answer on its own, without the prefix space SentencePiece puts at the start of a string."""
        if not text:
            return []
        newline = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        ids = list(self.tokenizer("\n" + text, add_special_tokens=False)["input_ids"])
        if newline and ids[: len(newline)] == newline:
            return ids[len(newline):]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tokenize_prompt(self, text: str) -> list[int]:
        """The ids of a rendered prompt as ``apply_chat_template`` gives them: one string, no special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
