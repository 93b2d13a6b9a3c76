"""Real tokens per second of a training run (non-padding tokens over the wall time of the optimizer steps), and
the peak GPU memory of training."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

WARM_STEPS = 5
"""Steps left out of the measurement (compilation, allocator growth, the first optimizer step), at most half."""
RECORDED_STEPS = 1_000
"""The per-step records (:meth:`Throughput.step_seconds` and the like) cover the run's first this many steps."""


class Throughput(TrainerCallback):
    """Counts the tokens the trainer feeds the model and stamps each optimizer step's end.

    :meth:`tokens_per_second` is this process's rate over the steps after the first :data:`WARM_STEPS` (at most
    half of the run). On a GPU a stamp is a CUDA event recorded after the step's kernels, read when the rate is
    asked for: the CPU never waits for the GPU to stamp a step, and goes on queueing the next one while the GPU
    finishes this one. The per-step peak memory is the caching allocator's, counted as the work is queued.
    """

    def __init__(self):
        self.tokens = 0
        self.stamps: list[tuple[float, int]] = []
        self.step_peaks: list[int] = []
        """Each recorded step's peak GPU bytes (empty on CPU)."""
        self.peak = 0
        self._events: list[tuple[Any, int]] = []  # GPU stamps not yet read: the first RECORDED_STEPS, and the last
        self._origin: Any = None  # the GPU stamp of training's start

    def count(self, inputs) -> None:
        """Add the real tokens of one micro-batch: the tokens its rows hold (a prefix-shared batch computes fewer),
        the attention mask's ones, or every token of a packed row."""
        mask = inputs.get("attention_mask")
        ids = inputs.get("input_ids")
        if "row_tokens" in inputs:
            self.tokens += int(inputs["row_tokens"])
        elif mask is not None and mask.dim() == 2:
            self.tokens += int(mask.sum())
        elif ids is not None:
            self.tokens += ids.numel()

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():  # the peak of training, not of loading the model
            torch.cuda.reset_peak_memory_stats()
            if self._origin is None:  # one time line for every train() of the trainer
                self._origin = _recorded_event()

    def peak_memory_gib(self) -> float | None:
        """The most GPU memory this process's tensors held since training began, in GiB (None on CPU)."""
        import torch

        if not torch.cuda.is_available():
            return None
        return max(self.peak, torch.cuda.max_memory_allocated()) / 2**30

    def timed_tokens(self) -> int:
        """The tokens of the steps :meth:`tokens_per_second` measures."""
        self._read_events()
        if len(self.stamps) < 2:
            return 0
        skip = min(WARM_STEPS, len(self.stamps) // 2) - 1
        return self.stamps[-1][1] - self.stamps[max(skip, 0)][1]

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if not torch.cuda.is_available() or self._origin is None:
            self.stamps.append((time.perf_counter(), self.tokens))
            return
        peak = torch.cuda.max_memory_allocated()
        self.peak = max(self.peak, peak)
        if len(self.step_peaks) < RECORDED_STEPS:
            self.step_peaks.append(peak)
        torch.cuda.reset_peak_memory_stats()
        self._events.append((_recorded_event(), self.tokens))
        if len(self._events) > RECORDED_STEPS + 1:  # past the recorded steps only the last stamp is needed
            del self._events[-2]

    def _read_events(self) -> None:
        """Turn the GPU stamps into seconds since training began (waits for the last one's step to finish)."""
        if not self._events:
            return
        self._events[-1][0].synchronize()
        self.stamps.extend((self._origin.elapsed_time(event) / 1e3, tokens) for event, tokens in self._events)
        self._events.clear()

    def step_tokens(self) -> list[int]:
        """Each recorded optimizer step's real tokens."""
        self._read_events()
        stamps = self.stamps[:RECORDED_STEPS]
        return [after - before for (_, before), (_, after) in zip([(0.0, 0), *stamps], stamps)]

    def step_peak_gib(self) -> list[float]:
        """Each recorded optimizer step's peak GPU memory in GiB (empty on CPU)."""
        return [round(peak / 2**30, 3) for peak in self.step_peaks]

    def step_seconds(self) -> list[float]:
        """Each recorded optimizer step's wall time after the first, in seconds (a slow step among fast ones shows
        here)."""
        self._read_events()
        stamps = self.stamps[:RECORDED_STEPS]
        return [round(end - start, 3) for (start, _), (end, _) in zip(stamps, stamps[1:])]

    def tokens_per_second(self) -> float | None:
        """This process's real tokens per second after the warm-up steps; None with fewer than two steps."""
        self._read_events()
        if len(self.stamps) < 2:
            return None
        skip = min(WARM_STEPS, len(self.stamps) // 2) - 1
        (start, tokens_before), (end, tokens_after) = self.stamps[max(skip, 0)], self.stamps[-1]
        return (tokens_after - tokens_before) / (end - start) if end > start else None


def _recorded_event():
    """A CUDA timing event recorded on the current stream now."""
    import torch

    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event
