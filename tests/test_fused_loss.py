"""Fused loss: the same loss and LoRA gradients as the model's own, padded and packed; InstructTrainer(fused_loss)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hf_instruct_tune.collator import EOSSafeCollator, pad_examples
from hf_instruct_tune.loss import fused_cross_entropy
from hf_instruct_tune.packing import pack_features

ROWS = [{"instruction": "hello", "output": "yes"}, {"instruction": "classify the sentiment", "output": "positive"},
        {"instruction": "Paris is the capital of", "output": "France"}, {"instruction": "hello world", "output": "no"}]


@pytest.fixture(scope="module")
def tok():
    from hf_instruct_tune.testing.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(pad_is_eos=True)


def _lora_model(tok):
    from peft import LoraConfig, get_peft_model

    from hf_instruct_tune.testing.tiny import build_tiny_model

    model = build_tiny_model(tok)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))


def _features():
    g = torch.Generator().manual_seed(0)
    out = []
    for length in (9, 23, 5, 17):
        ids = torch.randint(10, 500, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("num_items", [None, 40])
def test_same_loss_and_lora_gradients(tok, layout, num_items):
    model = _lora_model(tok)
    batch = (pad_examples(_features(), pad_token_id=tok.pad_token_id) if layout == "padded"
             else pack_features(_features(), tok.pad_token_id))
    reference = model(**batch, **({"num_items_in_batch": num_items} if num_items else {})).loss
    reference.backward()
    expected = _lora_grads(model)
    model.zero_grad()

    base = model.get_base_model()
    head = base.lm_head
    base.lm_head = torch.nn.Identity()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model(**inputs).logits
    loss = fused_cross_entropy(hidden, head.weight, batch["labels"], num_items_in_batch=num_items, chunk_size=7,
                               implementation="chunked")
    loss.backward()
    base.lm_head = head
    assert_close(loss, reference.float(), rtol=1e-5, atol=1e-6)
    got = _lora_grads(model)
    assert got.keys() == expected.keys() and expected
    for name in expected:
        assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_num_processes_scales_and_nothing_supervised_is_zero():
    hidden = torch.randn(1, 6, 4, requires_grad=True)
    weight = torch.randn(10, 4)
    labels = torch.tensor([[-100, 1, 2, 3, -100, 4]])
    one = fused_cross_entropy(hidden, weight, labels, num_items_in_batch=8)
    assert_close(fused_cross_entropy(hidden, weight, labels, num_items_in_batch=8, num_processes=2), 2 * one)
    none = fused_cross_entropy(hidden, weight, torch.full_like(labels, -100))
    none.backward()
    assert none.item() == 0.0 and hidden.grad is not None


def test_collator_adds_flash_kwargs_when_asked(tok):
    batch = EOSSafeCollator(pad_token_id=tok.pad_token_id, padding_free=True, flash_attn_kwargs=True)(_features())
    assert batch["cu_seq_lens_q"].tolist() == [0, 9, 32, 37, 54] and batch["max_length_q"] == 23
    assert "cu_seq_lens_q" not in EOSSafeCollator(pad_token_id=tok.pad_token_id, padding_free=True)(_features())


def _run(tok, tmp_path, *, fused, packing, train_dataset=None, loss_kernel=None):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    from hf_instruct_tune.testing.tiny import build_tiny_model
    from hf_instruct_tune.trainer import InstructTrainer

    args = SFTConfig(output_dir=str(tmp_path / f"out-{fused}-{loss_kernel}"), max_steps=2, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                     learning_rate=1e-2, max_length=128, seed=0, dataloader_num_workers=0, packing=packing)
    trainer = InstructTrainer(build_tiny_model(tok), args, train_dataset=train_dataset or Dataset.from_list(ROWS * 2),
                              processing_class=tok, fused_loss=fused, loss_kernel=loss_kernel, prefix_sharing=False,
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


@pytest.mark.parametrize("packing", [False, True])
def test_trainer_fused_loss_logs_the_same_losses(tok, tmp_path, monkeypatch, packing):
    import hf_instruct_tune.loss

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    predictions_cross_entropy = hf_instruct_tune.loss.predictions_cross_entropy

    def counted(*args, **kwargs):  # packed batches reach it with their supervised positions gathered
        calls.append((args[0].shape, kwargs["implementation"]))
        return predictions_cross_entropy(*args, **kwargs)

    monkeypatch.setattr(hf_instruct_tune.loss, "predictions_cross_entropy", counted)
    _, plain = _run(tok, tmp_path, fused=False, packing=packing)
    assert not calls
    trainer, fused = _run(tok, tmp_path, fused=True, packing=packing)
    assert len(calls) == 4  # 2 steps of 2 micro-batches, each through the fused loss on hidden states
    assert all(shape[-1] == 32 and kernel == "auto" for shape, kernel in calls)  # the hidden size, not the vocabulary
    assert len(fused) == len(plain) == 2
    assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    calls.clear()
    _, chunked = _run(tok, tmp_path, fused=None, packing=packing, loss_kernel="chunked")
    assert [kernel for _, kernel in calls] == ["chunked"] * 4
    assert_close(torch.tensor(chunked), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    calls.clear()
    assert _run(tok, tmp_path, fused=None, packing=packing, loss_kernel="plain")[1] == plain and not calls
    head = trainer.model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and trainer._lm_head is None  # restored after train()
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()


def test_pretokenized_dataset_is_used_as_is(tok, tmp_path, monkeypatch):
    from datasets import Dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = Dataset.from_list(_features() * 2)
    trainer, losses = _run(tok, tmp_path, fused=True, packing=True, train_dataset=data)
    assert trainer.formatter_name == "pretokenized" and len(losses) == 2
    assert trainer.train_dataset["input_ids"][0] == _features()[0]["input_ids"]


def test_train_config_flags():
    from hf_instruct_tune.config import TrainConfig
    from hf_instruct_tune.errors import InputError
    from hf_instruct_tune.training import _attn_implementation

    assert TrainConfig(fused_loss="true").fused_loss is True
    assert TrainConfig(loss_kernel="chunked").loss_kernel == "chunked"
    with pytest.raises(InputError, match="loss_kernel"):
        TrainConfig(loss_kernel="fast")
    assert TrainConfig(offload_embeddings=True).offload_embeddings is True  # any base, not only 4-bit
    with pytest.raises(InputError, match="max_memory"):
        TrainConfig(max_memory=0)
    with pytest.raises(InputError, match="attn_implementation"):
        TrainConfig(attn_implementation="flash")
    assert _attn_implementation(TrainConfig(attn_implementation="eager")) == "eager"
    if not torch.cuda.is_available():
        assert _attn_implementation(TrainConfig(packing=True)) is None  # the model's default on a CPU


def test_loss_kernel_decides_the_fused_loss_and_contradictions_are_refused():
    from hf_instruct_tune.config import TrainConfig
    from hf_instruct_tune.errors import InputError
    from hf_instruct_tune.loss import cce_available
    from hf_instruct_tune.trainer import _loss_kernel
    from hf_instruct_tune.training import _fused_loss

    assert _fused_loss(TrainConfig(loss_kernel="chunked", memory_plan=False), "transformers") is True
    assert _fused_loss(TrainConfig(loss_kernel="plain", memory_plan=False), "transformers") is False
    assert _loss_kernel("auto", None) is None and _loss_kernel("chunked", True) == "chunked"
    for kernel, fused in (("plain", True), ("chunked", False)):
        with pytest.raises(InputError, match="loss_kernel"):
            _loss_kernel(kernel, fused)
    if not cce_available():
        with pytest.raises(InputError, match="cut_cross_entropy"):
            _loss_kernel("cce", None)


# -- Cut Cross-Entropy's rows padded to one pattern of Triton's specializations ----------------------------------

@pytest.mark.parametrize("hidden", [576, 960, 2048, 4096, 5120])
def test_every_micro_batch_gives_cut_cross_entropy_the_same_pattern_of_multiples_of_16(hidden):
    from hf_instruct_tune.loss import padded_row_count

    block = -(-hidden // 64)
    patterns, most_added = set(), 0
    for rows in range(1, 20_000, 3):
        padded = padded_row_count(rows, hidden)
        patterns.add((padded % 16 == 0, -(-padded // 128) % 16 == 0, -(-padded // block) % 16 == 0))
        most_added = max(most_added, padded - rows)
    assert patterns == {(True, False, False)}
    assert most_added < 200


def test_zero_rows_add_their_known_loss_and_nothing_to_the_gradients():
    """What the Cut Cross-Entropy path relies on, computed with plain logits: the padded rows' loss is
    log(vocabulary) each, and the gradients of the hidden states and of the head are those without them."""
    import math

    from hf_instruct_tune.loss import _logits_sum, padded_to_row_blocks

    generator = torch.Generator().manual_seed(0)
    h = torch.randn(37, 64, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 64, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=generator)
    reference = _logits_sum(h, weight, None, y, None)
    grads = torch.autograd.grad(reference, (h, weight))
    padded_h, padded_y, padding = padded_to_row_blocks(h, y)
    assert padding > 0 and padded_h.shape == (37 + padding, 64) and padded_y.shape == (37 + padding,)
    loss = _logits_sum(padded_h, weight, None, padded_y, None) - padding * math.log(50)
    torch.testing.assert_close(loss, reference)
    for got, want in zip(torch.autograd.grad(loss, (h, weight)), grads):
        torch.testing.assert_close(got, want)


def test_the_trainer_reads_nothing_back_from_the_device_to_count_tokens(tok, tmp_path, monkeypatch):
    """In one process, the trainer's own code in the fused loss's step (counting the packed micro-batch's tokens
    for TRL's `num_tokens` metric) reads no value back from the device: on a GPU each such read (`.item()`, the op
    `_local_scalar_dense`) makes the CPU wait for the queued kernels before it can queue the backward. (The loss
    itself reads the supervised rows' count, which sizes its tensors.)"""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    import hf_instruct_tune.trainer as trainer_module

    readers = []

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_local_scalar_dense":
                # the innermost caller outside torch: the code that asked for the value
                frame = [frame for frame in traceback.extract_stack()[:-1] if "/torch/" not in frame.filename][-1]
                readers.append(f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}")
            return func(*args, **(kwargs or {}))

    compute_loss = trainer_module.InstructTrainer.compute_loss

    def counted(self, model, inputs, *args, **kwargs):
        with CountReads():
            return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_module.InstructTrainer, "compute_loss", counted)
    trainer, _ = _run(tok, tmp_path, fused=True, packing=True, loss_kernel="chunked")
    assert trainer.state.global_step == 2 and trainer._total_train_tokens > 0
    assert readers and not [reader for reader in readers if reader.startswith("hf_instruct_tune/trainer.py")], readers
