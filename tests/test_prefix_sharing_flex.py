"""Shared-prefix batches under block-sparse attention (``torch_varlen`` with a FlexAttention ``BlockMask``) train
exactly what the rows train separately, and no row sees another's tokens.

On CPU the ``BlockMask`` branch of ``torch_varlen`` runs eagerly: with gradients as ``sdpa`` over the dense mask of
the mask's own ``mask_mod`` (FlexAttention has no CPU backward), without them as ``flex_attention`` itself.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask
from torch.testing import assert_close

from hf_instruct_tune import packing, prefix_sharing
from hf_instruct_tune.collator import EOSSafeCollator, pad_examples
from hf_instruct_tune.memory_plan import apply_checkpointing
from hf_instruct_tune.packing import register_varlen_attention
from hf_instruct_tune.prefix_sharing import (build_prefix_tree, share_prefixes, shared_prefix_loss, sharing_pays,
                                             tree_block_mask)

from test_prefix_sharing import PAD, _lora_grads, _model, _rows


def _varlen_model():
    return _model(register_varlen_attention())


def _loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), _lora_grads(model)


def _separately(rows):
    model = _model("sdpa")
    return _loss_and_grads(model, lambda: model(**pad_examples(rows, pad_token_id=PAD)).loss)


@pytest.fixture
def block_mask_calls(monkeypatch):
    """The masks ``torch_varlen`` attended with, one per decoder layer and forward."""
    calls = []
    attend = packing._block_mask_attention

    def recorded(query, key, value, block_mask, scaling):
        calls.append(block_mask)
        return attend(query, key, value, block_mask, scaling)

    monkeypatch.setattr(packing, "_block_mask_attention", recorded)
    return calls


def _random_rows(rng: random.Random) -> list[list[int]]:
    base = [rng.randrange(5) for _ in range(rng.randrange(1, 30))]
    return [base[:rng.randrange(len(base) + 1)] + [rng.randrange(5) for _ in range(rng.randrange(1, 25))]
            for _ in range(rng.randrange(1, 8))]


@pytest.mark.parametrize("seed", range(8))
def test_block_mask_is_the_one_torch_builds_from_the_dense_mask(seed):
    """The blocks computed from the tree's spans are those ``create_block_mask`` finds by evaluating every pair."""
    rng = random.Random(seed)
    tree = build_prefix_tree(_random_rows(rng))
    nodes, ancestors = torch.tensor(tree.node_of_token), tree.ancestors()
    length, dense = len(tree.tokens), tree.attention_mask()
    for block_size in (1, 4, 16):
        ours = tree_block_mask(nodes, ancestors, block_size=block_size)
        theirs = create_block_mask(lambda b, h, q, kv: dense[q, kv], None, None, length, length, device="cpu",
                                   BLOCK_SIZE=block_size)
        assert torch.equal(create_mask(ours.mask_mod, 1, 1, length, length, "cpu")[0, 0], dense)
        for counts, indices in [("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                                ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")]:
            assert torch.equal(getattr(ours, counts), getattr(theirs, counts)), (block_size, counts)
            for row, count in enumerate(getattr(ours, counts)[0, 0].tolist()):
                assert torch.equal(getattr(ours, indices)[0, 0, row, :count],
                                   getattr(theirs, indices)[0, 0, row, :count]), (block_size, indices, row)


def test_compact_batch_carries_the_tree_instead_of_a_dense_mask():
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}, {"input_ids": [1, 2, 5], "labels": [1, 2, 5]}]
    batch = share_prefixes(rows, compact=True)
    assert "attention_mask" not in batch
    assert batch["tree_nodes"].tolist() == [[0, 0, 1, 1, 2]]
    assert batch["tree_ancestors"].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    plain = share_prefixes(rows)
    assert all(torch.equal(batch[key], plain[key]) for key in ("input_ids", "position_ids", "loss_positions", "labels"))
    tree = build_prefix_tree([row["input_ids"] for row in rows])
    assert tree.attended_pairs() == int(tree.attention_mask().sum()) == 4 * 5 // 2 + 3 * 4 // 2 - 3


@pytest.mark.parametrize("train_on_prompt,fused,checkpointing",
                         [(False, False, False), (True, False, True), (False, True, True)])
