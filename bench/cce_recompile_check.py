"""Seconds of each Cut Cross-Entropy call (forward and backward) as a run's micro-batches change their row count.

Llama-3's head (hidden 4,096, vocabulary 128,256, bf16) on one GPU, row counts as a packed run meets them (the
bench's step 1-6 and 14 counts, then counts that are multiples of 16, of 64 x 16 and of 128 x 16). ``raw`` calls
``cut_cross_entropy.linear_cross_entropy`` on the rows as they come; ``package`` calls the package's
``predictions_cross_entropy`` (rows padded by ``hf_instruct_tune.loss.padded_row_count``). Each mode in a process
of its own, with ``TRITON_CACHE_DIR`` as given (a fresh folder: nothing compiled before).

usage: python bench/cce_recompile_check.py raw|package   -> RESULT {"mode": ..., "seconds": [[rows, s], ...]}
"""

from __future__ import annotations

import json
import sys
import time

ROWS = [3592, 3361, 3690, 3932, 3991, 5200, 4005, 6086, 4096, 4100, 8192, 4113]


def main(mode: str) -> None:
    import torch

    from hf_instruct_tune.loss import predictions_cross_entropy

    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(128_256, 4_096, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.02
    seconds = []
    for rows in ROWS:
        h = torch.randn(rows, 4_096, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
        y = torch.randint(0, 128_256, (rows,), device="cuda", generator=generator)
        torch.cuda.synchronize()
        start = time.perf_counter()
        if mode == "raw":
            from cut_cross_entropy import linear_cross_entropy

            loss = linear_cross_entropy(h, weight, y, reduction="sum")
        else:
            loss = predictions_cross_entropy(h, weight, y, implementation="cce")
        loss.backward()
        torch.cuda.synchronize()
        seconds.append([rows, round(time.perf_counter() - start, 3)])
    print("RESULT " + json.dumps({"mode": mode, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
