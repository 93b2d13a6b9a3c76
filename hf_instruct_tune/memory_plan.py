"""The memory plan: how to run each optimizer step within a memory budget, as fast as it fits.

The rows of one optimizer step (``--batch-size`` x ``--grad-accum`` x processes, the *global batch*) are
fixed by the user; how they are cut into micro-batches is not, and neither is what is traded for memory.
:func:`plan_memory` picks, from the budget (the GPU's free memory, or ``--max-memory`` GiB):

1. the micro-batch: the most rows per forward pass that fit with every memory saving on (fewer, larger
   micro-batches are much faster: the per-micro-batch cost of a 4-bit model is mostly fixed); in one process
   the longest few micro-batches (:data:`SPLIT_SHARE`) may pass the budget, and the trainer runs them in parts;
2. where the frozen input-embedding table lives: on the GPU when that micro-batch fits so, else in CPU memory;
3. how many decoder layers recompute their activations in backward: as few as fit, for each micro-batch by its
   own tokens (packed micro-batches of the same rows vary in length; the largest the run should meet sets the
   most, a shorter one recomputes fewer);
4. the loss kernel: plain logits when they fit, else the fused cross-entropy (no ``[tokens, vocab]`` logits):
   Cut Cross-Entropy where it is installed, else the chunked loss (:data:`AUTO_LOSS_KERNELS`); or the one given;
5. for a 4-bit base, with all of the above at its fastest and memory still to spare: its weights dequantized
   once and kept in bf16 (:mod:`~hf_instruct_tune.dequantized_base`), no dequantization in the steps.

None of these changes the loss or the gradients: the loss of a step is normalized by the supervised tokens
of the whole step whatever the micro-batches, checkpointing recomputes the same values, the fused loss is the
same cross-entropy, and the kept bf16 weights are the ones each step would dequantize. The estimate is calibrated
on the peaks that ``train`` measured for a Llama-3-8B QLoRA step on an H200 (``BENCHMARKS.md``, "GPU"): within
6% of each at the mean micro-batch, and above each at the plan's larger-than-mean micro-batch.

Without a GPU and without ``--max-memory``, nothing is planned: the batch runs as given.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

GIB = 2**30
_FREE_MEMORY_SHARE = 0.92  # of the GPU memory this process can use: room for fragmentation and cuBLAS workspaces
_OVERHEAD_BYTES = GIB // 4  # kernels' workspaces, the optimizer step's temporaries
_MAX_DRAWS = 20_000  # micro-batches drawn to find a run's largest
_PLAIN_LOSS_BYTES = 2.5  # per token and vocabulary entry, above the layers' activations (fitted on an H200's steps)
_FUSED_LOSS_BYTES = 16  # the same, for one chunk of tokens on the chunked path (none with Cut Cross-Entropy)
_CHUNK_TOKENS = 1024

LOSS_KERNELS = ("plain", "chunked", "cce")
"""Plain logits, the chunked fused loss (one chunk's fp32 logits alive), Cut Cross-Entropy (no logits)."""
AUTO_LOSS_KERNELS = ("plain", "fused")
"""The kernels the plan tries, in this order, when none is given: the first that fits, else the last. ``"fused"``
is Cut Cross-Entropy where it is available, else the chunked loss."""
SPLIT_SHARE = 0.05
"""Where the trainer can run a micro-batch in parts, the plan sizes micro-batches so that about this share of
them is longer than the budget holds and runs in parts (each part is a forward and backward pass of its own)."""
_COMPILED_LAYER_SHARE = 0.8  # of an eager layer's activations, what a compiled one keeps for backward (0.75 measured)
_KEPT_PER_TOKEN = (9.3, 4.2)  # bf16 values an eager layer keeps for backward per token: x hidden, x MLP width
_KEPT_PER_TOKEN_LIGER = (7.3, 3.2)  # Liger's norms keep their bf16 input, not an fp32 copy; its SwiGLU no activation


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a decoder-only model."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    weight_bytes: int
    """Bytes of every parameter and buffer of the frozen model (4-bit weights count as stored)."""
    embedding_bytes: int
    """Bytes of the input-embedding table."""
    trainable_params: int
    quantized_bytes: int = 0
    """Bytes of the 4-bit weights in integer storage, part of ``weight_bytes``. FSDP leaves them whole on every
    GPU (accelerate keeps ``uint8`` bitsandbytes weights out of sharding: sharded, they lose their quantization
    state)."""
    adapter_bytes_per_param: int = 16
    """The adapter's weight, gradient and two Adam moments: 16 bytes in fp32; 8 on a quantized base, where
    ``SFTTrainer`` keeps the adapter in bf16."""
    dequantized_bytes: int = 0
    """Bytes of the 4-bit projections' weights dequantized
    (:func:`~hf_instruct_tune.dequantized_base.dequantized_bytes`)."""

    @classmethod
    def of(cls, model, trainable_params: int | None = None) -> ModelShape:
        """Read the shape of ``model`` (a transformers model, possibly wrapped by PEFT)."""
        config = model.config
        text = getattr(config, "get_text_config", lambda: config)()
        weights = sum(t.numel() * t.element_size() for t in _tensors(model))
        quantized = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_floating_point())
        embeddings = model.get_input_embeddings()
        table = getattr(embeddings, "weight", None)
        if table is None:
            table = getattr(embeddings, "table", None)
        embedding_bytes = table.numel() * table.element_size() if table is not None else 0
        if table is not None and not any(table is p for p in model.parameters()):  # already in CPU memory
            weights += embedding_bytes
        if trainable_params is None:
            trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        from .dequantized_base import dequantized_bytes

        hidden = text.hidden_size
        return cls(layers=text.num_hidden_layers, hidden=hidden,
                   intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
                   vocab=text.vocab_size, weight_bytes=weights, embedding_bytes=embedding_bytes,
                   trainable_params=trainable_params, quantized_bytes=quantized,
                   adapter_bytes_per_param=8 if quantized else 16, dequantized_bytes=dequantized_bytes(model))

    def sharded(self, processes: int, gathered_layers: int | None = None) -> ModelShape:
        """One process's share under FSDP over ``processes``: the sharded weights and the adapter divided among
        them, plus ``gathered_layers`` decoder layers gathered whole (the one computing and those prefetched:
        :func:`~hf_instruct_tune.fsdp_prefetch.prefetch_depth`; by default one plus the default depth). The 4-bit
        weights (``quantized_bytes``) are not sharded: every process holds all of them."""
        if processes <= 1:
            return self
        if gathered_layers is None:
            from .fsdp_prefetch import DEFAULT_DEPTH

            gathered_layers = 1 + DEFAULT_DEPTH
        sharded_bytes = self.weight_bytes - self.quantized_bytes
        layer_bytes = (sharded_bytes - self.embedding_bytes) / self.layers  # the output head spread over layers
        return dataclasses.replace(
            self, weight_bytes=int(self.quantized_bytes + sharded_bytes / processes + gathered_layers * layer_bytes),
            embedding_bytes=self.embedding_bytes // processes,
            trainable_params=math.ceil(self.trainable_params / processes))


