"""Padding-free (packed) batches with per-example attention isolation.

A packed batch concatenates every example of a micro-batch into one row ``[1, T]``:
no pad token is computed, and nothing in the batch attends across examples.

Isolation comes from two places, and both are needed:

* **Attention.** ``position_ids`` restart at 0 for every example. With ``sdpa``/``eager`` and
  ``attention_mask=None``, transformers' ``masking_utils.find_packed_sequence_indices`` turns that into a
  block-causal mask. Flash-attention kernels take ``cu_seq_lens_q/k`` and ``max_length_q/k`` instead
  (``pack_features(..., flash_attn_kwargs=True)``), as does :data:`VARLEN_ATTENTION`, the attention
  implementation this module registers on top of PyTorch's own flash-attention varlen kernel.
  An explicit ``attention_mask`` or a KV cache (``use_cache=True``) disables the detection: the batch carries
  ``use_cache=False`` and no mask.
* **Labels.** The causal-LM loss predicts token ``t+1`` from token ``t``, so the last token of one example
  would be trained to predict the first token of the next. The first label of every example is set to -100.

The loss of a packed batch is then the loss of the same examples padded: the sum over supervised tokens
divided by their count (``tests/test_packing.py`` checks loss and gradients).
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
VARLEN_ATTENTION = "torch_varlen"
"""Name of the attention implementation that :func:`register_varlen_attention` adds to transformers."""


def pack_features(
    features: Sequence[dict[str, Any]],
    pad_token_id: int | None = None,
    *,
    flash_attn_kwargs: bool = False,
) -> dict[str, torch.Tensor | int]:
    """Concatenate tokenized examples into one isolated, padding-free row.

    Args:
        features: dicts with ``input_ids`` and ``labels`` (lists or 1-D tensors of equal length); labels are
            already -100 on the prompt and hold the stop token once. Other keys are ignored.
        pad_token_id: unused by the packed layout (there is no padding); accepted so that a collator can pass
            its own arguments through unchanged.
        flash_attn_kwargs: also return ``cu_seq_lens_q/k`` (int32, ``[n+1]``) and ``max_length_q/k`` (int),
            which flash-attention and :data:`VARLEN_ATTENTION` use instead of a mask.

    Returns:
        ``input_ids`` ``[1, T]``, ``labels`` ``[1, T]`` with the first token of every example at -100,
        ``position_ids`` ``[1, T]`` restarting at 0 per example, ``use_cache=False`` (a KV cache turns the
        packed-sequence detection off), and the flash kwargs when asked for. There is deliberately no
        ``attention_mask``.
    """
    del pad_token_id
    if not features:
        raise ValueError("`features` should hold at least one example, got an empty list.")
    ids, labels, positions, lengths = [], [], [], []
    for i, feature in enumerate(features):
        x = _as_list(feature["input_ids"])
        y = _as_list(feature.get("labels", x))
        if len(x) != len(y):
            raise ValueError(f"Example {i}: `labels` should have the length of `input_ids` ({len(x)}), got {len(y)}.")
        if not x:
            raise ValueError(f"Example {i}: `input_ids` should not be empty.")
        ids.extend(x)
        labels.append(IGNORE_INDEX)
        labels.extend(y[1:])
        positions.extend(range(len(x)))
        lengths.append(len(x))
    batch: dict[str, torch.Tensor | int] = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        # transformers only detects packed rows when there is no KV cache: a model whose config says
        # use_cache=True builds one even in training, and the examples then attend to each other.
        "use_cache": False,
    }
    if flash_attn_kwargs:
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return batch


def best_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group example indices into bins of at most ``budget`` tokens (best-fit decreasing).

    An example longer than ``budget`` gets a bin of its own. Bins come out longest first; inside a bin the
    indices keep their original order.
    """
    if budget < 1:
        raise ValueError(f"`budget` should be a positive number of tokens, got {budget}.")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        best = -1
        for b, r in enumerate(room):
            if n <= r and (best < 0 or r < room[best]):
                best = b
        if best < 0:
            bins.append([i])
            room.append(budget - n)
        else:
            bins[best].append(i)
            room[best] -= n
    return [sorted(b) for b in bins]


def supports_varlen_attention() -> bool:
    """True when PyTorch's flash-attention varlen kernel can run here (a CUDA GPU of sm80 or newer)."""
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def best_attn_implementation() -> str:
    """The fastest isolated attention for packed batches on this machine.

    ``flash_attention_2`` when the ``flash_attn`` package is installed, else :data:`VARLEN_ATTENTION` (PyTorch's
    built-in flash varlen kernel, registered on first use) on an sm80+ GPU, else ``sdpa`` with the packed
    block-causal mask.
    """
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if supports_varlen_attention():
        register_varlen_attention()
        return VARLEN_ATTENTION
    return "sdpa"


