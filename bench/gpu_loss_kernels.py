"""The loss kernels on one GPU: time and peak memory of forward + backward for Llama-3's output head.

For N in (4096, 16384) tokens, H=4096, V=128256, bf16 hidden states (requiring grad) and a frozen bf16 weight, with
the hidden states random (a flat softmax, as the bench's random-weight model gives) and "peaked" (each hidden
state along its target's row of the weight, so the target's logit dominates, as in a trained model):
``implementation="cce"`` (Cut Cross-Entropy), ``"chunked"`` at 1,024, 2,048 and 4,096 tokens a chunk
(:func:`hf_instruct_tune.loss.fused_cross_entropy`), and plain logits (``F.linear`` + fp32 ``F.cross_entropy``).
Median of 10 timed calls after 3 warm-up calls, each between ``torch.cuda.synchronize()``; the peak is
``max_memory_allocated`` above what the inputs hold. One RESULT json line per case. Under 90 s on an H200.

usage (on the GPU machine, from the repository root, the bundle unpacked as in bench/run_gpu_levers.sh):
  PYTHONPATH=/tmp/site:$PWD python bench/gpu_loss_kernels.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

from hf_instruct_tune.loss import IGNORE_INDEX, cce_available, predictions_cross_entropy

HIDDEN, VOCAB = 4096, 128256
TOKENS = (4096, 16384)
WARMUP, TIMED = 3, 10


def inputs(tokens: int, peaked: bool, weight: torch.Tensor, generator: torch.Generator):
    targets = torch.randint(0, VOCAB, (tokens,), device="cuda", generator=generator)
    hidden = torch.randn(tokens, HIDDEN, device="cuda", generator=generator)
    if peaked:  # along the target's row: its logit 20, the others' spread ~0.5 (the target's probability ~1)
        rows = weight[targets].float()
        hidden = 0.3 * hidden + 20 * rows / rows.norm(dim=-1, keepdim=True) ** 2
    return hidden.to(torch.bfloat16).requires_grad_(True), targets


def plain(hidden, weight, targets):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)


def kernels():
    yield "plain", None, plain
    for chunk in (1024, 2048, 4096):
        yield "chunked", chunk, lambda h, w, y, c=chunk: predictions_cross_entropy(h, w, y, chunk_size=c,
                                                                                   implementation="chunked")
    if cce_available():
        yield "cce", None, lambda h, w, y: predictions_cross_entropy(h, w, y, implementation="cce")


def measure(loss_fn, hidden, weight, targets) -> tuple[float, float, float]:
    """(median seconds, peak GiB above the inputs, loss)"""
    times = []
    for call in range(WARMUP + TIMED):
        hidden.grad = None
        if call == WARMUP:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn(hidden, weight, targets)
        loss.backward()
        torch.cuda.synchronize()
        if call >= WARMUP:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return statistics.median(times), peak, float(loss.detach())


def main() -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=generator) * 0.02).to(torch.bfloat16)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cce": cce_available()}))
    for tokens in TOKENS:
        for peaked in (False, True):
            hidden, targets = inputs(tokens, peaked, weight, generator)
            for name, chunk, loss_fn in kernels():
                try:
                    seconds, peak, loss = measure(loss_fn, hidden, weight, targets)
                    result = {"kernel": name, "chunk": chunk, "tokens": tokens, "softmax": "peaked" if peaked else "flat",
                              "ms": round(seconds * 1e3, 2), "peak_gib": round(peak, 3), "loss": round(loss, 4)}
                except torch.OutOfMemoryError:
                    result = {"kernel": name, "chunk": chunk, "tokens": tokens, "error": "out of memory"}
                torch.cuda.empty_cache()
                print("RESULT " + json.dumps(result), flush=True)
            del hidden, targets


if __name__ == "__main__":
    main()
