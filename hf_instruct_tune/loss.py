"""Causal-LM cross-entropy from final hidden states, without materializing ``[tokens, vocab]`` fp32 logits.

With a 128k vocabulary the logits of a 16-row micro-batch take more memory than the rest of a QLoRA step.
:func:`fused_cross_entropy` computes the same loss as transformers' ``ForCausalLMLoss`` from the hidden
states and the ``lm_head`` weight:

* ``cut_cross_entropy.linear_cross_entropy`` (Apple's Cut Cross-Entropy) when it is installed and the
  tensors are on a CUDA device: no logits at all;
* otherwise chunks of ``chunk_size`` tokens, each chunk's logits computed in fp32 and recomputed in backward
  (:func:`torch.utils.checkpoint.checkpoint`), so at most one chunk of logits is alive.

:class:`~hf_instruct_tune.InstructTrainer` uses it with ``fused_loss=True``.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def cce_available(device: torch.device | None = None) -> bool:
    """True when ``cut_cross_entropy`` is importable and ``device`` (default: any) is a CUDA device."""
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return False
    return device.type == "cuda" if device is not None else torch.cuda.is_available()


def fused_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    num_processes: int = 1,
    chunk_size: int = 1024,
    implementation: str = "auto",
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` against ``labels``, normalized like transformers.

    Args:
        hidden: final (normed) hidden states ``[B, T, H]``, as the model would feed its ``lm_head``.
        weight: the ``lm_head`` weight ``[V, H]`` (gradients flow into it if it requires them).
        labels: ``[B, T]`` unshifted labels, -100 where no loss is taken; position ``t`` predicts ``t+1``.
        bias: the ``lm_head`` bias, if any.
        softcap: ``final_logit_softcapping`` (Gemma 2): logits become ``softcap * tanh(logits / softcap)``.
        num_items_in_batch: the supervised tokens of the whole optimizer step (what ``Trainer`` passes);
            the sum of token losses is divided by it. When None, by this batch's supervised tokens.
        num_processes: multiplies the loss when ``num_items_in_batch`` counts the tokens of every rank
            (``args.average_tokens_across_devices``), since DDP averages gradients across ranks.
        chunk_size: tokens per chunk on the chunked path.
        implementation: ``"auto"`` (cce when available on this device, else chunked), ``"cce"`` or ``"chunked"``.

    Returns:
        A scalar fp32 loss.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    return predictions_cross_entropy(h, weight, y, bias=bias, softcap=softcap, num_items_in_batch=num_items_in_batch,
                                     num_processes=num_processes, chunk_size=chunk_size, implementation=implementation)


def predictions_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    num_processes: int = 1,
    chunk_size: int = 1024,
    implementation: str = "auto",
    all_supervised: bool = False,
) -> torch.Tensor:
    """:func:`fused_cross_entropy` of already aligned predictions: ``hidden[i]`` ``[N, H]`` predicts ``targets[i]``
    ``[N]`` (-100: no loss). Shared-prefix batches (:mod:`hf_instruct_tune.prefix_sharing`) and packed ones
    (:mod:`hf_instruct_tune.supervised_positions`) gather theirs. ``all_supervised``: no target is -100, so the
    loss reads no count back from the device."""
    if implementation not in {"auto", "cce", "chunked"}:
        raise ValueError(f"`implementation` should be 'auto', 'cce' or 'chunked', got {implementation!r}.")
    h = hidden.to(weight.dtype)
    y = targets.reshape(-1).to(h.device)
    if not all_supervised:
        supervised = y != IGNORE_INDEX
        if not supervised.all():  # only supervised positions need logits: responses are a fraction of the tokens
            h, y = h[supervised], y[supervised]
    use_cce = implementation == "cce" or (implementation == "auto" and bias is None and cce_available(h.device))
    total = (_cce_sum(h, weight, y, softcap) if use_cce
             else _chunked_sum(h, weight, bias, y, softcap, chunk_size, all_supervised=all_supervised))
    return normalized_loss(total, y, num_items_in_batch, num_processes)


def normalized_loss(total: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None,
                    num_processes: int = 1) -> torch.Tensor:
    """A summed token loss divided like transformers': by ``num_items_in_batch`` (the step's supervised tokens,
    times ``num_processes``) when given, else by the supervised tokens of ``targets``."""
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1) * num_processes


def _cce_sum(h, weight, y, softcap):
    """Cut Cross-Entropy's summed loss of the supervised rows ``h``, ``y``, padded by :func:`padded_to_row_blocks`;
    the padding rows' known loss taken back out."""
    from cut_cross_entropy import linear_cross_entropy

    if h.shape[0] == 0:  # nothing supervised: a zero that still backpropagates
        return h.sum(dtype=torch.float32) * 0.0
    h, y, padding = padded_to_row_blocks(h, y)
    total = linear_cross_entropy(h, weight, y, ignore_index=IGNORE_INDEX, softcap=softcap, reduction="sum").float()
    return total - padding * math.log(weight.shape[0])


def padded_row_count(rows: int, hidden: int) -> int:
    """The rows :func:`padded_to_row_blocks` hands Cut Cross-Entropy for ``rows`` supervised rows of ``hidden``
    values: the same pattern of multiples of 16 among its kernels' integer arguments for every micro-batch.

    Triton compiles a kernel again for each new pattern of its integer arguments being multiples of 16. Cut
    Cross-Entropy passes the row count, its forward the count of 128-row lock blocks and its backward the count
    of row blocks of one lock per 64 hidden values. Left as they come, the first micro-batch of each new pattern
    compiles the kernels again in the middle of training. Here the rows are a multiple of 16 and neither block
    count is (unless one always is), for at most a few hundred rows more."""
    block = -(-hidden // 64)
    padded = -(-max(rows, 1) // 16) * 16
    for candidate in range(padded, padded + 16 * 4096, 16):
        if -(-candidate // 128) % 16 and (block == 1 or -(-candidate // block) % 16):
            return candidate
    return padded


def padded_to_row_blocks(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``h`` [rows, hidden] and its targets ``y`` followed by zero rows with target 0, up to
    :func:`padded_row_count`; returns them and the number of zero rows. A zero row's logits are all zero: its loss
    is log(vocabulary), and it adds nothing to the gradient of ``h`` or of the head."""
    padding = padded_row_count(h.shape[0], h.shape[1]) - h.shape[0]
    return F.pad(h, (0, 0, 0, padding)), F.pad(y, (0, padding)), padding


def _logits_sum(h, weight, bias, y, softcap):
    logits = F.linear(h, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunked_sum(h, weight, bias, y, softcap, chunk_size, all_supervised=False):
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        y_chunk = y[start:start + chunk_size]
        if not all_supervised and not (y_chunk != IGNORE_INDEX).any():
            continue
        total = total + checkpoint(_logits_sum, h[start:start + chunk_size], weight, bias, y_chunk, softcap,
                                   use_reentrant=False)
    if total.grad_fn is None and h.requires_grad:  # nothing supervised: a zero that still backpropagates
        total = total + 0.0 * h.sum()
    return total
