"""Backend selection and its errors on CPU; label equality with Unsloth on a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hf_instruct_tune import backends
from hf_instruct_tune.errors import InputError


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(backends, "_cuda", lambda: False)


def _installed_except(monkeypatch, *missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(backends, "_installed", lambda m: m not in missing and real(m) is not None)


def test_auto_without_gpu_is_transformers(no_gpu):
    assert backends.resolve_backend("auto") == "transformers"


def test_auto_without_unsloth_is_transformers(monkeypatch):
    monkeypatch.setattr(backends, "_cuda", lambda: True)
    _installed_except(monkeypatch, "unsloth")
    assert backends.resolve_backend("auto") == "transformers"


def test_auto_with_unsloth_and_gpu_is_still_transformers(monkeypatch):
    """Measured: the package's planned, packed path beats Unsloth at every budget; Unsloth only when named."""
    monkeypatch.setattr(backends, "_cuda", lambda: True)
    monkeypatch.setattr(backends, "_installed", lambda m: True)
    assert backends.resolve_backend("auto") == "transformers"
    assert backends.resolve_backend("unsloth") == "unsloth"


def test_fused_loss_with_auto_backend_is_not_refused(monkeypatch):
    """`--fused-loss` used to stop a run where auto picked Unsloth; only naming both sides is an error."""
    from hf_instruct_tune.config import TrainConfig
    from hf_instruct_tune.errors import InputError
    from hf_instruct_tune.training import _load_model

    monkeypatch.setattr(backends, "_cuda", lambda: True)
    monkeypatch.setattr(backends, "_installed", lambda m: True)
    assert backends.resolve_backend(TrainConfig(fused_loss=True).backend) == "transformers"
    with pytest.raises(InputError, match="Unsloth computes its own fused loss"):
        _load_model(TrainConfig(fused_loss=True, backend="unsloth"), spec=None, backend="unsloth")


@pytest.mark.parametrize("field", ["compile_layers", "liger_kernels", "fused_lora", "dequantize_base"])
def test_layer_kernels_asked_with_unsloth_are_refused(field):
    """Unsloth patches the layers with its own kernels: compiled layers, Liger's or fused LoRA asked with it are an
    error."""
    from hf_instruct_tune.config import TrainConfig
    from hf_instruct_tune.errors import InputError
    from hf_instruct_tune.training import _load_model

    flag = "--" + field.replace("_", "-")
    with pytest.raises(InputError, match=f"{flag} works with --backend transformers only") as info:
        _load_model(TrainConfig(backend="unsloth", **{field: True}), spec=None, backend="unsloth")
    assert info.value.field == field


def test_transformers_is_transformers(no_gpu):
    assert backends.resolve_backend("transformers") == "transformers"


def test_unsloth_missing_names_the_extra(monkeypatch):
    _installed_except(monkeypatch, "unsloth")
    with pytest.raises(InputError, match=r"pip install hf_instruct_tune\[unsloth\]"):
        backends.resolve_backend("unsloth")


def test_unsloth_without_gpu(monkeypatch, no_gpu):
    monkeypatch.setattr(backends, "_installed", lambda m: True)
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        backends.resolve_backend("unsloth")


def test_unknown_backend_lists_choices():
    with pytest.raises(InputError, match="Unknown backend 'unslot'. Available: auto, transformers, unsloth. "
                                         "Did you mean 'unsloth'?"):
        backends.resolve_backend("unslot")


def test_4bit_without_bitsandbytes(monkeypatch):
    _installed_except(monkeypatch, "bitsandbytes")
    with pytest.raises(InputError, match=r"bitsandbytes.*pip install hf_instruct_tune\[qlora\]"):
        backends.check_4bit()


def test_4bit_without_gpu(monkeypatch, no_gpu):
    monkeypatch.setattr(backends, "_installed", lambda m: True)
    with pytest.raises(InputError, match="`load_in_4bit` needs a CUDA GPU"):
        backends.load_for_training("unused", backend="transformers", load_in_4bit=True)


def test_transformers_backend_loads_and_adds_lora(tmp_path, no_gpu):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model, tok = backends.load_for_training(str(tmp_path), backend="auto", dtype=torch.float32,
                                            attn_implementation="sdpa")
    assert tok is None and model.config._attn_implementation == "sdpa"
    model = backends.add_lora(model, backend="transformers", r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 2 * len(backends.LORA_TARGETS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth")
def test_labels_identical_with_and_without_unsloth(tmp_path):
    """Tokenization, labels and packing are the package's own: importing Unsloth changes none of them."""
    import subprocess
    import sys

    outs = [subprocess.run([sys.executable, "-c", LABELS_SNIPPET.format(imp=imp)], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
            for imp in ("", "import unsloth; ")]
    assert outs[0] == outs[1]


LABELS_SNIPPET = (
    "import json; {imp}"
    "from hf_instruct_tune import EOSSafeCollator, ExampleEncoder, get_formatter, get_template; "
    "from hf_instruct_tune.testing.tiny import build_tiny_tokenizer; "
    "tok = build_tiny_tokenizer(pad_is_eos=True); "
    "enc = ExampleEncoder(tok, get_template('alpaca'), max_length=256); "
    "rows = [dict(instruction='Classify', input='I like it', output='yes</s>'), dict(instruction='Say', output='no')]; "
    "ex = [enc.encode(get_formatter('alpaca')(r)).as_dict() for r in rows]; "
    "out = dict(encoded=ex); "
    "out.update({{str(pf): {{k: (v.tolist() if hasattr(v, 'tolist') else v) for k, v in "
    "EOSSafeCollator(pad_token_id=tok.pad_token_id, padding_free=pf)(ex).items()}} for pf in (False, True)}}); "
    "print(json.dumps(out))"
)


def _tiny_model_with_table():
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model(build_tiny_tokenizer())
    return model, model.get_input_embeddings().weight.detach().clone()


def test_embeddings_in_cpu_memory_look_up_the_same_rows():
    model, table = _tiny_model_with_table()
    backends.offload_input_embeddings(model, reserve_tokens=64)
    embedding = model.get_input_embeddings()
    assert not any(p is embedding.table for p in model.parameters())
    assert embedding.staging is None  # nothing to pin without a GPU
    ids = torch.tensor([[5, 7, 9, 5]])
    assert torch.equal(embedding(ids), table[ids])
    assert backends.offload_input_embeddings(model) is model and model.get_input_embeddings() is embedding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the staging buffer is pinned memory: needs a CUDA GPU")
def test_embeddings_in_cpu_memory_reuse_one_pinned_buffer_on_a_gpu():
    model, table = _tiny_model_with_table()
    model.cuda()
    table = table.cuda()
    backends.offload_input_embeddings(model, reserve_tokens=64)
    embedding = model.get_input_embeddings()
    pinned = embedding.staging.data_ptr()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, table.shape[0], (1, tokens), generator=generator).cuda() for tokens in (10, 64, 3)]
    outputs = [embedding(ids) for ids in batches]  # each micro-batch's rows copied out before the next overwrite
    for ids, output in zip(batches, outputs):
        assert torch.equal(output, table[ids])
    assert embedding.staging.data_ptr() == pinned and embedding.staging.is_pinned()
    larger = torch.randint(0, table.shape[0], (2, 50), generator=generator).cuda()
    assert torch.equal(embedding(larger), table[larger])  # outgrown: a larger buffer, with room to spare
    assert embedding.staging.shape[0] >= 125
