"""The model's own chat template (``--template model``): spans, stop token and prompts, family by family.

Every family is a tiny tokenizer carrying a real family's template shape (``hf_instruct_tune.testing.chat_templates``).
The oracle is transformers' own ``apply_chat_template``: the ids before each trained span must be exactly its ids
for the turns before it with ``add_generation_prompt=True``, as any server prompts the model.
"""

from __future__ import annotations

import datetime
import functools
import json

import pytest
from helpers import supervised_runs, write_jsonl

from hf_instruct_tune.chat_encoding import ChatTemplateEncoder, encoder_for
from hf_instruct_tune.chat_template import ChatTemplate
from hf_instruct_tune.errors import InputError
from hf_instruct_tune.recipe import default_template_name, resolve_template
from hf_instruct_tune.testing.chat_templates import SHAPES, build_chat_tokenizer
from hf_instruct_tune.tokenization import IGNORE_INDEX, ExampleError

CONVERSATION = [
    {"role": "system", "content": "Answer: yes or no."},
    {"role": "user", "content": "Is Paris the capital of France?"},
    {"role": "assistant", "content": "Sure, yes."},
    {"role": "user", "content": "And Lyon?"},
    {"role": "assistant", "content": "No, it is not."},
]
NO_SYSTEM = {"inst", "gemma"}  # templates that refuse a system turn
FAMILIES = sorted(SHAPES)


@functools.lru_cache(maxsize=None)
def tokenizer_for(shape: str):
    return build_chat_tokenizer(shape)


def conversation_for(shape: str) -> list[dict]:
    return CONVERSATION[1:] if shape in NO_SYSTEM else CONVERSATION


def served_prompt_ids(tokenizer, messages) -> list[int]:
    """What transformers (and so a server) feeds the model before the next assistant turn."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def encode(shape: str, messages, **options):
    tokenizer = tokenizer_for(shape)
    encoder = ChatTemplateEncoder(tokenizer, ChatTemplate.from_tokenizer(tokenizer), **options)
    return encoder, encoder.encode_turns(messages)


@pytest.mark.parametrize("shape", FAMILIES)
def test_renders_exactly_what_transformers_renders(shape):
    tokenizer = tokenizer_for(shape)
    template = ChatTemplate.from_tokenizer(tokenizer)
    messages = conversation_for(shape)
    for end in range(1, len(messages) + 1):
        for generation_prompt in (True, False):
            assert template.render(messages[:end], add_generation_prompt=generation_prompt) == \
                tokenizer.apply_chat_template(messages[:end], add_generation_prompt=generation_prompt, tokenize=False)


@pytest.mark.parametrize("shape", FAMILIES)
def test_the_stop_token_is_the_end_of_turn_marker_the_template_writes(shape):
    assert ChatTemplate.from_tokenizer(tokenizer_for(shape)).stop == SHAPES[shape].stop


@pytest.mark.parametrize("shape", FAMILIES)
def test_every_assistant_turn_is_one_span_after_the_served_prompt(shape):
    """Each assistant turn (not only the last) is trained: its content then the stop token, once; the ids before
    it are the served prompt's; system and user turns, headers and date lines are masked."""
    messages = conversation_for(shape)
    encoder, (ids, labels, spans) = encode(shape, messages)
    tokenizer, stop = encoder.tokenizer, encoder.stop_token_id
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(spans) == len(turns) == 2
    runs = supervised_runs(labels)
    assert len(runs) == len(turns)  # the naive "mask everything before the last assistant turn" has one
    for (start, end), turn, run in zip(spans, turns, runs):
        assert ids[:start] == served_prompt_ids(tokenizer, messages[:turn])
        assert labels[start:end] == ids[start:end] == run
        assert run[-1] == stop and run.count(stop) == 1
        assert tokenizer.decode(run[:-1]).strip() == messages[turn]["content"]
    masked = [i for i, label in enumerate(labels) if label == IGNORE_INDEX]
    assert all(not any(start <= i < end for start, end in spans) for i in masked)
    assert labels.count(stop) == len(turns)


