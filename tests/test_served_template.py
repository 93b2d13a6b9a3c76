"""The saved tokenizer serves the trained format: its ``apply_chat_template`` gives the training prompt ids."""

from __future__ import annotations

import copy
import json

import pytest
from helpers import tiny_tokenizer, write_jsonl

from hf_instruct_tune.chat_encoding import encoder_for
from hf_instruct_tune.errors import InputError
from hf_instruct_tune.served_template import served_chat_template
from hf_instruct_tune.templating import TEMPLATES, get_template
from hf_instruct_tune.testing.chat_templates import build_chat_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Classify the sentiment.", "input": "I love rainy days."}],
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris is the capital of"}],
    [{"role": "user", "content": "分类以下文本的情感。", "input": "我今天很开心，阳光明媚。"}],
]
MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "yes"}, {"role": "user", "content": "classify the sentiment"}]


def served_ids(tokenizer, messages, **options) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **options))


def merging_tokenizer():
    """A tokenizer whose vocabulary merges "\n\n" (as Qwen's and Llama 3's do), with a ChatML chat_template."""
    return build_chat_tokenizer("chatml-default-system")


@pytest.mark.parametrize("make_tokenizer", [tiny_tokenizer, merging_tokenizer])
@pytest.mark.parametrize("name", TEMPLATES.names())
def test_the_served_chat_template_gives_the_training_prompt_ids(name, make_tokenizer):
    template = get_template(name)
    tokenizer = copy.deepcopy(make_tokenizer())
    try:
        encoder = encoder_for(tokenizer, template)
    except InputError:
        pytest.skip(f"{name}'s stop token is not a token of this tokenizer")
    tokenizer.chat_template = served_chat_template(template, encoder.stop_text, adds_bos=encoder.adds_bos)
    conversations = CONVERSATIONS + ([MULTI_TURN] if template.multi_turn else [])
    if name == "alpaca-no-input":
        conversations = [c for c in conversations if not any("input" in m for m in c)]
    for messages in conversations:
        assert served_ids(tokenizer, messages, add_generation_prompt=True) == encoder.encode_prompt(messages), messages
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = tokenizer.bos_token or ""
        assert text.removeprefix(bos) == encoder.render_prompt(messages).removeprefix(bos)
        answered = messages + [{"role": "assistant", "content": "positive"}]
        example = encoder.encode({"messages": answered})
        assert served_ids(tokenizer, answered) == example.input_ids


def test_an_adapter_trained_in_alpaca_zh_ships_a_tokenizer_that_prompts_in_alpaca_zh(tmp_path):
    """The base tokenizer speaks ChatML; the adapter learned Alpaca-zh: the saved chat_template must be Alpaca-zh."""
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from hf_instruct_tune.testing.tiny import build_tiny_model
    from hf_instruct_tune.trainer import InstructTrainer

    tokenizer = build_chat_tokenizer("chatml-default-system")
    rows = [{"instruction": "分类以下文本的情感。", "input": "我今天很开心。", "output": "积极"},
            {"instruction": "分类以下文本的情感。", "input": "我不喜欢下雨。", "output": "消极"}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    trainer = InstructTrainer(
        build_tiny_model(tokenizer),
        SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                  report_to=[], save_strategy="no", max_length=256, dataloader_num_workers=0, bf16=False),
        train_dataset=str(data), processing_class=tokenizer, template="alpaca-zh",
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    try:
        trainer.train()
        trainer.save_model(str(tmp_path / "adapter"))
    finally:
        trainer.train_data.cleanup()
    saved = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    messages = [{"role": "user", "content": rows[0]["instruction"], "input": rows[0]["input"]}]
    prompt = saved.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "### 指令:\n分类以下文本的情感。\n\n### 输入:\n我今天很开心。\n\n### 响应:\n" in prompt
    assert "<|im_start|>" not in prompt
    assert served_ids(saved, messages, add_generation_prompt=True) == trainer.encoder.encode_prompt(messages)
    assert trainer.train_dataset[0]["input_ids"][: len(trainer.encoder.encode_prompt(messages))] == \
        served_ids(saved, messages, add_generation_prompt=True)
    metadata = json.loads((tmp_path / "adapter" / "hf_instruct_tune.json").read_text(encoding="utf-8"))
    assert metadata["template"]["name"] == "alpaca-zh"
    card = (tmp_path / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "rendered with the **`alpaca-zh`** template" in card
    assert "carries this format as its `chat_template`" in card and "in its `input` key" in card