def register_varlen_attention() -> str:
    """Register :data:`VARLEN_ATTENTION` with transformers' ``AttentionInterface`` and return its name.

    The implementation reads ``cu_seq_lens_q`` and ``max_length_q`` from the forward kwargs (``pack_features``
    with ``flash_attn_kwargs=True``); without them each row is one causal sequence. No mask is built for it.

    A FlexAttention ``BlockMask`` given as ``attention_mask`` (a shared-prefix batch,
    :func:`hf_instruct_tune.prefix_sharing.tree_block_mask`; transformers passes a 4-D mask through unchanged)
    runs ``flex_attention`` instead, computing only the blocks the mask lets through. On CUDA it is compiled once
    per process with dynamic shapes, so rows of any length reuse the same kernels (no padding to a bucket; the
    first steps pay for the compilation); where the compiled kernels cannot run (probed once, with a warning) and
    on CPU with gradients (FlexAttention has no CPU backward) it runs as ``sdpa`` over the dense mask of the same
    ``mask_mod``; on CPU without gradients as eager ``flex_attention``.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention_forward)
    return VARLEN_ATTENTION


def _varlen_call():
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params


def _varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query`` ``[B, H, T, D]`` -> ``([B, T, H, D], None)``."""
    if attention_mask is not None:
        if _is_block_mask(attention_mask):
            return _block_mask_attention(query, key, value, attention_mask, scaling), None
        raise ValueError(f"`{VARLEN_ATTENTION}` isolates examples by `cu_seq_lens_q` or a FlexAttention `BlockMask`; "
                         f"got an `attention_mask` of type {type(attention_mask).__name__}.")
    varlen_attn, has_window, has_gqa = _varlen_call()
    b, hq, t, d = query.shape
    hk = key.shape[1]
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k = key.transpose(1, 2).reshape(b * t, hk, d)
    v = value.transpose(1, 2).reshape(b * t, hk, d)
    if hk != hq and not has_gqa:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=q.device)
        max_length_q = t
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    extra: dict[str, Any] = {"scale": scaling}
    if has_window:
        extra["window_size"] = (-1, 0)  # causal
    else:
        extra["is_causal"] = True
    if has_gqa and hk != hq:
        extra["enable_gqa"] = True
    out = varlen_attn(q, k, v, cu, cu, int(max_length_q), int(max_length_q), **extra)
    return out.view(b, t, hq, d), None


def _is_block_mask(mask: Any) -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:
        return False
    return isinstance(mask, BlockMask)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


_BLOCK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                  "full_q_num_blocks", "full_q_indices")


def _blocks_of_any_count(block_mask: Any) -> Any:
    """Mark the block counts of ``block_mask`` dynamic: ``dynamic=True`` alone compiles the first call for its
    number of blocks and recompiles at the second."""
    for name in _BLOCK_TENSORS:
        tensor = getattr(block_mask, name, None)
        if tensor is not None:
            for dim in range(2, tensor.dim()):
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return block_mask


_COMPILED_FLEX_WORKS: dict[tuple, bool] = {}


def _compiled_flex_works(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether the compiled ``flex_attention`` runs forward and backward for tensors like these, probed once per
    device, dtype and head layout (a GPU with too little shared memory for its kernels fails); if not, a warning
    says so and shared-prefix batches attend with ``sdpa`` over the dense mask instead."""
    signature = (str(query.device), query.dtype, query.shape[1], key.shape[1], query.shape[-1])
    if signature not in _COMPILED_FLEX_WORKS:
        _COMPILED_FLEX_WORKS[signature] = _probe_compiled_flex(*signature)
    return _COMPILED_FLEX_WORKS[signature]


@torch.compiler.disable
def _probe_compiled_flex(device: str, dtype: torch.dtype, heads: int, kv_heads: int, dim: int) -> bool:
    from .prefix_sharing import build_prefix_tree, tree_block_mask

    # a prefix tree laid out and masked as a training batch is, so the kernels compiled here (dynamic shapes) are
    # the ones training reuses; its sizes (351 tokens, 5 nodes, 3 blocks) differ, or the compiler would tie them
    prefix, instruction = [1] * 200, [2] * 40
    tree = build_prefix_tree([prefix + instruction + [3] * 30, prefix + instruction + [4] * 31, prefix + [5] * 50])
    length = len(tree.tokens)
    try:
        block_mask = _blocks_of_any_count(tree_block_mask(torch.tensor(tree.node_of_token, device=device),
                                                          tree.ancestors().to(device)))
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            q, k, v = (torch.randn(1, length, h, dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
                       for h in (heads, kv_heads, kv_heads))
            out = _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=dim**-0.5,
                                             enable_gqa=heads != kv_heads)
            out.float().sum().backward()
        return True
    except Exception as error:  # noqa: BLE001 - any failure to compile or run means: use the dense path
        warnings.warn(f"FlexAttention could not run compiled on {device} ({type(error).__name__}: "
                      f"{str(error).strip()[:200]}); shared-prefix batches attend with sdpa over a dense mask instead "
                      "(the same results, more work).", stacklevel=2)
        return False


_DENSE_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _dense_mask(block_mask: Any, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The dense bool mask of ``block_mask``'s ``mask_mod``, built once per block mask: every layer of a forward
    (and its recomputation) attends under the same one."""
    dense = _DENSE_MASKS.get(block_mask)
    if dense is None:
        from torch.nn.attention.flex_attention import create_mask

        dense = _DENSE_MASKS[block_mask] = create_mask(block_mask.mask_mod, 1, 1, query.shape[2], key.shape[2],
                                                       device=query.device)
    return dense


def _block_mask_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any,
                          scaling: float | None) -> torch.Tensor:
    """``flex_attention`` of ``[B, H, T, D]`` tensors under ``block_mask``, as ``[B, T, H, D]``."""
    from torch.nn.attention.flex_attention import flex_attention

    gqa = key.shape[1] != query.shape[1]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if query.device.type == "cuda" and _compiled_flex_works(query, key):
        out = _compiled_flex_attention()(query, key, value, block_mask=_blocks_of_any_count(block_mask), scale=scaling,
                                         enable_gqa=gqa)
    elif needs_grad or query.device.type != "cpu":
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa,
                                                               attn_mask=_dense_mask(block_mask, query, key))
    else:
        with warnings.catch_warnings():  # eager on purpose: the CPU has no compiled kernel worth compiling for
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def _as_list(x: Any) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)