@dataclass(frozen=True)
class MemoryPlan:
    """How each optimizer step runs: micro-batches, recomputed layers, loss kernel, embeddings' place."""

    rows_per_step: int
    """The global batch: rows per optimizer step over all processes."""
    processes: int
    micro_batch: int
    """Rows per forward pass on each process."""
    grad_accum: int
    checkpointed_layers: int
    layers: int
    fused_loss: bool
    embeddings_on_cpu: bool
    budget_gib: float | None
    estimate_gib: float | None
    budget_source: str
    """``"--max-memory"``, ``"free GPU memory"``, or ``"none"`` (nothing planned)."""
    compiled_layers: bool = False
    """The estimate is for compiled decoder layers (``compile_layers``), which keep less for backward."""
    liger_layers: bool = False
    """The estimate is for layers running Liger's kernels (``liger_kernels``), which keep less for backward."""
    loss_kernel: str | None = None
    """One of :data:`LOSS_KERNELS`; None: the fused loss's own choice when ``fused_loss``, else plain."""
    micro_batch_tokens: int | None = None
    """Tokens in the largest micro-batch the run should meet (:func:`micro_batch_tokens`); None when unplanned."""
    tokens_within_budget: tuple[int, ...] | None = None
    """Per micro-batch checkpointing: entry ``c`` is the most tokens a micro-batch may hold with its first ``c``
    layers recomputed and still fit the budget. ``checkpointed_layers`` is the count at the largest micro-batch;
    a smaller one recomputes fewer (:meth:`layers_to_checkpoint`). None: every micro-batch recomputes
    ``checkpointed_layers`` (checkpointing fixed by the user, or nothing planned)."""

    split_above_tokens: int | None = None
    """A micro-batch with more tokens runs in parts of at most this many (the most that fit the budget with the
    most layers recomputed); None: micro-batches run whole."""
    dequantized_base: bool = False
    """The 4-bit base's weights are dequantized once and kept in bf16 (:mod:`~hf_instruct_tune.dequantized_base`)."""

    def layers_to_checkpoint(self, tokens: int) -> int:
        """The decoder layers a micro-batch of ``tokens`` tokens recomputes: as few as fit the budget."""
        if self.tokens_within_budget is None:
            return self.checkpointed_layers
        return next((count for count, most in enumerate(self.tokens_within_budget) if tokens <= most), self.layers)

    @property
    def fits(self) -> bool:
        return self.budget_gib is None or self.estimate_gib is None or self.estimate_gib <= self.budget_gib

    def describe(self) -> str:
        """The one line the trainer logs."""
        loss = "fused cross-entropy" if self.fused_loss else "plain logits"
        if self.fused_loss and self.loss_kernel:
            loss += f" ({self.loss_kernel})"
        where = "CPU" if self.embeddings_on_cpu else "device"
        compiled = " (compiled)" if self.compiled_layers else " (Liger kernels)" if self.liger_layers else ""
        checkpointed = f"{self.checkpointed_layers}/{self.layers} layers checkpointed{compiled}"
        if self.tokens_within_budget is not None and self.checkpointed_layers > 0:
            checkpointed += " at the largest micro-batch, fewer at shorter ones"
        if self.budget_gib is None:
            memory = "no budget (CPU): the batch runs as given"
        else:
            memory = f"estimated peak {self.estimate_gib:.1f} of {self.budget_gib:.1f} GiB ({self.budget_source})"
            if not self.fits:
                memory += ": does not fit even so, expect an out-of-memory error"
        split = ""
        if self.split_above_tokens and (self.micro_batch_tokens or 0) > self.split_above_tokens:
            split = f" (one over {self.split_above_tokens:,} tokens runs in parts)"
        base = "; 4-bit base dequantized once (bf16 copy kept)" if self.dequantized_base else ""
        return (f"Memory plan: {self.rows_per_step} rows per optimizer step = {self.micro_batch} per micro-batch x "
                f"{self.grad_accum} accumulated x {self.processes} process{'es' if self.processes > 1 else ''}"
                f"{split}; {checkpointed}; loss: {loss}; input embeddings on {where}{base}; {memory}")


