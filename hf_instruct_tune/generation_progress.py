"""Progress lines for long generations: ``Generating: batch 1/3, 64/256 new tokens (10 s)``."""

from __future__ import annotations

import logging
import time

from transformers import StoppingCriteria

logger = logging.getLogger("hf_instruct_tune.generation")

PROGRESS_EVERY_S = 10.0
"""Seconds between two progress lines; a generation shorter than this prints none."""


class GenerationProgress(StoppingCriteria):
    """Logs how far a batch has got, at most every :data:`PROGRESS_EVERY_S` seconds; it never stops generation.

    Passed to ``model.generate(stopping_criteria=...)``, which calls it once per new token.
    """

    def __init__(self, *, batch: int, batches: int, prompt_width: int, max_new_tokens: int,
                 every_s: float | None = None):
        self.batch, self.batches = batch, batches
        self.prompt_width, self.max_new_tokens = prompt_width, max_new_tokens
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.started = self.last = time.monotonic()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            done = input_ids.shape[1] - self.prompt_width
            logger.info("Generating: batch %d/%d, %d/%d new tokens (%.0f s)", self.batch, self.batches, done,
                        self.max_new_tokens, now - self.started)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
