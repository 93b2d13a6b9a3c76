"""Generating with a trained adapter, from the exact prompt template it was trained with."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter_folder import check_adapter_folder, load_adapter, load_tokenizer, read_json_object, read_text
from .errors import InputError
from .formatters import FieldError, get_formatter
from .metadata import TrainingMetadata
from .templating import TEMPLATE_FILE_NAME, PromptTemplate
from .tokenization import ExampleError
from .chat_encoding import encoder_for
from .chat_template import ChatTemplate
from .recipe import is_model_template

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    text: str
    finish_reason: str  # "eos": the stop token was generated; "length": max_new_tokens ran out


class AdapterGenerator:
    """Load a base model with an adapter folder written by ``train`` and generate responses.

    The prompt is rebuilt from ``prompt_template.jinja`` saved with the adapter, tokenized exactly as in
    training, and generation stops on the template's stop token.

    Args:
        adapter_dir: the folder ``hf-instruct-tune train`` wrote (or a downloaded copy of it).
        model: the base model (Hub id or path); default: the one recorded in the adapter's metadata.
        trust_remote_code: allow code from the base model's repository to run.
        allow_pickle: accept a local base model whose weights are only pickles (``*.bin``).
    """

    def __init__(self, adapter_dir: str | Path, *, model: str | None = None, trust_remote_code: bool = False,
                 allow_pickle: bool = False):
        from .models import load_base_model, resolve_model

        adapter_dir = _local_adapter(adapter_dir)
        check_adapter_folder(adapter_dir, allow_pickle=allow_pickle)  # it may come from anyone's Hub repo
        self.metadata = TrainingMetadata.load(adapter_dir)
        self.tokenizer = load_tokenizer(adapter_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        try:  # a template the sandbox refuses is the folder's fault, found before the model loads
            self.template = _saved_template(adapter_dir, self.metadata.template.get("name", "saved"), self.tokenizer)
            self.encoder = encoder_for(self.tokenizer, self.template)
            self.encoder.encode_prompt([{"role": "user", "content": "hello"}])
        except ExampleError as error:
            raise InputError(str(error), source=str(adapter_dir / TEMPLATE_FILE_NAME)) from None
        except InputError as error:
            if error.source:
                raise
            raise InputError(error.message, source=str(adapter_dir / TEMPLATE_FILE_NAME), location=error.location,
                             field=error.field) from None
        base = model or self.metadata.base_model or _adapter_base(adapter_dir)
        if not base:
            raise InputError("the adapter does not record its base model; pass --model", source=str(adapter_dir))
        base_model = load_base_model(resolve_model(base), trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        self.model = load_adapter(base_model, adapter_dir).to(_generation_device()).eval()
        self._kept_prefix: tuple[list[int], Any] | None = None  # a shared prompt prefix and its KV cache

    def generate(self, conversations: Sequence[Sequence[Mapping]], *, max_new_tokens: int = 256,
                 batch_size: int = 8, prefix_sharing: bool | None = None) -> list[Generation]:
        """Generate one response per conversation (the messages before the assistant's answer).

        With ``prefix_sharing``, the token prefix that the prompts of a batch share (a preamble, a system
        prompt) is run through the model once, and its KV cache serves every row of the batch, and the next
        batches that share the same prefix. None (default): on a CPU, where it is faster (BENCHMARKS.md
        "Prefix sharing"), off on a GPU, where it measured slower.
        """
        if prefix_sharing is None:
            prefix_sharing = self.model.device.type == "cpu"
        results: list[Generation] = []
        prompts = [self.encoder.encode_prompt(messages) for messages in conversations]
        try:
            self._generate_batches(prompts, results, max_new_tokens, batch_size, prefix_sharing)
        finally:
            self._kept_prefix = None  # the prefix's cache lives for one call
        return results

    def _generate_batches(self, prompts: list[list[int]], results: list[Generation], max_new_tokens: int,
                          batch_size: int, prefix_sharing: bool) -> None:
        import torch
        from transformers import StoppingCriteriaList

        from .generation_progress import GenerationProgress

        stop_id = self.encoder.stop_token_id
        device = self.model.device
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            shared = shared_prompt_length(chunk) if prefix_sharing else 0
            prefix, rests = chunk[0][:shared], [ids[shared:] for ids in chunk]
            width = max(map(len, rests))
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([prefix + [pad] * (width - len(ids)) + ids for ids in rests], device=device)
            attention = torch.tensor([[1] * shared + [0] * (width - len(ids)) + [1] * len(ids) for ids in rests],
                                     device=device)
            extra = {_cache_keyword(): self._prefix_cache(prefix, len(chunk))} if shared else {}
            extra["stopping_criteria"] = StoppingCriteriaList([GenerationProgress(
                batch=start // batch_size + 1, batches=-(-len(prompts) // batch_size), prompt_width=shared + width,
                max_new_tokens=max_new_tokens)])
            with torch.no_grad():
                output = self.model.generate(input_ids=input_ids, attention_mask=attention,
                                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_id,
                                             pad_token_id=pad, temperature=None, top_p=None, top_k=None, **extra)
            for row in output[:, shared + width:].tolist():
                if stop_id in row:
                    results.append(Generation(self._decode(row[: row.index(stop_id)]), "eos"))
                else:
                    results.append(Generation(_without_a_cut_character(self._decode(row)), "length"))

    def _prefix_cache(self, prefix: list[int], rows: int):
        """The KV cache of ``prefix`` repeated for ``rows`` rows; the prefix runs through the model once and is
        kept for the next batch with the same prefix."""
        import copy

        import torch

        kept = self._kept_prefix
        if kept is None or kept[0] != prefix:
            with torch.no_grad():  # only the cache is wanted: the head runs on the last token alone
                output = self.model(input_ids=torch.tensor([prefix], device=self.model.device), use_cache=True,
                                    logits_to_keep=1)
            kept = self._kept_prefix = (list(prefix), output["cache"] if _cache_keyword() == "cache"
                                        else output.past_key_values)
        cache = copy.deepcopy(kept[1])  # generate extends the cache it is given
        cache.batch_repeat_interleave(rows)
        return cache

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _saved_template(adapter_dir: Path, name: str, tokenizer) -> PromptTemplate | ChatTemplate:
    """The template the adapter was trained with, from ``prompt_template.jinja`` saved next to it."""
    template_file = adapter_dir / TEMPLATE_FILE_NAME
    if is_model_template(name):  # the tokenizer's own chat template, kept verbatim
        if not template_file.is_file():
            raise InputError("template file not found", source=str(template_file))
        return ChatTemplate.from_source(read_text(template_file), tokenizer, name=name,
                                        origin=str(template_file))
    template = PromptTemplate.from_file(template_file)
    return PromptTemplate.from_source(template.source, name=name, origin=str(template_file))


def _generation_device() -> str:
    """The first CUDA GPU when there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cache_keyword() -> str:
    """What ``generate`` calls a KV cache: ``cache`` (transformers 5.24+) or ``past_key_values``."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


MIN_SHARED_PROMPT = 16
"""Prompt prefixes shorter than this (in tokens) are not worth a cache of their own."""


def shared_prompt_length(prompts: Sequence[Sequence[int]]) -> int:
    """The tokens the prompts of a batch share at their start (leaving each at least one of its own), or 0
    when there are fewer than two prompts or fewer than :data:`MIN_SHARED_PROMPT` shared tokens."""
    if len(prompts) < 2:
        return 0
    shortest = min(map(len, prompts))
    shared = 0
    while shared < shortest - 1 and all(ids[shared] == prompts[0][shared] for ids in prompts):
        shared += 1
    return shared if shared >= MIN_SHARED_PROMPT else 0


def _without_a_cut_character(text: str) -> str:
    """``text`` less the replacement character that a multi-byte character cut by the length limit decodes to."""
    return text[:-1] if text.endswith("\ufffd") else text


def _local_adapter(adapter: str | Path) -> Path:
    """A local adapter folder, downloading a Hub repo id (safetensors, config, tokenizer, template) when given one."""
    path = Path(adapter)
    if path.exists() or str(adapter).count("/") != 1:
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(adapter), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model",
                                                                    "*.txt"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise InputError(f"neither a local folder nor a Hub repo that could be downloaded: {error}",
                         source=str(adapter)) from None


def _adapter_base(adapter_dir: Path) -> str | None:
    return read_json_object(adapter_dir / "adapter_config.json").get("base_model_name_or_path")


def prompt_messages(row: Mapping[str, Any], formatter_name: str) -> list[dict]:
    """The conversation to answer for a data row: the row without its final response, if it has one."""
    if formatter_name == "alpaca":
        row = {**row, "output": row.get("output") or "-"}
    elif formatter_name == "prompt_completion":
        row = {**row, "completion": row.get("completion") or "-"}
    elif formatter_name in {"messages", "sharegpt"}:
        key = "messages" if formatter_name == "messages" else "conversations"
        turns = list(row.get(key) or [])
        role_key, assistant = ("role", {"assistant"}) if key == "messages" else ("from", {"gpt", "assistant", "model"})
        while turns and isinstance(turns[-1], Mapping) and turns[-1].get(role_key) in assistant:
            turns.pop()
        placeholder = {"role": "assistant", "content": "-"} if key == "messages" else {"from": "gpt", "value": "-"}
        row = {**row, key: turns + [placeholder]}
    normalized = get_formatter(formatter_name)(row)
    if "messages" not in normalized:
        raise FieldError("text", f"the '{formatter_name}' formatter gives no prompt to answer")
    messages = normalized["messages"]
    return messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
