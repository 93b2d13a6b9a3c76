"""What ``inspect`` checks: the encoded examples, before anyone spends GPU hours on them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .chat_encoding import ChatTemplateEncoder, NotOneSequence
from .tokenization import IGNORE_INDEX, ExampleEncoder


@dataclass
class ExampleReport:
    location: str
    input_ids: list[int]
    labels: list[int]
    checks: dict[str, bool] = field(default_factory=dict)
    dropped: bool = False

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def trained_text(self, tokenizer) -> list[str]:
        """The text of each supervised span, special tokens shown."""
        spans, run = [], []
        for token, label in zip(self.input_ids, self.labels):
            if label != IGNORE_INDEX:
                run.append(token)
            elif run:
                spans.append(run)
                run = []
        spans += [run] if run else []
        return [tokenizer.decode(span, skip_special_tokens=False) for span in spans]


def inspect_rows(encoder: ExampleEncoder, example: Mapping, location: str) -> list[ExampleReport]:
    """Like :func:`inspect_example`, for each training row of ``example``: a conversation that the chat template
    cannot hold in one sequence is trained one row per assistant turn, each checked ("line 3, turn 1 of 2")."""
    try:
        return [inspect_example(encoder, example, location)]
    except NotOneSequence:
        if not getattr(encoder, "split_turns", False):
            raise
    messages = encoder.normalized_messages(example["messages"])
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return [_checked(encoder, {"messages": messages[: turn + 1]}, encoder.last_turn_row(messages[: turn + 1]),
                     f"{location}, turn {number} of {len(turns)}", last_turn_only=True)
            for number, turn in enumerate(turns, 1)]


def inspect_example(encoder: ExampleEncoder, example: Mapping, location: str) -> ExampleReport:
    """Encode ``example`` and check the labels rules on the result."""
    return _checked(encoder, example, encoder.encode(example), location)


def _checked(encoder: ExampleEncoder, example: Mapping, encoded, location: str, *,
             last_turn_only: bool = False) -> ExampleReport:
    if encoded is None:
        return ExampleReport(location, [], [], {"fits_max_length": False}, dropped=True)
    ids, labels = encoded.input_ids, encoded.labels
    stop, bos = encoder.stop_token_id, encoder.bos_token_id
    turns = sum(m["role"] == "assistant" for m in example["messages"]) if "messages" in example else 1
    turns = 1 if last_turn_only else turns
    trained = [label for label in labels if label != IGNORE_INDEX]
    chat = isinstance(encoder, ChatTemplateEncoder)
    checks = {
        "stop_token_once_per_response": trained.count(stop) == turns or encoded.truncated,
        "ends_with_stop_token": (bool(trained) and labels[-1] == stop) != encoded.truncated,
        # a chat template may write its BOS token as a turn marker (SmolLM2's is <|im_start|>): only a doubled one
        "single_bos": bos is None or (ids[:2] != [bos, bos] if chat else
                                      ids.count(bos) <= 1 and (bos not in ids or ids[0] == bos)),
        "labels_match_input_ids": all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids)),
    }
    if chat and "messages" in example and not encoder.train_on_prompt:
        checks.update(_chat_template_checks(encoder, example["messages"], ids, labels, encoded.truncated,
                                            last_turn_only=last_turn_only))
    if "messages" in example:
        last = max(i for i, m in enumerate(example["messages"]) if m["role"] == "assistant")
        prompt_ids = encoder.encode_prompt(example["messages"][:last])
        checks["prompt_matches_inference"] = ids[: len(prompt_ids)] == prompt_ids
    return ExampleReport(location, ids, labels, checks)


def _chat_template_checks(encoder: ChatTemplateEncoder, messages, ids, labels, truncated: bool, *,
                          last_turn_only: bool = False) -> dict[str, bool]:
    """Each assistant turn one supervised span, ending in the stop token, after exactly the ids that the
    tokenizer's own ``apply_chat_template(turns before it, add_generation_prompt=True)`` gives."""
    messages = encoder.normalized_messages(messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"][-1 if last_turn_only else 0:]
    starts = [i for i in range(len(labels)) if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]
    ends = [i + 1 for i in range(len(labels)) if labels[i] != IGNORE_INDEX and (i + 1 == len(labels)
                                                                             or labels[i + 1] == IGNORE_INDEX)]
    one_span_each = len(starts) == len(turns) and all(ids[end - 1] == encoder.stop_token_id for end in ends)
    served = all(
        ids[:start] == list(encoder.tokenizer.apply_chat_template(
            messages[:turn], chat_template=encoder.template.source, add_generation_prompt=True, tokenize=True,
            return_dict=False))
        for start, turn in zip(starts, turns))
    return {"one_span_per_assistant_turn": one_span_each or truncated,
            "prompts_match_apply_chat_template": served and len(starts) == len(turns) or truncated}


def render_tokens(tokenizer, report: ExampleReport) -> str:
    """The example's text with trained spans marked ``⟦…⟧`` and special tokens shown."""
    pieces, run, trained_run = [], [], None
    for token, label in zip(report.input_ids, report.labels):
        trained = label != IGNORE_INDEX
        if trained_run is not None and trained != trained_run:
            pieces.append(_span(tokenizer, run, trained_run))
            run = []
        run.append(token)
        trained_run = trained
    if run:
        pieces.append(_span(tokenizer, run, trained_run))
    return "".join(pieces)


def _span(tokenizer, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"⟦{text}⟧" if trained else text


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {"count": len(ordered), "min": ordered[0], "median": ordered[len(ordered) // 2],
            "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], "max": ordered[-1],
            "total_tokens": sum(ordered)}
