"""Tiny random Llama models with real byte-level BPE tokenizers, built locally in seconds.

They exercise the same code paths as real checkpoints (special tokens, BOS handling, pad == EOS)
without a model hub.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n", "Answer: yes", "Answer: no", " yes no maybe",
    "以下是描述任务的指令。请编写一个适当完成请求的响应。### 指令: ### 输入: ### 响应:",
    "分类以下文本的情感。积极 中性 消极 我喜欢 我不喜欢 天气 足球 下雨",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "user assistant system hello world classify the sentiment of this text positive negative neutral",
]


def build_tiny_tokenizer(*, pad_is_eos: bool = True, adds_bos: bool = True, vocab_size: int = 600):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Llama-style and ChatML special tokens.

    Args:
        pad_is_eos: use ``</s>`` as the pad token (as most instruct checkpoints do), else ``<pad>``.
        adds_bos: prepend ``<s>`` to every encoded text, as Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>" if pad_is_eos else "<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=2048,
    )


def build_tiny_model(tokenizer, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A random ``LlamaForCausalLM`` sized for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def save_tiny_checkpoint(path: str | Path, *, pad_is_eos: bool = True, adds_bos: bool = True, seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer to ``path`` (a local checkpoint usable as ``--model``)."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer(pad_is_eos=pad_is_eos, adds_bos=adds_bos)
    model = build_tiny_model(tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
