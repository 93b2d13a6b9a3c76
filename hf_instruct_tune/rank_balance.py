"""Data-parallel steps shared out by work: every process gets an equal share of a step's work, not only of its rows.

Under DDP (or FSDP) each process trains on its own micro-batches and the gradients are averaged once per
optimizer step, so a step lasts as long as its slowest process. transformers deals a step's rows out in the
sampler's order, ``batch_size`` consecutive rows per micro-batch, and one process can draw the long rows.

:class:`BalancedBatchSampler` keeps each step's set of rows (the sampler's shuffled order cut into global
batches of ``batch_size x grad_accum x processes`` rows, as before) and changes only which process and
micro-batch trains each row: longest first, a row goes to the least-loaded process with room left, then to that
process's least-loaded micro-batch. Every process computes the same plan from the same order (the sampler is
seeded alike on all of them), so nothing is exchanged, and accelerate deals the batches out as usual.

The work of a row of ``T`` tokens is ``T + T**2 / attention_tokens``: the linear layers, plus attention
(see :func:`~hf_instruct_tune.prefix_sharing.sharing_pays`). The loss and gradients do not change: transformers
divides each step's summed token losses by the supervised tokens of all its micro-batches on all processes
(``average_tokens_across_devices``), whichever process holds which row.
"""

from __future__ import annotations

import copy
import heapq
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


def row_costs(lengths: Sequence[int], attention_tokens: int) -> list[float]:
    """The work of each row: ``T + T**2 / attention_tokens`` for ``T`` tokens."""
    return [n + n * n / attention_tokens for n in lengths]


def fill_least_loaded(costs: Sequence[float], capacities: Sequence[int]) -> list[list[int]]:
    """Positions ``0..len(costs)-1`` put into ``len(capacities)`` bins of at most that many positions each.

    Largest cost first (ties: the earlier position), each position goes to the bin with the least cost so far
    among those with room (ties: the lower bin). Each bin lists its positions in ascending order. The result
    depends only on the arguments, so every process computes the same one.
    """
    if sum(capacities) < len(costs):
        raise ValueError(f"{len(costs)} rows do not fit bins of {list(capacities)} rows.")
    bins: list[list[int]] = [[] for _ in capacities]
    open_bins = [(0.0, b) for b, room in enumerate(capacities) if room > 0]
    heapq.heapify(open_bins)
    for position in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, b = heapq.heappop(open_bins)
        bins[b].append(position)
        if len(bins[b]) < capacities[b]:
            heapq.heappush(open_bins, (load + costs[position], b))
    return [sorted(positions) for positions in bins]