def test_shared_batch_under_block_mask_equals_separate_rows(block_mask_calls, train_on_prompt, fused, checkpointing):
    rows = _rows(3, train_on_prompt=train_on_prompt)
    loss, grads = _separately(rows)
    model = _varlen_model()
    if checkpointing:  # as the memory plan sets it: non-reentrant, on every layer
        apply_checkpointing(model, layers=2)
    base = model.get_base_model()
    head = base.lm_head
    if fused:
        base.lm_head = torch.nn.Identity()
    try:
        batch = share_prefixes(rows, compact=True)
        shared_loss, shared_grads = _loss_and_grads(
            model, lambda: shared_prefix_loss(model, dict(batch), head=head if fused else None)[0])
    finally:
        base.lm_head = head
    assert_close(shared_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    layers = model.config.num_hidden_layers
    assert len(block_mask_calls) == layers * (2 if checkpointing else 1)  # recomputed in backward
    assert all(mask is block_mask_calls[0] for mask in block_mask_calls)  # passed through transformers as built


def test_the_dense_sdpa_path_gives_the_same_loss_and_grads():
    rows = _rows(4)
    dense_model = _model("sdpa")
    dense = _loss_and_grads(dense_model, lambda: shared_prefix_loss(dense_model, share_prefixes(rows))[0])
    model = _varlen_model()
    sparse = _loss_and_grads(model, lambda: shared_prefix_loss(model, share_prefixes(rows, compact=True))[0])
    assert_close(sparse[0], dense[0], rtol=1e-5, atol=1e-6)
    for name, grad in dense[1].items():
        assert_close(sparse[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_block_mask_letting_rests_see_each_other_fails_the_comparison(monkeypatch):
    rows = _rows()
    loss, grads = _separately(rows)

    def leaky(nodes, ancestors, **kwargs):
        length = nodes.numel()
        return create_block_mask(lambda b, h, q, kv: kv <= q, None, None, length, length, device=nodes.device)

    monkeypatch.setattr(prefix_sharing, "tree_block_mask", leaky)
    model = _varlen_model()
    leaky_loss, leaky_grads = _loss_and_grads(model, lambda: shared_prefix_loss(model, share_prefixes(rows,
                                                                                                     compact=True))[0])
    assert not torch.allclose(leaky_loss, loss, rtol=1e-3)
    assert any(not torch.allclose(leaky_grads[name], grad, rtol=1e-3, atol=1e-6) for name, grad in grads.items())


def test_flex_attention_itself_gives_the_loss_of_separate_rows(block_mask_calls):
    """Without gradients the CPU runs ``flex_attention`` (eager): scale, grouped heads and layout as the kernel's."""
    rows = _rows(5)
    model = _varlen_model().eval()
    with torch.no_grad():
        loss = _model("sdpa").eval()(**pad_examples(rows, pad_token_id=PAD)).loss
        shared_loss, _ = shared_prefix_loss(model, share_prefixes(rows, compact=True))
    assert block_mask_calls
    assert_close(shared_loss, loss, rtol=1e-5, atol=1e-6)


def test_kernels_that_cannot_run_compiled_are_found_once_with_a_warning(monkeypatch):
    """The probe of the compiled kernels (forward and backward); the CPU has no FlexAttention backward, so it fails
    here as it would on a GPU whose kernels do not fit, and the dense path takes over."""
    monkeypatch.setattr(packing, "_COMPILED_FLEX_WORKS", {})
    query, key = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 3, 16)
    with pytest.warns(UserWarning, match="could not run compiled.*sdpa over a dense mask"):
        assert packing._compiled_flex_works(query, key) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert packing._compiled_flex_works(query, key) is False  # probed once
    assert list(packing._COMPILED_FLEX_WORKS) == [("cpu", torch.float32, 4, 2, 16)]


def test_varlen_attention_refuses_a_dense_mask():
    query = torch.zeros(1, 4, 3, 16)
    with pytest.raises(ValueError, match="BlockMask"):
        packing._varlen_attention_forward(None, query, query[:, :2], query[:, :2], torch.ones(1, 1, 3, 3, dtype=torch.bool))


def test_collator_carries_the_tree_compactly_and_weighs_pairs_for_block_sparse_attention():
    collator = EOSSafeCollator(pad_token_id=PAD, prefix_sharing=True, padding_free=True, block_sparse_attention=True)
    batch = collator(_rows())
    assert "tree_nodes" in batch and "attention_mask" not in batch
    assert "attention_mask" in EOSSafeCollator(pad_token_id=PAD, prefix_sharing=True)(_rows())
    # long rows sharing a fifth: a dense mask costs more than it saves, a block-sparse one does not
    lengths, tree_tokens = [4000] * 8, 1000 + 8 * 3000
    pairs = sum(range(1, 1001)) + 8 * sum(range(1001, 4001))
    assert not sharing_pays(lengths, tree_tokens, attention_tokens=4096, packed=True)
    assert sharing_pays(lengths, tree_tokens, attention_tokens=4096, packed=True, tree_pairs=pairs)
    assert not sharing_pays([100] * 8, 790, attention_tokens=4096, packed=True, tree_pairs=8 * 5050)


def test_trainer_shares_by_default_under_torch_varlen(tmp_path, monkeypatch):
    from datasets import Dataset
    from trl import SFTConfig

    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer
    from hf_instruct_tune.trainer import InstructTrainer

    from test_prefix_sharing import ROWS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_tiny_tokenizer(pad_is_eos=True)
    model = build_tiny_model(tok)
    model.config._attn_implementation = register_varlen_attention()
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=128)
    trainer = InstructTrainer(model, args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    assert trainer.prefix_sharing is True
    assert trainer.data_collator.block_sparse_attention is True
    trainer.train_data.cleanup()
