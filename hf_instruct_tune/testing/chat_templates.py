"""Tiny tokenizers carrying the chat templates of real model families, for tests that need no model hub.

Each shape is the family's ``chat_template`` reduced to what matters for labels (role headers, default
system prompts, date lines, end-of-turn markers, BOS handling, pad == EOS), on a byte-level BPE tokenizer
trained on renders of that template, so real merges happen at the template's boundaries (``"\\n\\n"``).
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA_31 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CHATML_DEFAULT_SYSTEM = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

INST = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

PHI_3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

CHATML_GENERATION = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

GLM = (
    "[gMASK]<sop>{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] }}"
    "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

QWEN3_THINK = (
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{%- set content = message['content'] %}"
    "{%- if loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ChatShape:
    """A chat-template family: its template, special tokens, and the stop token the template writes."""

    template: str
    bos: str | None
    eos: str
    pad: str
    specials: tuple[str, ...]
    stop: str
    adds_bos: bool = False
    split_pattern: str | None = None  # the pre-tokenizer's regex, where the family's differs from GPT-2's


LLAMA_3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


SHAPES: dict[str, ChatShape] = {
    "llama-3.1": ChatShape(LLAMA_31, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                           ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"), "<|eot_id|>",
                           adds_bos=True, split_pattern=LLAMA_3_SPLIT),
    "chatml-default-system": ChatShape(CHATML_DEFAULT_SYSTEM, None, "<|im_end|>", "<|endoftext|>",
                                       ("<|im_start|>",), "<|im_end|>"),
    "inst": ChatShape(INST, "<s>", "</s>", "</s>", (), "</s>", adds_bos=True),
    "gemma": ChatShape(GEMMA, "<bos>", "<eos>", "<pad>", ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>",
                       adds_bos=True),
    "phi-3": ChatShape(PHI_3, "<s>", "<|endoftext|>", "<|endoftext|>",
                       ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>"),
    "chatml-generation": ChatShape(CHATML_GENERATION, None, "<|im_end|>", "<|im_end|>", ("<|im_start|>",),
                                   "<|im_end|>"),
    "glm": ChatShape(GLM, None, "<|endoftext|>", "<|endoftext|>",
                     ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"), "<|user|>"),
    "qwen3-think": ChatShape(QWEN3_THINK, None, "<|im_end|>", "<|endoftext|>", ("<|im_start|>",), "<|im_end|>"),
}

_CORPUS_TURNS = [
    [{"role": "system", "content": "Answer: yes or no."}, {"role": "user", "content": "Is Paris the capital of France?"},
     {"role": "assistant", "content": "Sure, yes."}, {"role": "user", "content": "And Lyon?"},
     {"role": "assistant", "content": "No, it is not."}],
    [{"role": "user", "content": "Classify the sentiment: I love rainy days."}, {"role": "assistant", "content": "positive"}],
    [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "\n\nhello\n\nthere"}],
]


def build_chat_tokenizer(shape: str | ChatShape, *, vocab_size: int = 700):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``shape``'s special tokens and ``chat_template``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    shape = SHAPES[shape] if isinstance(shape, str) else shape
    specials = [token for token in dict.fromkeys([shape.bos, shape.eos, shape.pad, *shape.specials]) if token]
    corpus = _corpus(shape) + ["The quick brown fox jumps over the lazy dog.", " yes no maybe positive negative",
                               "Paris.\n\n", "yes\n\n"]
    tokenizer = Tokenizer(models.BPE())
    if shape.split_pattern:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(shape.split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus * 4, trainer=trainer)
    if shape.adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{shape.bos} $A", pair=f"{shape.bos} $A {shape.bos} $B",
            special_tokens=[(shape.bos, tokenizer.token_to_id(shape.bos))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=shape.bos, eos_token=shape.eos, pad_token=shape.pad,
        additional_special_tokens=[token for token in shape.specials if token not in (shape.bos, shape.eos, shape.pad)],
        model_max_length=2048,
    )
    wrapped.chat_template = shape.template
    return wrapped


def _corpus(shape: ChatShape) -> list[str]:
    """Renders of sample conversations in ``shape``'s template, so its boundaries get real merges."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.globals["raise_exception"] = lambda message: ""
    environment.globals["strftime_now"] = lambda fmt: "26 Jul 2024"
    texts = []
    source = shape.template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for turns in _CORPUS_TURNS:
        for messages in (turns, [m for m in turns if m["role"] != "system"]):
            texts.append(environment.from_string(source).render(
                messages=messages, add_generation_prompt=False, bos_token=shape.bos or "", eos_token=shape.eos))
    return texts
