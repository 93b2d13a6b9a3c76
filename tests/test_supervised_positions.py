"""A packed micro-batch's loss at the supervised positions the collator lists: the same loss and gradients as the
whole row's, and no value read back from the device during the step."""

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from hf_instruct_tune import EOSSafeCollator
from hf_instruct_tune.loss import IGNORE_INDEX
from hf_instruct_tune.micro_batch_split import split_micro_batch
from hf_instruct_tune.supervised_positions import KEY, positions_loss, supervised_positions
from hf_instruct_tune.testing.tiny import build_tiny_model

from helpers import logged_losses, sentiment_rows, tiny_lora_trainer, tiny_tokenizer

# operators whose result size or value the CPU must read from the device (on a GPU: a wait for the queue)
READ_BACK = {"nonzero", "is_nonzero", "_local_scalar_dense", "item", "masked_select", "unique", "_unique2"}


class ReadBacks(TorchDispatchMode):
    """Records the operators run inside it (forward and backward) that read a device value back."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in READ_BACK:
            self.seen.append(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and _has_boolean_index(args):
            self.seen.append(f"{name} by a boolean mask")  # its size is the mask's count of True
        return func(*args, **(kwargs or {}))


def _has_boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices)


def _unmasked_attention(model):
    """``model`` attending causally without a mask of transformers' making, as the varlen attention it trains
    with on a GPU does (on CPU, sdpa's packed mask is found from the position ids on the device)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def causal(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("causal_unmasked", causal)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config._attn_implementation = "causal_unmasked"
    return model


FEATURES = [
    {"input_ids": [1, 5, 6, 7, 8, 2], "labels": [-100, -100, -100, 7, 8, 2]},
    {"input_ids": [1, 9, 10, 2], "labels": [-100, -100, 10, 2]},
    {"input_ids": [1, 11, 12, 13, 14, 15, 2], "labels": [-100, -100, -100, -100, 14, 15, 2]},
]


def _packed(**kwargs):
    return EOSSafeCollator(pad_token_id=0, padding_free=True, **kwargs)(FEATURES)


def test_the_collator_lists_the_positions_whose_next_token_is_supervised():
    batch = _packed(supervised_positions=True)
    labels = batch["labels"][0].tolist()
    expected = [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]
    assert batch[KEY].tolist() == [expected]
    assert len(expected) == 3 + 2 + 3
    assert KEY not in _packed()  # only when asked: a plain trainer passes every key to the model


def _tiny_model():
    torch.manual_seed(0)
    return build_tiny_model(tiny_tokenizer(), num_layers=2).float()


@pytest.mark.parametrize("fused_head", [False, True])
def test_the_loss_and_gradients_are_the_whole_rows(fused_head):
    model = _tiny_model()
    batch = _packed(supervised_positions=True)
    reference = model(**{k: v for k, v in batch.items() if k != KEY})
    expected_loss = reference.loss
    expected_loss.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    head = None
    if fused_head:  # the trainer's fused loss: the model returns its final hidden states
        head = model.lm_head
        model.lm_head = torch.nn.Identity()
    loss, _ = positions_loss(model, dict(batch), head=head, implementation="chunked")
    loss.backward()
    if fused_head:
        model.lm_head = head
    assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip((p.grad for p in model.parameters()), expected_grads):
        assert_close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused_head", [False, True])
def test_the_step_reads_nothing_back(fused_head):
    model = _unmasked_attention(_tiny_model())
    batch = _packed(supervised_positions=True)
    head = None
    if fused_head:
        head = model.lm_head
        model.lm_head = torch.nn.Identity()
    steps = torch.tensor(sum(label != IGNORE_INDEX for label in batch["labels"][0, 1:].tolist()))
    with ReadBacks() as mode:
        loss, _ = positions_loss(model, dict(batch), head=head, implementation="chunked", num_items_in_batch=steps,
                                 metrics={"entropy": [], "mean_token_accuracy": []})
        loss.backward()
    assert mode.seen == []

    with ReadBacks() as mode:  # the mask found on the device, as a loss without the listed positions does
        hidden = torch.randn(batch["labels"].shape[1] - 1, 4, requires_grad=True)
        hidden[batch["labels"][0, 1:] != IGNORE_INDEX].sum().backward()
    assert "index by a boolean mask" in mode.seen


def _trainer(tmp_path, name, **kwargs):
    return tiny_lora_trainer(tmp_path / name, sentiment_rows(16), num_layers=2, max_steps=3,
                             config={"padding_free": True}, **kwargs)


def test_the_trainer_trains_packed_rows_at_their_positions_as_trl_does(tmp_path):
    listed = _trainer(tmp_path, "listed")
    assert listed.data_collator.supervised_positions
    listed.train()
    trl = _trainer(tmp_path, "trl")
    trl.data_collator.supervised_positions = False  # TRL's loss over the whole row
    trl.train()
    assert_close(torch.tensor(logged_losses(listed)), torch.tensor(logged_losses(trl)), rtol=1e-5, atol=1e-6)
    for key in ("entropy", "mean_token_accuracy"):
        ours = [entry[key] for entry in listed.state.log_history if key in entry]
        theirs = [entry[key] for entry in trl.state.log_history if key in entry]
        assert len(ours) == 3 and all(isinstance(value, float) for value in ours)
        assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-5)


def test_a_training_step_reads_nothing_back(tmp_path):
    trainer = _trainer(tmp_path, "step")
    _unmasked_attention(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    assert KEY in batch
    steps = torch.tensor(int((batch["labels"][..., 1:] != IGNORE_INDEX).sum()))
    trainer.model.train()
    with ReadBacks() as mode:
        trainer.training_step(trainer.model, dict(batch), steps)
    assert mode.seen == []


def test_the_parts_of_a_cut_micro_batch_list_their_own_positions():
    batch = _packed(supervised_positions=True)
    parts = split_micro_batch(batch, most_tokens=10)
    assert len(parts) == 2
    for part in parts:
        assert part[KEY].tolist() == supervised_positions(part["labels"]).tolist()
    whole = batch["labels"][0, 1:][batch[KEY][0]].tolist()
    assert [t for part in parts for t in part["labels"][0, 1:][part[KEY][0]].tolist()] == whole


def test_the_plain_loss_in_chunks_is_the_whole_rows_and_keeps_no_fp32_logits(monkeypatch):
    from hf_instruct_tune.supervised_positions import ChunkedCrossEntropy

    monkeypatch.setattr(ChunkedCrossEntropy, "CHUNK", 3)  # the batch's 8 positions in three chunks
    model = _tiny_model()
    batch = _packed(supervised_positions=True)
    expected_loss = model(**{k: v for k, v in batch.items() if k != KEY}).loss
    expected_loss.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, _ = positions_loss(model, dict(batch))
    loss.backward()
    assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip((p.grad for p in model.parameters()), expected_grads):
        assert_close(grad, expected, rtol=1e-4, atol=1e-6)

    model = model.to(torch.bfloat16)
    vocab = model.config.vocab_size
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.shape)) or t, lambda t: t):
        positions_loss(model, dict(batch))
    assert saved and not [shape for dtype, shape in saved if dtype == torch.float32 and shape[-1:] == (vocab,)]