def even_split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` counts that differ by at most one, the larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass
class Balance:
    """How evenly the first epoch's steps share their work between the processes (cost model, not timing)."""

    steps: int
    processes: int
    balanced: float
    """Summed over steps, the busiest process's work over the mean process's: 1.0 is perfect."""
    in_order: float
    """The same for the rows dealt out in order, ``batch_size`` consecutive rows per micro-batch."""

    def describe(self) -> str:
        return (f"Rank balance: each step's rows shared out by work between {self.processes} processes; the busiest "
                f"does {self.balanced:.2f}x the mean work ({self.in_order:.2f}x dealt out in order), "
                f"over the first epoch's {self.steps} steps")


class BalancedBatchSampler:
    """A batch sampler for accelerate's ``BatchSamplerShard``: batch ``k * processes + r`` is process ``r``'s
    micro-batch ``k`` of a step, as when transformers deals consecutive batches out, but with each step's rows
    placed by :func:`fill_least_loaded`.

    Args:
        sampler: the Trainer's row order (a seeded ``RandomSampler``, the same on every process).
        costs: the work of each row of the dataset (:func:`row_costs`).
        batch_size: rows per micro-batch and process.
        grad_accum: micro-batches per optimizer step.
        num_processes: data-parallel processes.
        drop_last: drop the rows that do not fill ``batch_size`` rows on every process, as the
            Trainer's ``dataloader_drop_last`` does.
        report: log the first epoch's :class:`Balance` once (see :meth:`report_ahead`).

    Each full step gives every process ``grad_accum`` micro-batches of ``batch_size`` rows. A last, smaller step
    keeps every row once: its micro-batches per process are as few as hold them (all of a step's rows on a
    process differ by at most one between processes). Only a last step of fewer rows than processes is dealt
    out as it comes, one row per batch, and accelerate then repeats rows from the epoch's start, as it does
    by default.
    """

    batch_size = None  # batches of a last step vary: accelerate must not wait for full ones

    def __init__(self, sampler: Any, costs: Sequence[float], *, batch_size: int, grad_accum: int,
                 num_processes: int, drop_last: bool = False, report: bool = False):
        if min(batch_size, grad_accum, num_processes) < 1:
            raise ValueError(f"`batch_size`, `grad_accum` and `num_processes` should be at least 1, got "
                             f"{batch_size}, {grad_accum} and {num_processes}.")
        self.sampler = sampler
        self.costs = costs
        self.rows_per_batch = batch_size
        self.grad_accum = grad_accum
        self.num_processes = num_processes
        self.drop_last = drop_last
        self.report = report

    @property
    def step_rows(self) -> int:
        return self.rows_per_batch * self.grad_accum * self.num_processes

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        rows = len(self.sampler)
        full, tail = divmod(rows, self.step_rows)
        return full * self.grad_accum * self.num_processes + self._tail_batches(tail)

    def __iter__(self) -> Iterator[list[int]]:
        steps, plans = self.plan_epoch(list(self.sampler))
        if self.report:
            self.report = False
            logger.info(self.measure(steps, plans).describe())
        for plan in plans:
            yield from plan

    def report_ahead(self) -> None:
        """Log the coming epoch's balance now, before training starts, when the sampler is accelerate's seeded one
        (it reseeds on every pass, so a copy gives the same order); else it is logged when the epoch starts."""
        from accelerate.data_loader import SeedableRandomSampler

        if self.report and isinstance(self.sampler, SeedableRandomSampler):
            self.report = False
            logger.info(self.measure(*self.plan_epoch(list(copy.copy(self.sampler)))).describe())

    def plan_epoch(self, order: list[int]) -> tuple[list[list[int]], list[list[list[int]]]]:
        """The rows of each step of ``order`` and each step's batches (:meth:`plan_step`)."""
        steps = [order[start:start + self.step_rows] for start in range(0, len(order), self.step_rows)]
        return steps, [self.plan_step(rows) for rows in steps]

    def plan_step(self, rows: Sequence[int]) -> list[list[int]]:
        """One step's batches in the order accelerate deals them: micro-batch 0 of every process, then 1, ..."""
        n, b = self.num_processes, self.rows_per_batch
        if self.drop_last:
            rows = rows[:len(rows) - len(rows) % (n * b)]
        if not rows:
            return []
        if len(rows) < n:
            return [[row] for row in rows]
        micro = self._micro_batches(len(rows))
        costs = [self.costs[row] for row in rows]
        per_process = fill_least_loaded(costs, even_split(len(rows), n))
        slots = []
        for positions in per_process:
            batches = fill_least_loaded([costs[p] for p in positions], even_split(len(positions), micro))
            slots.append([[rows[positions[i]] for i in batch] for batch in batches])
        return [slots[r][k] for k in range(micro) for r in range(n)]

    def _micro_batches(self, rows: int) -> int:
        """Micro-batches per process for a step of ``rows``: ``grad_accum`` when full, else as few as hold them,
        and never more than the rows each process gets."""
        n, b = self.num_processes, self.rows_per_batch
        return max(1, min(self.grad_accum, -(-rows // (n * b)), rows // n))

    def _tail_batches(self, rows: int) -> int:
        if self.drop_last:
            rows -= rows % (self.num_processes * self.rows_per_batch)
        if rows == 0:
            return 0
        if rows < self.num_processes:
            return rows
        return self._micro_batches(rows) * self.num_processes

    def measure(self, steps: list[list[int]], plans: list[list[list[int]]]) -> Balance:
        """How even the work of ``plans`` is, against the same ``steps`` dealt out in order."""
        n, b = self.num_processes, self.rows_per_batch
        busiest = busiest_in_order = total = 0.0
        for rows, plan in zip(steps, plans):
            balanced = [0.0] * n
            for index, batch in enumerate(plan):
                balanced[index % n] += sum(self.costs[row] for row in batch)
            in_order = [0.0] * n
            for index, start in enumerate(range(0, len(rows), b)):
                in_order[index % n] += sum(self.costs[row] for row in rows[start:start + b])
            busiest += max(balanced)
            busiest_in_order += max(in_order)
            total += sum(balanced) / n
        return Balance(steps=len(steps), processes=n, balanced=busiest / total if total else 1.0,
                       in_order=busiest_in_order / total if total else 1.0)


def balance_loader(loader: Any, lengths: Sequence[int], *, attention_tokens: int, batch_size: int, grad_accum: int,
                   report: bool = False) -> BalancedBatchSampler | None:
    """Make the Trainer's prepared training ``loader`` deal each step's rows out by work, in place.

    ``loader`` is what ``Trainer.get_train_dataloader`` returns under several processes: accelerate's
    ``DataLoaderShard`` over a ``BatchSamplerShard`` of a plain ``BatchSampler``. Its sampler (the seeded
    order), its collator and its workers stay; only the batch sampler inside the shard is replaced. Returns the
    new batch sampler, or None where the loader is laid out otherwise (one process, an iterable dataset,
    ``split_batches``, ``dispatch_batches``, a custom sampler): that loader is left as it is.
    """
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    shard = getattr(loader, "batch_sampler", None)
    if not isinstance(shard, BatchSamplerShard) or shard.split_batches or shard.num_processes < 2:
        return None
    inner = shard.batch_sampler
    if type(inner) is not BatchSampler or inner.batch_size != batch_size:
        return None
    sampler = inner.sampler
    if len(sampler) != len(lengths):
        return None
    balanced = BalancedBatchSampler(sampler, row_costs(lengths, attention_tokens), batch_size=batch_size,
                                    grad_accum=grad_accum, num_processes=shard.num_processes,
                                    drop_last=inner.drop_last, report=report)
    shard.batch_sampler = balanced
    shard.batch_size = None
    balanced.report_ahead()
    return balanced
