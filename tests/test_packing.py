"""Packed batches train exactly what padded batches train, and nothing across examples."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_instruct_tune.packing import IGNORE_INDEX, best_fit_decreasing, pack_features

EOS, PAD = 2, 0


def _examples(seed: int = 0, n: int = 4) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, 300, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        answer = torch.randint(3, 300, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        ids = prompt + answer + [EOS]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt) + answer + [EOS]})
    return out


def _padded(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), PAD)
    labels = torch.full((len(features), width), IGNORE_INDEX)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).float().train()


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pack_features_layout():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = pack_features(feats, PAD, flash_attn_kwargs=True)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[5, 6, 7, 8, 9]]))
    torch.testing.assert_close(batch["labels"], torch.tensor([[-100, 6, 7, -100, 9]]))
    torch.testing.assert_close(batch["position_ids"], torch.tensor([[0, 1, 2, 0, 1]]))
    torch.testing.assert_close(batch["cu_seq_lens_q"], torch.tensor([0, 3, 5], dtype=torch.int32))
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert "attention_mask" not in batch and batch["use_cache"] is False


def test_eos_labels_survive_packing():
    feats = _examples(n=5)
    batch = pack_features(feats)
    labels = batch["labels"][0].tolist()
    ends = torch.tensor([len(f["input_ids"]) for f in feats]).cumsum(0) - 1
    assert [labels[e] for e in ends.tolist()] == [EOS] * len(feats)
    assert labels.count(EOS) == len(feats)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_grads_equal_padded(attn):
    feats = _examples()
    model = _model(attn)
    loss_pad, grads_pad = _loss_and_grads(model, _padded(feats))
    loss_pack, grads_pack = _loss_and_grads(model, pack_features(feats, PAD))
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-5, atol=1e-6)
    assert grads_pack.keys() == grads_pad.keys()
    for name in grads_pad:
        torch.testing.assert_close(grads_pack[name], grads_pad[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_without_isolation_differs(attn):
    """An explicit all-ones mask disables packed-sequence detection: examples see each other."""
    feats = _examples()
    model = _model(attn)
    loss_pad, _ = _loss_and_grads(model, _padded(feats))
    leaky = pack_features(feats, PAD)
    leaky["attention_mask"] = torch.ones_like(leaky["input_ids"])
    loss_leaky, _ = _loss_and_grads(model, leaky)
    assert not torch.allclose(loss_leaky, loss_pad, rtol=1e-4, atol=1e-5)


def test_first_label_masking_is_needed():
    """Without -100 on each example's first token, the loss trains predictions across examples."""
    feats = [{"input_ids": f["input_ids"], "labels": f["input_ids"]} for f in _examples()]
    model = _model("sdpa")
    loss_pad, _ = _loss_and_grads(model, _padded(feats))
    batch = pack_features(feats)
    torch.testing.assert_close(_loss_and_grads(model, batch)[0], loss_pad, rtol=1e-5, atol=1e-6)
    batch["labels"] = batch["input_ids"].clone()
    assert not torch.allclose(_loss_and_grads(model, batch)[0], loss_pad, rtol=1e-4, atol=1e-5)


def test_pack_features_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one example"):
        pack_features([])
    with pytest.raises(ValueError, match="Example 0: `labels` should have the length"):
        pack_features([{"input_ids": [1, 2], "labels": [1]}])


def test_best_fit_decreasing():
    lengths = [700, 300, 900, 100, 600, 400, 3000]
    bins = best_fit_decreasing(lengths, 1000)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1000 for b in bins if len(b) > 1)
    assert [6] in bins and len(bins) == 4
    with pytest.raises(ValueError, match="positive number of tokens"):
        best_fit_decreasing([1], 0)


def test_kv_cache_disables_isolation():
    """transformers skips packed-sequence detection when a cache exists: the batch must carry use_cache=False."""
    feats = _examples()
    model = _model("sdpa")
    loss_pad, _ = _loss_and_grads(model, _padded(feats))
    batch = pack_features(feats)
    batch["use_cache"] = True
    assert not torch.allclose(_loss_and_grads(model, batch)[0], loss_pad, rtol=1e-4, atol=1e-5)