def test_a_boundary_merge_cannot_misalign_the_prompt():
    """ChatML's "assistant\\n" followed by an answer starting with "\\n\\n": tokenized as one string, the newlines
    merge across the boundary, so the naive whole-conversation tokenization puts different ids before the answer
    than the server's prompt has. The encoder's ids before the span are the prompt's own."""
    shape = "chatml-default-system"
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "\n\nhello\n\nthere"}]
    encoder, (ids, labels, spans) = encode(shape, messages)
    tokenizer = encoder.tokenizer
    served = served_prompt_ids(tokenizer, messages[:1])
    naive = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert naive[: len(served)] != served  # the case is real: the naive way misaligns here
    assert ids[: spans[0][0]] == served
    assert tokenizer.decode(labels[spans[0][0]:spans[0][1]]) == "\n\nhello\n\nthere<|im_end|>"


def test_pad_is_eos_keeps_the_stop_label_of_every_turn():
    """[INST] templates end answers with </s>, which is also the pad token: the collator masks padding by
    position, so each turn keeps its stop label; masking by pad id (the naive way) drops them all."""
    import torch

    from hf_instruct_tune.collator import EOSSafeCollator

    shape = "inst"
    tokenizer = tokenizer_for(shape)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(SHAPES[shape].stop)
    long_one = encode(shape, conversation_for(shape))[1]
    short_one = encode(shape, conversation_for(shape)[:2])[1]
    batch = EOSSafeCollator(pad_token_id=tokenizer.pad_token_id)(
        [{"input_ids": ids, "labels": labels} for ids, labels, _ in (long_one, short_one)])
    stop = tokenizer.eos_token_id
    assert [int((row == stop).sum()) for row in batch["labels"]] == [2, 1]
    naive = batch["input_ids"].clone().masked_fill(batch["input_ids"] == tokenizer.pad_token_id, IGNORE_INDEX)
    assert int((naive == stop).sum()) == 0
    assert bool((batch["labels"][1][batch["attention_mask"][1] == 0] == IGNORE_INDEX).all())
    assert torch.equal(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX],
                       torch.tensor([label for label in long_one[1] if label != IGNORE_INDEX]))


def test_gemma_the_turn_marker_is_the_stop_token_and_eos_never_appears():
    encoder, (ids, labels, _) = encode("gemma", conversation_for("gemma"))
    tokenizer = encoder.tokenizer
    assert encoder.stop_text == "<end_of_turn>" != tokenizer.eos_token
    assert tokenizer.eos_token_id not in ids
    assert labels.count(encoder.stop_token_id) == 2


def test_glm_turns_that_end_with_the_next_role_marker_train_it_after_every_turn():
    """GLM writes no end-of-turn token: the next role marker (<|user|>) ends a turn, and it is what the model
    must learn to write, after the last turn too, where the template renders nothing."""
    encoder, (ids, labels, spans) = encode("glm", CONVERSATION)
    assert encoder.stop_text == "<|user|>"
    assert [labels[end - 1] for _, end in spans] == [encoder.stop_token_id] * 2
    assert ids[-1] == encoder.stop_token_id and labels[-1] == encoder.stop_token_id


def test_llama_31_one_bos_and_the_date_header_of_the_day():
    """The template writes BOS itself and the tokenizer also adds one by default: the encoder keeps one
    (re-tokenizing with special tokens, the naive way, gives two). The date line is today's, as served."""
    shape = "llama-3.1"
    encoder, (ids, _, spans) = encode(shape, CONVERSATION)
    tokenizer = encoder.tokenizer
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    prompt_text = encoder.render_prompt(CONVERSATION[:2])
    assert tokenizer(prompt_text)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # the naive way
    assert f"Today Date: {datetime.date.today().strftime('%d %b %Y')}\n" in prompt_text
    assert ids[: spans[0][0]] == served_prompt_ids(tokenizer, CONVERSATION[:2])


def test_generation_blocks_give_the_same_spans_as_transformers_assistant_masks():
    shape = "chatml-generation"
    encoder, (ids, labels, _) = encode(shape, CONVERSATION)
    assert encoder.template.has_generation_blocks
    tokenizer = encoder.tokenizer
    served = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert ids == served["input_ids"][: len(ids)]
    trained = [int(label != IGNORE_INDEX) for label in labels]
    assert trained == served["assistant_masks"][: len(ids)]


