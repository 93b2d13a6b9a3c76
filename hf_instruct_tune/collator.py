"""EOS-safe collation: pad by position, never by token id, so a stop token that equals the pad token survives."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError
from .tokenization import IGNORE_INDEX, ExampleEncoder


@dataclass
class EOSSafeCollator:
    """Batch examples for causal-LM training with labels that keep the stop token.

    Works with any ``transformers.Trainer``. Features are either already encoded
    (``{"input_ids": [...], "labels": [...]}``, as :class:`~hf_instruct_tune.InstructTrainer` and
    :func:`~hf_instruct_tune.data.tokenize_source` produce them) or raw rows, which are formatted and
    encoded on the fly when ``encoder`` and ``formatter`` are given (then pass
    ``remove_unused_columns=False`` to the trainer).

    Padding positions get ``attention_mask`` 0 and label -100; every other position keeps its label,
    including a stop token whose id equals ``pad_token_id``.

    Args:
        pad_token_id: the id written into padding positions (its value never affects labels).
        encoder: encodes raw rows; see :class:`~hf_instruct_tune.tokenization.ExampleEncoder`.
        formatter: turns a raw row into a normalized example; see :mod:`hf_instruct_tune.formatters`.
        padding_free: concatenate the batch into one row with per-example ``position_ids`` (packed
            training with per-example attention isolation) instead of padding.
        flash_attn_kwargs: with ``padding_free``, also return ``cu_seq_lens_q/k`` and ``max_length_q/k`` for
            flash-attention style kernels (``flash_attention_2``, ``torch_varlen``); :class:`InstructTrainer`
            sets it from the model's attention implementation.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        padding_side: ``"right"`` (training) or ``"left"``.
        prefix_sharing: lay out a batch whose rows share token prefixes as one shared-prefix row, when that
            costs clearly less (:mod:`hf_instruct_tune.prefix_sharing`); such a batch needs a trainer that
            reads its ``loss_positions`` (:class:`~hf_instruct_tune.InstructTrainer` does).
        attention_tokens: the model's matmul work per token over its attention work per token pair, about
            ``6 * hidden_size``: how prefix sharing weighs its explicit attention mask.
        block_sparse_attention: the model attends through a FlexAttention ``BlockMask`` (``torch_varlen``,
            ``flex_attention``): a shared-prefix batch then carries its prefix tree compactly instead of a dense
            mask, and sharing is weighed by the token pairs attended; :class:`InstructTrainer` sets it from the
            model's attention implementation.
        shared_tokens_limit: a shared-prefix row of more tokens than this is not used: the batch is laid out as
            usual, so that a trainer running a micro-batch over its memory budget in parts can cut it (a
            shared-prefix row cannot be cut); :class:`InstructTrainer` sets it from the memory plan.
        supervised_positions: with ``padding_free``, also return ``supervised_positions`` ``[1, N]``, the
            positions whose next token is supervised, so that the loss needs no mask found on the GPU
            (:mod:`hf_instruct_tune.supervised_positions`); such a batch needs a trainer that reads it
            (:class:`~hf_instruct_tune.InstructTrainer` sets it where the model takes ``logits_to_keep``).
    """

    pad_token_id: int
    encoder: ExampleEncoder | None = None
    formatter: Callable[[Mapping], dict] | None = None
    padding_free: bool = False
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"
    return_tensors: str = "pt"
    flash_attn_kwargs: bool = False
    prefix_sharing: bool = False
    attention_tokens: int = 4096
    block_sparse_attention: bool = False
    shared_tokens_limit: int | None = None
    supervised_positions: bool = False

    def __post_init__(self):
        if self.pad_token_id is None:
            raise InputError("`pad_token_id` should be an int (the tokenizer's pad or EOS id), got None.")
        if self.padding_side not in {"left", "right"}:
            raise InputError(f"`padding_side` should be 'left' or 'right', got {self.padding_side!r}.")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [example for example in map(self._encoded, features) if example is not None]
        if not encoded:
            raise InputError("every example of this batch is longer than max_length")
        if self.prefix_sharing and len(encoded) > 1:
            shared = self._shared(encoded)
            if shared is not None:
                return shared
        if self.padding_free:
            from .packing import pack_features

            batch = pack_features(encoded, pad_token_id=self.pad_token_id, flash_attn_kwargs=self.flash_attn_kwargs)
            if self.supervised_positions:
                from .supervised_positions import KEY, supervised_positions

                batch[KEY] = supervised_positions(batch["labels"])
            return batch
        return pad_examples(encoded, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of,
                            padding_side=self.padding_side)

    def _shared(self, encoded: list[dict[str, list[int]]]) -> dict[str, Any] | None:
        from .prefix_sharing import build_prefix_tree, share_prefixes, sharing_pays

        tree = build_prefix_tree([example["input_ids"] for example in encoded])
        if self.shared_tokens_limit is not None and len(tree.tokens) > self.shared_tokens_limit:
            return None
        lengths = [len(example["input_ids"]) for example in encoded]
        pairs = tree.attended_pairs() if self.block_sparse_attention else None
        if not sharing_pays(lengths, len(tree.tokens), attention_tokens=self.attention_tokens,
                            packed=self.padding_free, tree_pairs=pairs):
            return None
        return share_prefixes(encoded, tree, compact=self.block_sparse_attention)

    def _encoded(self, feature: Mapping[str, Any]) -> dict[str, list[int]] | None:
        if "input_ids" in feature and "labels" in feature:
            return {"input_ids": list(feature["input_ids"]), "labels": list(feature["labels"])}
        if self.encoder is None or self.formatter is None:
            raise InputError("a feature without 'input_ids' and 'labels' needs the collator's `encoder` and "
                             f"`formatter` to encode it; got the keys {sorted(feature)}")
        example = self.encoder.encode(self.formatter(feature))
        return example.as_dict() if example is not None else None


def pad_examples(examples: Sequence[Mapping[str, Sequence[int]]], *, pad_token_id: int,
                 pad_to_multiple_of: int | None = None, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad encoded examples to one length; mask padding in ``attention_mask`` and ``labels`` by position."""
    longest = max(len(example["input_ids"]) for example in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        if len(example["labels"]) != length:
            raise InputError(f"example {row} of the batch has {length} input_ids but {len(example['labels'])} labels")
        span = slice(0, length) if padding_side == "right" else slice(longest - length, longest)
        input_ids[row, span] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        labels[row, span] = torch.as_tensor(example["labels"], dtype=torch.long)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
