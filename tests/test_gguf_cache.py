import pytest
import torch

from hf_instruct_tune import gguf_cache
from hf_instruct_tune.models import DEFAULT_MODEL, load_base_model, load_tokenizer

pytestmark = pytest.mark.slow

TEXT = "### 指令:\n分类以下文本的情感。\n\n### 响应:\n积极<|im_end|>"


def test_a_converted_gguf_loads_from_the_cache_exactly_as_converted(embedded_model_spec, monkeypatch):
    monkeypatch.setenv("HF_INSTRUCT_TUNE_GGUF_CACHE", "1")
    gguf = embedded_model_spec.load_path + "/" + embedded_model_spec.gguf_file
    from pathlib import Path

    assert gguf_cache.cached(Path(gguf), "model", str(torch.float32)) is None
    tokenizer, model = load_tokenizer(embedded_model_spec), load_base_model(embedded_model_spec, dtype="float32")
    entry = gguf_cache.cached(Path(gguf), "model", str(torch.float32))
    assert entry is not None and (entry / "model.safetensors").is_file()
    assert gguf_cache.cached(Path(gguf), "tokenizer") is not None

    def converting_again(*args, **kwargs):
        raise AssertionError("the GGUF file was read again")

    from transformers import modeling_gguf_pytorch_utils

    monkeypatch.setattr(modeling_gguf_pytorch_utils, "load_gguf_checkpoint", converting_again)
    cached_tokenizer, cached_model = load_tokenizer(embedded_model_spec), load_base_model(embedded_model_spec, dtype="float32")
    assert cached_tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert cached_tokenizer.chat_template == tokenizer.chat_template
    assert (cached_tokenizer.eos_token, cached_tokenizer.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)
    assert cached_model.name_or_path == DEFAULT_MODEL and not getattr(cached_model, "is_quantized", False)
    expected, got = model.state_dict(), cached_model.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    torch.testing.assert_close(cached_model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_the_cache_can_be_turned_off(embedded_model_spec, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("HF_INSTRUCT_TUNE_GGUF_CACHE", "0")
    load_tokenizer(embedded_model_spec)
    assert gguf_cache.cached(Path(embedded_model_spec.load_path) / embedded_model_spec.gguf_file, "tokenizer") is None
    assert not gguf_cache.entry_folder(Path(embedded_model_spec.load_path) / embedded_model_spec.gguf_file, "tokenizer").exists()
