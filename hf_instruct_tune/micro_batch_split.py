"""A micro-batch larger than the memory budget holds, run as several smaller ones with the same loss and gradients.

The memory plan sizes micro-batches for the largest one a run usually meets; a rarer, longer one would pass the
budget even with every layer recomputed. :func:`split_micro_batch` cuts such a micro-batch between its examples
into parts of at most the budget's tokens, and the trainer runs each part's forward and backward in turn. Since
the loss of a step is a sum over its supervised tokens divided by their count for the whole step
(``num_items_in_batch``), the parts' losses and gradients add up to the whole micro-batch's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_PACKED_KEYS = {"input_ids", "labels", "position_ids", "use_cache", "supervised_positions", *_FLASH_KEYS}
_PADDED_KEYS = {"input_ids", "labels", "attention_mask"}


def micro_batch_tokens_of(inputs: Mapping[str, Any]) -> int:
    """The tokens a collated micro-batch puts through the model (padding included)."""
    ids = inputs.get("input_ids")
    return ids.numel() if ids is not None else 0


def split_micro_batch(inputs: Mapping[str, Any], most_tokens: int) -> list[dict[str, Any]]:
    """``inputs`` cut into parts of at most ``most_tokens`` tokens, or ``[inputs]`` when it fits or cannot be cut.

    A packed micro-batch (one row, ``position_ids`` restarting at 0 for each example, see
    :func:`~hf_instruct_tune.packing.pack_features`) is cut between examples, in order, each part as full as
    fits, with its own ``cu_seq_lens_q/k``, ``max_length_q/k`` and ``supervised_positions`` when the batch has
    them. A padded one
    (``[rows, length]`` with an ``attention_mask``) is cut between rows. An example longer than ``most_tokens``
    makes a part of its own. A batch with other keys (prefix sharing's layout) is not cut.
    """
    if most_tokens <= 0 or micro_batch_tokens_of(inputs) <= most_tokens:
        return [dict(inputs)]
    if set(inputs) <= _PACKED_KEYS and "position_ids" in inputs and inputs["input_ids"].shape[0] == 1:
        return _split_packed(inputs, most_tokens)
    if set(inputs) <= _PADDED_KEYS and "attention_mask" in inputs:
        return _split_padded(inputs, most_tokens)
    return [dict(inputs)]


def _split_packed(inputs: Mapping[str, Any], most_tokens: int) -> list[dict[str, Any]]:
    import torch

    positions = inputs["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    total = positions.numel()
    if not starts or starts[0] != 0:
        return [dict(inputs)]
    lengths = [end - start for start, end in zip(starts, [*starts[1:], total])]
    groups: list[list[int]] = []
    for length in lengths:
        if groups and sum(groups[-1]) + length <= most_tokens:
            groups[-1].append(length)
        else:
            groups.append([length])
    if len(groups) == 1:
        return [dict(inputs)]
    parts, offset = [], 0
    for group in groups:
        span = slice(offset, offset + sum(group))
        offset = span.stop
        part = {key: inputs[key][:, span] for key in ("input_ids", "labels", "position_ids") if key in inputs}
        if "use_cache" in inputs:
            part["use_cache"] = inputs["use_cache"]
        if "cu_seq_lens_q" in inputs:
            device = inputs["cu_seq_lens_q"].device
            cu = torch.tensor([0, *group], dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
            part.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(group), max_length_k=max(group))
        if "supervised_positions" in inputs:
            from .supervised_positions import supervised_positions

            part["supervised_positions"] = supervised_positions(part["labels"])
        parts.append(part)
    return parts


def _split_padded(inputs: Mapping[str, Any], most_tokens: int) -> list[dict[str, Any]]:
    rows, length = inputs["input_ids"].shape
    per_part = max(1, most_tokens // max(length, 1))
    if per_part >= rows:
        return [dict(inputs)]
    return [{key: value[start:start + per_part] for key, value in inputs.items()}
            for start in range(0, rows, per_part)]