def test_generation_blocks_mark_where_the_trained_text_starts_and_it_runs_to_the_stop_token():
    """A block that closes before the stop token (and a space the template writes before it): the model must
    write both before it stops, so both are trained, once; the newline after the marker is not."""
    tokenizer = build_chat_tokenizer("chatml-generation")
    tokenizer.chat_template = SHAPES["chatml-generation"].template.replace(
        "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{- message['content'] }}{% endgeneration %}{{- ' <|im_end|>' }}")
    encoder = ChatTemplateEncoder(tokenizer, ChatTemplate.from_tokenizer(tokenizer))
    ids, labels, spans = encoder.encode_turns(CONVERSATION)
    assert [tokenizer.decode(labels[start:end]) for start, end in spans] == ["Sure, yes. <|im_end|>",
                                                                             "No, it is not. <|im_end|>"]
    assert ids[: spans[1][0]] == served_prompt_ids(tokenizer, CONVERSATION[:4])


def test_a_template_that_rewrites_earlier_turns_is_refused_clearly():
    """Qwen3-style reasoning templates drop earlier <think> blocks: training that turn in either form would not
    match what a server prompts with, so the conversation is refused with the way out."""
    shape = "qwen3-think"
    messages = [{"role": "user", "content": "hello"},
                {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nyes"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "no"}]
    with pytest.raises(ExampleError, match=r"template 'model' .*rewrites earlier turns.*Split such conversations") as error:
        encode(shape, messages)
    assert error.value.field == "messages[1].content"
    _, (_, labels, spans) = encode(shape, [dict(m, content=m["content"].split("</think>\n\n")[-1]) for m in messages])
    assert len(spans) == 2


def test_a_conversation_the_template_rewrites_is_trained_one_row_per_turn():
    """Each row is one turn's served prompt (the history as the template renders it then) and its answer: the
    first turn with its <think> block, the second after the history without it."""
    shape = "qwen3-think"
    tokenizer = tokenizer_for(shape)
    messages = [{"role": "user", "content": "hello"},
                {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nyes"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "no"}]
    encoder = ChatTemplateEncoder(tokenizer, ChatTemplate.from_tokenizer(tokenizer))
    rows = encoder.encode_rows({"messages": messages})
    assert len(rows) == 2
    for row, turn in zip(rows, (1, 3)):
        served = served_prompt_ids(tokenizer, messages[:turn])
        assert row.input_ids[: len(served)] == served
        assert set(row.labels[: len(served)]) == {IGNORE_INDEX}
        assert tokenizer.decode(row.labels[len(served):]) == messages[turn]["content"] + "<|im_end|>"
    assert "<think>" not in tokenizer.decode(rows[1].input_ids)
    with pytest.raises(ExampleError, match="rewrites earlier turns"):
        ChatTemplateEncoder(tokenizer, ChatTemplate.from_tokenizer(tokenizer), split_turns=False).encode_rows(
            {"messages": messages})


def test_an_earlier_answer_that_merges_with_its_prompt_in_the_longer_conversation_is_refused():
    """SentencePiece-style pre-tokenization and a template that writes the answer right after "[/INST]": inside
    the longer conversation "[/INST]Sure," is one token, so no sequence can hold both that turn's served prompt and
    its answer; the row is refused, never trained on misaligned labels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
                "{% endif %}{% endfor %}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.train_from_iterator(["[INST] Is Paris the capital of France? [/INST]Sure, yes.\n"] * 4, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = template
    encoder = ChatTemplateEncoder(tokenizer, ChatTemplate.from_tokenizer(tokenizer))
    messages = CONVERSATION[1:]
    assert "\u2581[/INST]Sure," in tokenizer.tokenize(encoder.render_prompt(messages[:3]))
    with pytest.raises(ExampleError, match="differently inside the longer conversation") as error:
        encoder.encode_turns(messages)
    assert error.value.field == "messages[1].content"
    ids, labels, spans = encoder.encode_turns(messages[:2])  # the last turn alone is fine
    assert ids[: spans[0][0]] == served_prompt_ids(tokenizer, messages[:1])
    assert tokenizer.decode(labels[spans[0][0]:]) == "Sure, yes.</s>"
    rows = encoder.encode_rows({"messages": messages})  # for training: one row per turn
    assert [row.input_ids for row in rows] == [ids, encoder.last_turn_row(messages).input_ids]


def test_an_answer_that_spells_the_stop_token_is_refused():
    with pytest.raises(ExampleError, match="stop token '<end_of_turn>' inside the answer") as error:
        encode("gemma", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a<end_of_turn>b"}])
    assert error.value.field == "messages[1].content"


def test_a_trailing_stop_token_in_the_answer_is_trained_once():
    _, (_, labels, _) = encode("phi-3", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes<|end|>"}])
    assert labels.count(tokenizer_for("phi-3").convert_tokens_to_ids("<|end|>")) == 1


def test_alpaca_input_joins_the_user_turn():
    encoder, (_, _, spans) = encode("chatml-default-system", [
        {"role": "user", "content": "Classify the sentiment.", "input": "I love rainy days."},
        {"role": "assistant", "content": "positive"}])
    assert "Classify the sentiment.\n\nI love rainy days.<|im_end|>" in encoder.render_prompt(
        [{"role": "user", "content": "Classify the sentiment.", "input": "I love rainy days."}])


def test_the_sandbox_refuses_what_transformers_refuses():
    tokenizer = build_chat_tokenizer("chatml-default-system")
    tokenizer.chat_template = SHAPES["chatml-default-system"].template + "{{ messages.__class__.__mro__ }}"
    with pytest.raises(InputError, match="refused by the sandbox"):
        ChatTemplate.from_tokenizer(tokenizer)


def test_defaults_the_model_template_for_conversations_when_the_tokenizer_has_one():
    from hf_instruct_tune.testing.tiny import build_tiny_tokenizer

    chat = tokenizer_for("gemma")
    plain = build_tiny_tokenizer()
    assert default_template_name("messages", chat) == "model"
    assert default_template_name("sharegpt", chat) == "model"
    assert default_template_name("prompt_completion", chat) == "model"
    assert default_template_name("alpaca", chat) == "alpaca"
    assert default_template_name("text", chat) == "raw"
    assert default_template_name("messages", plain) == "chatml"  # no chat_template: the stop-token sniffing
    assert default_template_name("prompt_completion", plain) == "alpaca"
    assert isinstance(encoder_for(chat, resolve_template(None, "messages", chat)), ChatTemplateEncoder)
    with pytest.raises(InputError, match="has no chat_template"):
        resolve_template("model", "messages", plain)
    with pytest.raises(InputError, match="no chat template named 'tool_use'"):
        tokenizer = build_chat_tokenizer("gemma")
        tokenizer.chat_template = {"default": SHAPES["gemma"].template}
        resolve_template("model:tool_use", "messages", tokenizer)


# -- through the CLI and the trainer -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_checkpoint(tmp_path_factory):
    from hf_instruct_tune.testing.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("gemma-like")
    tokenizer = build_chat_tokenizer("gemma")
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_inspect_json_shows_one_span_per_turn_with_no_template_named(gemma_checkpoint, tmp_path, capsys):
    """The issue's bar: a tokenizer the package has no built-in for, `inspect --json` with no --template."""
    from hf_instruct_tune.cli import main

    data = write_jsonl(tmp_path / "conv.jsonl", [{"messages": CONVERSATION[1:]}])
    assert main(["inspect", "--data", str(data), "--model", str(gemma_checkpoint), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trained_text"] == ["Sure, yes.<end_of_turn>", "No, it is not.<end_of_turn>"]
    assert report["checks"]["prompts_match_apply_chat_template"] is True
    assert report["checks"]["one_span_per_assistant_turn"] is True
    assert all(report["checks"].values())


def test_inspect_shows_a_rewritten_conversation_as_one_row_per_turn(tmp_path, capsys):
    from hf_instruct_tune.cli import main
    from hf_instruct_tune.testing.tiny import build_tiny_model

    checkpoint = tmp_path / "qwen3-like"
    tokenizer = build_chat_tokenizer("qwen3-think")
    build_tiny_model(tokenizer).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]},
            {"messages": [{"role": "user", "content": "hello"},
                          {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nyes"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "no"}]}]
    data = write_jsonl(tmp_path / "conv.jsonl", rows)
    assert main(["inspect", "--data", str(data), "--model", str(checkpoint), "--json"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [report["location"] for report in reports] == ["line 1", "line 2, turn 1 of 2", "line 2, turn 2 of 2"]
    assert [report["trained_text"] for report in reports[1:]] == [["<think>\nhmm\n</think>\n\nyes<|im_end|>"],
                                                                  ["no<|im_end|>"]]
    assert all(all(report["checks"].values()) for report in reports)


def test_trainer_trains_in_the_model_template_and_generate_prompts_with_it(gemma_checkpoint, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_instruct_tune.generation import _saved_template
    from hf_instruct_tune.trainer import InstructTrainer
    from trl import SFTConfig

    data = write_jsonl(tmp_path / "conv.jsonl", [{"messages": CONVERSATION[1:]}] * 2)
    tokenizer = AutoTokenizer.from_pretrained(gemma_checkpoint)
    trainer = InstructTrainer(
        AutoModelForCausalLM.from_pretrained(gemma_checkpoint),
        SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                  report_to=[], save_strategy="no", max_length=128, dataloader_num_workers=0, bf16=False),
        train_dataset=str(data), processing_class=tokenizer,
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    try:
        assert trainer.prompt_template.name == "model" and trainer.encoder.stop_text == "<end_of_turn>"
        row = trainer.train_dataset[0]
        assert row["input_ids"][: len(served_prompt_ids(tokenizer, CONVERSATION[1:2]))] == \
            served_prompt_ids(tokenizer, CONVERSATION[1:2])
        trainer.train()
        trainer.save_model(str(tmp_path / "adapter"))
    finally:
        trainer.train_data.cleanup()
    saved = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    assert saved.chat_template == tokenizer.chat_template
    template = _saved_template(tmp_path / "adapter", "model", saved)
    encoder = encoder_for(saved, template)
    assert encoder.stop_text == "<end_of_turn>"
    assert encoder.encode_prompt(CONVERSATION[1:4]) == served_prompt_ids(saved, CONVERSATION[1:4])
    metadata = json.loads((tmp_path / "adapter" / "hf_instruct_tune.json").read_text(encoding="utf-8"))
    assert metadata["template"]["name"] == "model" and metadata["template"]["stop_token"] == "<end_of_turn>"
    assert "<start_of_turn>user\nIs Paris the capital of France?<end_of_turn>" in metadata["example"]["rendered_prompt"]
    card = (tmp_path / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "trained on prompts rendered with **the base model's own chat template**" in card
    assert "<start_of_turn>user\nIs Paris the capital of France?<end_of_turn>\n<start_of_turn>model" in card
    assert "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives exactly this prompt" in card


def test_train_and_generate_commands_resolve_the_same_template(gemma_checkpoint, tmp_path):
    """`train` (which checks the data before loading the model), the trainer it builds and `generate` agree."""
    from hf_instruct_tune.cli import main

    data = write_jsonl(tmp_path / "conv.jsonl", [{"messages": CONVERSATION[1:]}] * 2)
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(gemma_checkpoint), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1"]) == 0
    metadata = json.loads((out / "hf_instruct_tune.json").read_text(encoding="utf-8"))
    assert metadata["formatter"] == "messages"
    assert metadata["template"]["name"] == "model" and metadata["template"]["stop_token"] == "<end_of_turn>"
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == SHAPES["gemma"].template
    predictions = tmp_path / "predictions.jsonl"
    assert main(["generate", "--adapter", str(out), "--data", str(data), "--output", str(predictions),
                 "--max-new-tokens", "2"]) == 0
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and all(row["finish_reason"] in {"eos", "length"} for row in rows)


def test_training_data_holds_one_row_per_turn_of_a_rewritten_conversation(tmp_path):
    from hf_instruct_tune.data import DataSource, tokenize_source
    from hf_instruct_tune.formatters import get_formatter

    tokenizer = tokenizer_for("qwen3-think")
    rewritten = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nyes"},
                 {"role": "user", "content": "again"}, {"role": "assistant", "content": "no"}]
    data = write_jsonl(tmp_path / "conv.jsonl", [{"messages": rewritten}, {"messages": CONVERSATION[1:]}])
    encoder = ChatTemplateEncoder(tokenizer, ChatTemplate.from_tokenizer(tokenizer))
    tokenized = tokenize_source(DataSource.open(data), get_formatter("messages"), encoder)
    try:
        assert tokenized.rows == 2 and len(tokenized.dataset) == 3
        assert [sum(label != IGNORE_INDEX for label in row["labels"]) > 0 for row in tokenized.dataset] == [True] * 3
        assert tokenized.dataset[2]["input_ids"] == encoder.encode_turns(CONVERSATION[1:])[0]
        assert encoder.split_conversations == 1
    finally:
        tokenized.cleanup()
