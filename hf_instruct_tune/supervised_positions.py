"""The loss of a packed micro-batch taken at its supervised positions, listed by the collator.

A packed micro-batch's loss needs only the positions whose next token is supervised. Found on the GPU
(``hidden[labels != -100]``, or ``if mask.all()``), they make the CPU wait for the forward to finish: a
boolean mask's size is read back before the head can be queued, and its backward reads it again. While the CPU
waits, nothing else is queued, and the GPU idles while the CPU catches up. The collator lists them instead,
from the labels it has just built on the CPU (``supervised_positions`` ``[1, N]``: the positions ``t`` with
``labels[0, t + 1] != -100``), and :func:`positions_loss` takes the head's output there only
(``logits_to_keep``) and gathers the targets by index, so no size is read back during the step.

Loss and gradients are those of the whole row's shifted cross-entropy, normalized the same way
(``tests/test_supervised_positions.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from . import loss as losses
from .loss import IGNORE_INDEX

KEY = "supervised_positions"


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[1, N]``: the positions of the packed row ``labels`` ``[1, T]`` whose next token is supervised."""
    return (labels[0, 1:] != IGNORE_INDEX).nonzero().view(1, -1)


def positions_loss(model: Any, inputs: dict[str, Any], *, head: Any = None, softcap: float | None = None,
                   num_items_in_batch: Any = None, num_processes: int = 1, implementation: str = "auto",
                   metrics: dict[str, list] | None = None) -> tuple[torch.Tensor, Any]:
    """The causal-LM loss of a packed batch carrying ``supervised_positions``, normalized like transformers'.

    ``head``: the ``lm_head`` when the model returns hidden states (fused loss), else None (it returns logits);
    ``metrics``: TRL's metric lists, which get the batch's ``entropy`` and ``mean_token_accuracy`` (as tensors,
    read when they are logged) when the logits are computed. Returns ``(loss, outputs)``.
    """
    positions = inputs.pop(KEY)[0]
    labels = inputs.pop("labels")
    targets = labels[0, 1:].index_select(0, positions)
    inputs["use_cache"] = False
    inputs["logits_to_keep"] = positions
    outputs = model(**inputs)
    chosen = outputs.logits[0]
    if head is not None:
        loss = losses.predictions_cross_entropy(chosen, head.weight, targets, bias=head.bias, softcap=softcap,
                                                num_items_in_batch=num_items_in_batch, num_processes=num_processes,
                                                implementation=implementation, all_supervised=True)
    else:
        total, entropy, correct = ChunkedCrossEntropy.apply(chosen, targets, metrics is not None)
        loss = losses.normalized_loss(total, targets, num_items_in_batch, num_processes)
        if metrics is not None:  # TRL's, as 0-dim tensors read when logged
            count = max(targets.numel(), 1)
            metrics["entropy"].append(entropy / count)
            metrics["mean_token_accuracy"].append(correct / count)
    return loss, outputs


class ChunkedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of ``logits`` ``[N, vocab]`` (every target supervised), in fp32 ``CHUNK`` rows at a
    time, keeping only the logits for backward; with ``with_metrics``, from the same log-softmax, the summed
    entropy of the predictions and the count of targets predicted (TRL's ``entropy`` and ``mean_token_accuracy``),
    else two zeros.

    ``F.cross_entropy(logits.float(), ...)`` keeps an fp32 log-softmax of every row for backward and makes fp32
    gradients of all of them at once: for bf16 logits, several times their memory. Here forward and backward each
    hold one chunk's fp32 values; backward recomputes the chunk's softmax from the logits. The same arithmetic row
    by row (fp32 from the same logits), so the same loss and gradients up to the order of the sum.
    """

    CHUNK = 1024

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, with_metrics: bool = False):
        total, entropy = (torch.zeros((), dtype=torch.float32, device=logits.device) for _ in range(2))
        correct = torch.zeros((), dtype=torch.long, device=logits.device)
        for start in range(0, logits.shape[0], ChunkedCrossEntropy.CHUNK):
            stop = start + ChunkedCrossEntropy.CHUNK
            log_probs = logits[start:stop].float().log_softmax(-1)
            total -= log_probs.gather(1, targets[start:stop].unsqueeze(1)).sum()
            if with_metrics:
                entropy -= (log_probs.exp() * log_probs).sum()
                correct += (log_probs.argmax(-1) == targets[start:stop]).sum()
        ctx.save_for_backward(logits, targets)
        ctx.mark_non_differentiable(entropy, correct)
        return total, entropy, correct

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _entropy, _correct):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ChunkedCrossEntropy.CHUNK):
            stop = start + ChunkedCrossEntropy.CHUNK
            part = logits[start:stop].float().softmax(-1)
            part.scatter_add_(1, targets[start:stop].unsqueeze(1), part.new_full((part.shape[0], 1), -1.0))
            grad[start:stop] = part.mul_(grad_total)
        return grad, None, None


def read_metrics(metrics: dict[str, list]) -> None:
    """Replace the tensors :func:`positions_loss` recorded in ``metrics`` by floats (before they are logged)."""
    for values in metrics.values():
        for index, value in enumerate(values):
            if isinstance(value, torch.Tensor):
                values[index] = value.item()
