"""Packed training under a varlen attention: the trainer hands the kernel each example's bounds.

PyTorch's varlen flash kernel needs a GPU, so here a CPU reference with the same signature stands in for
the kernel; everything around it (registration, the trainer's wiring, the collator) is the package's own.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

ROWS = [{"instruction": "hello", "output": "yes"}, {"instruction": "classify the sentiment", "output": "positive"},
        {"instruction": "Paris is the capital of", "output": "France"}, {"instruction": "hello world", "output": "no"}]


def reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None, is_causal=None,
                          enable_gqa=False):
    """Causal attention within each ``[cu[i], cu[i+1])`` range, as ``torch.nn.attention.varlen.varlen_attn``."""
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for start, end in zip(bounds, bounds[1:]):
        q_, k_, v_ = (x[start:end].transpose(0, 1) for x in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale,
                                                        enable_gqa=enable_gqa).transpose(0, 1)
    return out


@pytest.fixture
def tok():
    from hf_instruct_tune.testing.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(pad_is_eos=True)


def test_the_trainer_hands_a_varlen_attention_each_examples_bounds(tok, tmp_path, monkeypatch):
    from datasets import Dataset
    from trl import SFTConfig

    from hf_instruct_tune import packing
    from hf_instruct_tune.testing.tiny import build_tiny_model
    from hf_instruct_tune.trainer import InstructTrainer

    monkeypatch.setattr(packing, "_varlen_call", lambda: (reference_varlen_attn, True, True))
    model = build_tiny_model(tok)
    torch.manual_seed(0)
    with torch.no_grad():  # weights large enough that attending across examples shows plainly
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    model.set_attn_implementation(packing.register_varlen_attention())
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, use_cpu=True, report_to=[],
                     save_strategy="no", max_length=128, dataloader_num_workers=0, packing=True)
    trainer = InstructTrainer(model, args, train_dataset=Dataset.from_list(ROWS), processing_class=tok,
                              prefix_sharing=False)  # packed rows, each attending to its own example
    features = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(features)
    with torch.no_grad():
        packed = trainer.model(**batch).logits[0]
        start = 0
        for feature in features:
            alone = trainer.model(input_ids=torch.tensor([feature["input_ids"]])).logits[0]
            assert_close(packed[start:start + len(alone)], alone, rtol=1e-4, atol=1e-4)
            start += len(alone)
    assert start == packed.shape[0]