@dataclass(frozen=True)
class Fixed:
    """Choices the user made explicitly; the plan keeps them. ``None``: the plan decides."""

    checkpointing: bool | None = None
    fused_loss: bool | None = None
    embeddings_on_cpu: bool | None = None
    loss_kernel: str | None = None
    """One of :data:`LOSS_KERNELS` (it decides ``fused_loss``)."""
    dequantized_base: bool | None = None
    """Keep a 4-bit base dequantized (True), never (False), or when it fits with nothing else traded (None)."""


def plan_memory(
    shape: ModelShape,
    *,
    rows_per_process: int,
    processes: int,
    row_lengths: Sequence[int],
    packed: bool,
    budget_gib: float | None,
    budget_source: str = "--max-memory",
    fixed: Fixed = Fixed(),
    given_micro_batch: int | None = None,
    can_offload_embeddings: bool = True,
    compiled_layers: bool = False,
    liger_layers: bool = False,
    optimizer_steps: int = 4,
    can_split: bool = False,
    can_dequantize: bool = False,
) -> MemoryPlan:
    """Plan one process's share of each optimizer step (``rows_per_process`` rows) within ``budget_gib``.

    Args:
        shape: the model, from :meth:`ModelShape.of`.
        rows_per_process: ``batch_size x grad_accum``: the rows each process handles per optimizer step.
        processes: the number of processes (data-parallel ranks).
        row_lengths: token lengths of the training rows (a sample is enough).
        packed: micro-batches are packed into one row (tokens = the sum of lengths) rather than padded
            (tokens = rows x the longest).
        budget_gib: the peak memory allowed, or ``None`` to plan nothing (the batch runs as given).
        fixed: what the user set explicitly.
        given_micro_batch: the user's ``batch_size``, kept when ``budget_gib`` is ``None``.
        can_offload_embeddings: the table can move to CPU memory (a GPU run with a frozen table).
        compiled_layers: the decoder layers will be compiled (they keep less for backward).
        liger_layers: the decoder layers will run Liger's kernels (they keep less for backward).
        optimizer_steps: the run's optimizer steps: a longer run (or one over more processes) meets a larger
            micro-batch, which the budget must hold too.
        can_split: the trainer can run a micro-batch in parts (:mod:`~hf_instruct_tune.micro_batch_split`; one
            process only): the rows per micro-batch then need to hold all but the longest :data:`SPLIT_SHARE` of
            the micro-batches within the budget, and those run in parts (:attr:`MemoryPlan.split_above_tokens`).
        can_dequantize: a 4-bit base may be kept dequantized when it fits (``fixed.dequantized_base`` None).
    """
    layers = shape.layers
    kernels = _loss_kernels(fixed)
    dequantized = bool(fixed.dequantized_base and shape.dequantized_bytes)
    if budget_gib is None:
        micro = given_micro_batch or rows_per_process
        kernel = kernels[0] if fixed.loss_kernel or fixed.fused_loss is not None else "plain"
        return MemoryPlan(rows_per_process * processes, processes, micro, rows_per_process // micro,
                          layers if fixed.checkpointing else 0, layers, kernel != "plain",
                          bool(fixed.embeddings_on_cpu), None, None, "none", compiled_layers, liger_layers, kernel,
                          dequantized_base=dequantized)
    budget = budget_gib * GIB
    lean_loss = kernels[-1]
    lean_embeddings = (can_offload_embeddings if fixed.embeddings_on_cpu is None else fixed.embeddings_on_cpu)
    checkpoint_choices = ([layers] if fixed.checkpointing else [0] if fixed.checkpointing is False
                          else list(range(layers + 1)))
    most_checkpointed = max(checkpoint_choices)

    def tokens_cost(tokens: int, checkpointed: int, kernel: str, on_cpu: bool) -> float:
        return estimate_bytes(shape, tokens=tokens, checkpointed_layers=checkpointed, fused_loss=kernel != "plain",
                              embeddings_on_cpu=on_cpu, compiled_layers=compiled_layers, liger_layers=liger_layers,
                              loss_kernel=kernel, dequantized_base=dequantized)

    largest: dict[tuple[int, int], int] = {}

    def largest_tokens(micro: int, runs: int) -> int:
        """The largest micro-batch of ``micro`` rows in ``runs`` runs' worth (every process's micro-batches)."""
        if (micro, runs) not in largest:
            micro_batches = optimizer_steps * (rows_per_process // micro) * processes
            largest[micro, runs] = micro_batch_tokens(row_lengths, micro, packed, micro_batches, runs=runs)
        return largest[micro, runs]

    # with splitting, a micro-batch over what fits with every saving on runs in parts: the rows per micro-batch
    # need only hold all but the longest few micro-batches (SPLIT_SHARE), and the rest of the plan the largest
    # that is not split
    leanest_fit = _most_tokens(lambda tokens: tokens_cost(tokens, most_checkpointed, lean_loss, lean_embeddings)
                               <= budget) if can_split else 0

    unsplit: dict[int, int] = {}

    def planned_tokens(micro: int) -> int:
        if not can_split:
            return largest_tokens(micro, 4)
        if micro not in unsplit:
            unsplit[micro] = micro_batch_quantile(row_lengths, micro, packed, 1 - SPLIT_SHARE)
        return min(largest_tokens(micro, 4), max(unsplit[micro], leanest_fit))

    def cost(micro: int, checkpointed: int, kernel: str, on_cpu: bool) -> float:
        return tokens_cost(planned_tokens(micro), checkpointed, kernel, on_cpu)

    divisors = [d for d in range(rows_per_process, 0, -1) if rows_per_process % d == 0]
    micro = next((d for d in divisors if cost(d, most_checkpointed, lean_loss, lean_embeddings) <= budget), 1)
    on_cpu = lean_embeddings
    if fixed.embeddings_on_cpu is None and on_cpu and cost(micro, most_checkpointed, lean_loss, False) <= budget:
        on_cpu = False
    checkpointed = next((c for c in sorted(checkpoint_choices) if cost(micro, c, lean_loss, on_cpu) <= budget),
                        most_checkpointed)
    kernel = next((k for k in kernels if cost(micro, checkpointed, k, on_cpu) <= budget), lean_loss)
    estimate = cost(micro, checkpointed, kernel, on_cpu)
    if (fixed.dequantized_base is None and can_dequantize and shape.dequantized_bytes and checkpointed == 0
            and kernel == "plain" and not on_cpu and estimate + shape.dequantized_bytes <= budget):
        dequantized = True  # nothing else is traded for memory, and the kept weights fit too
        estimate = cost(micro, checkpointed, kernel, on_cpu)
    within = None
    if len(checkpoint_choices) > 1:  # the plan chooses the checkpointed layers: per micro-batch
        within = tuple(_most_tokens(lambda tokens, c=count: tokens_cost(tokens, c, kernel, on_cpu) <= budget)
                       for count in range(layers + 1))
    split_above = None
    if can_split:  # what fits with the most layers recomputed: the per micro-batch limits hold it already
        split_above = within[most_checkpointed] if within else _most_tokens(
            lambda tokens: tokens_cost(tokens, most_checkpointed, kernel, on_cpu) <= budget)
    return MemoryPlan(rows_per_process * processes, processes, micro, rows_per_process // micro, checkpointed,
                      layers, kernel != "plain", on_cpu, budget_gib, estimate / GIB, budget_source, compiled_layers,
                      liger_layers, kernel, largest_tokens(micro, 4), within, split_above or None, dequantized)


def _most_tokens(fits, upper: int = 1 << 24) -> int:
    """The largest token count for which ``fits(tokens)`` holds (0 if none; ``fits`` holds up to a point)."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _loss_kernels(fixed: Fixed) -> tuple[str, ...]:
    """The loss kernels the plan may choose, in the order it tries them."""
    fused = "cce" if _cut_cross_entropy() else "chunked"
    if fixed.loss_kernel:
        return (fixed.loss_kernel,)
    if fixed.fused_loss is not None:
        return (fused,) if fixed.fused_loss else ("plain",)
    return tuple(dict.fromkeys(fused if k == "fused" else k for k in AUTO_LOSS_KERNELS))


def micro_batch_tokens(row_lengths: Sequence[int], rows: int, packed: bool, micro_batches: int = 16,
                       runs: int = 4) -> int:
    """Tokens in the largest micro-batch of ``rows`` rows that a run of ``micro_batches`` micro-batches should meet.

    Padded: ``rows`` x the longest row. Packed: the largest of ``runs`` runs' worth of micro-batches drawn from
    ``row_lengths`` as a shuffling sampler draws them (seeded, so a plan is reproducible). A budget has to hold for
    the run's largest micro-batch, not its average one, and a longer run meets a larger one.
    """
    lengths = list(row_lengths) or [1]
    if not packed:
        return rows * max(lengths)
    if rows >= len(lengths):  # more rows than the sample: every row, and the longest again for the rest
        return sum(lengths) + (rows - len(lengths)) * max(lengths)
    draws = min(runs * max(micro_batches, 1), _MAX_DRAWS)
    largest = 0
    for groups in _sampler_passes(lengths, rows):
        for group in groups[:draws]:
            largest = max(largest, sum(group))
        draws -= len(groups)
        if draws <= 0:
            return largest


def micro_batch_quantile(row_lengths: Sequence[int], rows: int, packed: bool, share: float,
                         draws: int = 2_000) -> int:
    """Tokens that ``share`` of the micro-batches of ``rows`` rows stay within (drawn as a shuffling sampler
    draws them, seeded). Padded: ``rows`` x each micro-batch's longest row."""
    lengths = list(row_lengths) or [1]
    if rows >= len(lengths):
        return micro_batch_tokens(lengths, rows, packed)
    drawn: list[int] = []
    for groups in _sampler_passes(lengths, rows):
        drawn.extend(sum(group) if packed else rows * max(group) for group in groups)
        if len(drawn) >= draws:
            break
    drawn.sort()
    return drawn[min(len(drawn) - 1, math.ceil(share * len(drawn)) - 1)]


def _sampler_passes(lengths: list[int], rows: int):
    """Passes over ``lengths`` as a shuffling sampler makes them (seeded, endless): each pass the micro-batches of
    ``rows`` rows it cuts, the rows left over dropped."""
    rng = random.Random(0)
    while True:
        rng.shuffle(lengths)
        yield [lengths[start:start + rows] for start in range(0, len(lengths) - rows + 1, rows)]


def estimate_bytes(shape: ModelShape, *, tokens: int, checkpointed_layers: int, fused_loss: bool,
                   embeddings_on_cpu: bool, compiled_layers: bool = False, liger_layers: bool = False,
                   loss_kernel: str | None = None, dequantized_base: bool = False) -> float:
    """Peak bytes of one training step on ``tokens`` tokens per micro-batch (bf16 activations).

    Compiled layers (``compiled_layers``) that are not checkpointed keep a fifth less for backward (torch.compile
    recomputes cheap elementwise results instead of saving them; a quarter less was measured on Llama-3-8B).
    Layers running Liger's kernels (``liger_layers``) keep each norm's input in bf16 rather than an fp32 copy, and
    the MLP's projections without their activation: two hidden-sized and one MLP-sized value less per token.
    A base kept dequantized (``dequantized_base``) adds its bf16 weights.
    """
    per_hidden, per_mlp = _KEPT_PER_TOKEN_LIGER if liger_layers else _KEPT_PER_TOKEN
    per_layer = tokens * 2 * (per_hidden * shape.hidden + per_mlp * shape.intermediate)  # a layer's saved tensors
    kept = (shape.layers - checkpointed_layers) * per_layer * (_COMPILED_LAYER_SHARE if compiled_layers else 1)
    checkpoints = checkpointed_layers * tokens * shape.hidden * 2 + (per_layer if checkpointed_layers else 0)
    loss = loss_bytes(shape, tokens, loss_kernel or (("cce" if _cut_cross_entropy() else "chunked") if fused_loss
                                                     else "plain"))
    weights = shape.weight_bytes - (shape.embedding_bytes if embeddings_on_cpu else 0)
    optimizer = shape.trainable_params * shape.adapter_bytes_per_param
    dequantized = shape.dequantized_bytes if dequantized_base else 0
    return weights + dequantized + optimizer + kept + checkpoints + loss + _OVERHEAD_BYTES


def loss_bytes(shape: ModelShape, tokens: int, kernel: str) -> float:
    """Peak bytes of the loss of ``tokens`` tokens with ``kernel`` (one of :data:`LOSS_KERNELS`)."""
    if kernel == "cce":  # the hidden states' bf16 copy and gradient
        return tokens * shape.hidden * 2 * 2
    if kernel == "chunked":  # one chunk's fp32 logits and their gradient, with their bf16 copies
        return min(tokens, _CHUNK_TOKENS) * shape.vocab * _FUSED_LOSS_BYTES
    return tokens * shape.vocab * _PLAIN_LOSS_BYTES


def gpu_budget_gib(device_index: int) -> float:
    """GiB this process may use on its GPU: what it already holds plus what is free, less a margin."""
    import torch

    free, _ = torch.cuda.mem_get_info(device_index)
    held = torch.cuda.memory_allocated(device_index)
    return _FREE_MEMORY_SHARE * (free + held) / GIB


def apply_checkpointing(model, layers: int) -> None:
    """Recompute the activations of the first ``layers`` decoder layers in backward (non-reentrant), none else."""
    base = unwrapped_model(model)
    decoder_layers = _decoder_layers(base)
    if layers <= 0:
        for layer in decoder_layers:
            layer.gradient_checkpointing = False
        return
    if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()  # as backends.add_lora does: the layers' inputs carry gradients
    for index, layer in enumerate(decoder_layers):
        layer.gradient_checkpointing = index < layers


class CheckpointSwitch:
    """Per micro-batch checkpointing (:attr:`MemoryPlan.tokens_within_budget`): before each training micro-batch,
    :meth:`set_for` makes the model's first :meth:`MemoryPlan.layers_to_checkpoint` decoder layers recompute their
    activations in backward and the others keep them. Recomputing gives the same values, so only memory and
    speed depend on it."""

    def __init__(self, model, plan: MemoryPlan):
        self.model = model
        self.plan = plan
        base = unwrapped_model(model)
        self.layers = _decoder_layers(base)
        self.enabled = plan.checkpointed_layers > 0
        self.current = plan.checkpointed_layers
        self.counts: dict[int, int] = {}
        """How many micro-batches ran with each count of checkpointed layers."""

    def set_for(self, inputs: dict) -> int:
        """Set the layers for the micro-batch ``inputs`` (its ``input_ids``); returns how many recompute."""
        from .micro_batch_split import micro_batch_tokens_of

        count = self.plan.layers_to_checkpoint(micro_batch_tokens_of(inputs))
        if count > 0 and not self.enabled:
            apply_checkpointing(self.model, count)
            self.enabled = True
        elif count != self.current:
            for index, layer in enumerate(self.layers):
                layer.gradient_checkpointing = index < count
        self.current = count
        self.counts[count] = self.counts.get(count, 0) + 1
        return count


def checkpointed_layer_count(model) -> int:
    """How many decoder layers of ``model`` recompute their activations in backward."""
    base = unwrapped_model(model)
    return sum(bool(layer.gradient_checkpointing) for layer in _decoder_layers(base))


def unwrapped_model(model):
    """``model`` itself, or the model a PEFT wrapper around it holds."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder_layers(model) -> list:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: all layers or none
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _tensors(model):
    yield from model.parameters()
    yield from model.buffers()


def _cut_cross_entropy() -> bool:
    from .loss import cce_available

    return cce_available()


def sampled_row_lengths(dataset, sample_rows: int = 10_000) -> list[int]:
    """The token counts of the first ``sample_rows`` rows of ``dataset`` (``input_ids`` rows)."""
    sample = dataset.select(range(min(len(dataset), sample_rows))) if hasattr(dataset, "select") else dataset
    return [len(ids) for ids in sample["input_ids"]]


def plan_for_trainer(model, args, dataset, *, packed: bool, peft_config=None, max_memory: float | None = None,
                     fixed: Fixed = Fixed(), row_lengths: list[int] | None = None,
                     compiled_layers: bool = False, liger_layers: bool = False,
                     can_split: bool = False, can_dequantize: bool = False) -> MemoryPlan:
    """The plan for a Trainer about to train ``model`` on ``dataset`` (``input_ids`` rows) with ``args``.

    ``can_split``: the trainer runs a micro-batch over the budget in parts (see :func:`plan_memory`).
    ``can_dequantize``: a 4-bit base may be kept dequantized (on a CUDA GPU only).

    The budget is ``max_memory`` GiB when given, else the free memory of this process's GPU, else none.
    ``row_lengths``: :func:`sampled_row_lengths` of ``dataset``, when already counted.
    """
    import torch

    from .launch import fsdp_launched, local_rank, world_size

    cuda = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
    if max_memory is not None:
        budget, source = max_memory, "--max-memory"
    elif cuda:
        budget, source = gpu_budget_gib(local_rank()), "free GPU memory"
    else:
        budget, source = None, "none"
    lengths = row_lengths if row_lengths is not None else sampled_row_lengths(dataset)
    shape = ModelShape.of(model, trainable_params=_trainable_params(model, peft_config))
    if fsdp_launched():
        from .fsdp_prefetch import prefetch_depth

        shape = shape.sharded(world_size(), gathered_layers=1 + prefetch_depth())
    if fixed.embeddings_on_cpu is None and _embeddings_in_cpu_memory(model):
        fixed = dataclasses.replace(fixed, embeddings_on_cpu=True)
    return plan_memory(
        shape, rows_per_process=args.per_device_train_batch_size * args.gradient_accumulation_steps,
        processes=world_size(), row_lengths=lengths, packed=packed,
        budget_gib=budget, budget_source=source, fixed=fixed, given_micro_batch=args.per_device_train_batch_size,
        can_offload_embeddings=cuda and not _embeddings_trainable(model, peft_config)
        and not getattr(model.config, "tie_word_embeddings", False), compiled_layers=compiled_layers,
        liger_layers=liger_layers, optimizer_steps=planned_optimizer_steps(args, len(dataset), world_size()),
        can_split=can_split, can_dequantize=can_dequantize and cuda)


def planned_optimizer_steps(args, rows: int, processes: int) -> int:
    """The optimizer steps the Trainer will take: ``max_steps``, else the epochs' worth of global batches."""
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(processes, 1)
    return max(1, math.ceil(args.num_train_epochs * rows / global_batch))


def _trainable_params(model, peft_config) -> int:
    """Trainable parameters once LoRA is applied: counted, or for ``peft_config`` estimated from its targets."""
    if peft_config is None or hasattr(model, "peft_config"):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    targets = peft_config.target_modules or ()
    rank = peft_config.r
    total = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        matched = targets == "all-linear" or (leaf in targets if not isinstance(targets, str) else leaf == targets)
        if matched and hasattr(module, "in_features") and hasattr(module, "out_features") and leaf != "lm_head":
            total += rank * (module.in_features + module.out_features)
    return total


def _embeddings_in_cpu_memory(model) -> bool:
    table = getattr(model.get_input_embeddings(), "table", None)
    return table is not None and table.device.type == "cpu" and not any(table is p for p in model.parameters())


def _embeddings_trainable(model, peft_config) -> bool:
    table = getattr(model.get_input_embeddings(), "weight", None)
    saved = set(getattr(peft_config, "modules_to_save", None) or ())
    return (table is not None and table.requires_grad) or "embed_tokens" in saved
