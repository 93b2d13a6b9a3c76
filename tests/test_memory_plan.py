"""The memory plan: what it picks at each budget, how close its estimate is, and that it never changes the loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import logged_losses, sentiment_rows, tiny_lora_trainer
from torch.testing import assert_close

from hf_instruct_tune.memory_plan import (GIB, Fixed, ModelShape, estimate_bytes, micro_batch_tokens,
                                          plan_memory)

# Llama-3-8B in NF4 with LoRA r=16 on every linear layer, as in BENCHMARKS.md "GPU"
LLAMA3_8B_NF4 = ModelShape(layers=32, hidden=4096, intermediate=14336, vocab=128256,
                           weight_bytes=int(5.4 * GIB), embedding_bytes=128256 * 4096 * 2,
                           trainable_params=41_943_040, adapter_bytes_per_param=8)  # the adapter in bf16
BENCH_STEP_TOKENS = 4205  # a 16-row packed micro-batch of the bench's rows, on average

# Each optimizer step's real tokens and peak GPU memory, measured by `train --load-in-4bit` on one H200
# (BENCHMARKS.md "GPU", the calibration lease; `results.step_tokens` and `results.step_peak_memory_gib` of each
# run's hf_instruct_tune.json): 16 steps of the bench's rows, 16 rows per micro-batch.
STEP_TOKENS = [3608, 3377, 3706, 3948, 4007, 5216, 4021, 3659, 4808, 3316, 3774, 4455, 3407, 6102, 4886, 4302]
# (layers checkpointed, fused loss, embeddings in CPU memory) -> each step's peak in GiB
STEP_PEAKS_GIB = {
    (32, True, True): [6.251, 6.301, 6.453, 6.565, 6.592, 7.181, 6.599, 6.431, 6.982, 6.273, 6.484, 6.809, 6.315,
                       7.614, 7.02, 6.734],
    (29, True, False): [8.536, 8.524, 8.809, 9.018, 9.069, 10.113, 9.081, 8.768, 9.76, 8.472, 8.867, 9.455, 8.55,
                        10.878, 9.828, 9.323],
    (6, True, False): [23.126, 22.18, 23.794, 24.982, 25.272, 31.204, 25.34, 23.564, 29.202, 21.881, 24.128, 27.47,
                       22.327, 35.552, 29.585, 26.719],
    (0, False, False): [26.962, 25.741, 27.702, 29.145, 29.497, 36.638, 29.581, 27.422, 34.23, 25.377, 28.108,
                        32.147, 25.92, 41.896, 34.691, 31.244],
}


@pytest.mark.parametrize("setting", sorted(STEP_PEAKS_GIB))
def test_the_estimate_of_each_step_is_at_or_a_little_above_its_measured_peak(setting, monkeypatch):
    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)  # as on the H200
    checkpointed, fused, on_cpu = setting
    for tokens, measured in zip(STEP_TOKENS, STEP_PEAKS_GIB[setting]):
        estimate = estimate_bytes(LLAMA3_8B_NF4, tokens=tokens, checkpointed_layers=checkpointed, fused_loss=fused,
                                  embeddings_on_cpu=on_cpu) / GIB
        assert measured <= estimate <= measured * 1.12, (tokens, measured, estimate)


def test_the_plan_holds_the_budget_at_the_runs_largest_micro_batch(monkeypatch):
    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)
    # the 16-step runs' largest micro-batch had 6,102 tokens; at 32 GiB the plan of the mean-sized micro-batch
    # recomputed 6 of 32 layers and peaked at 35.6 GiB
    assert micro_batch_tokens(_bench_lengths(), 16, packed=True, micro_batches=16) >= max(STEP_TOKENS)
    plan = plan_memory(LLAMA3_8B_NF4, rows_per_process=16, processes=1, row_lengths=_bench_lengths(), packed=True,
                       budget_gib=32, optimizer_steps=16)
    assert plan.checkpointed_layers > 6 and plan.fits
    assert plan.micro_batch_tokens == micro_batch_tokens(_bench_lengths(), 16, packed=True, micro_batches=16)
    # each micro-batch recomputes as few layers as its own tokens need: the largest the planned count, the
    # mean-sized one fewer; each count's token limit is the most that count holds within the budget
    assert plan.layers_to_checkpoint(plan.micro_batch_tokens) == plan.checkpointed_layers
    assert plan.layers_to_checkpoint(sum(STEP_TOKENS) // len(STEP_TOKENS)) < plan.checkpointed_layers
    limits = plan.tokens_within_budget
    assert len(limits) == 33 and limits[0] < limits[16] < limits[32]
    for count, most in enumerate(limits):
        options = dict(checkpointed_layers=count, fused_loss=plan.fused_loss, embeddings_on_cpu=plan.embeddings_on_cpu,
                       loss_kernel=plan.loss_kernel)
        assert estimate_bytes(LLAMA3_8B_NF4, tokens=most, **options) <= 32 * GIB
        assert estimate_bytes(LLAMA3_8B_NF4, tokens=most + 1, **options) > 32 * GIB
    fixed = plan_memory(LLAMA3_8B_NF4, rows_per_process=16, processes=1, row_lengths=_bench_lengths(), packed=True,
                        budget_gib=32, optimizer_steps=16, fixed=Fixed(checkpointing=True))
    assert fixed.tokens_within_budget is None and fixed.layers_to_checkpoint(10) == 32  # the user's choice holds
    peak = estimate_bytes(LLAMA3_8B_NF4, tokens=max(STEP_TOKENS), checkpointed_layers=plan.checkpointed_layers,
                          fused_loss=plan.fused_loss, embeddings_on_cpu=plan.embeddings_on_cpu) / GIB
    assert peak <= 32


def test_a_longer_run_is_planned_for_a_larger_micro_batch():
    lengths = _bench_lengths()
    sizes = [micro_batch_tokens(lengths, 16, packed=True, micro_batches=n) for n in (1, 16, 1_000, 100_000)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert sizes[-1] <= sum(sorted(lengths)[-16:])  # never more than the 16 longest rows
    assert micro_batch_tokens(lengths, 16, packed=True, micro_batches=16) == sizes[1]  # reproducible


# The same step with compiled decoder layers (--compile-layers, BENCHMARKS.md "GPU"): 34.1 GiB at the 16-step runs'
# largest micro-batch (6,102 tokens), 0/32 layers checkpointed, with Cut Cross-Entropy and with plain logits
MEASURED_COMPILED_GIB = 34.1


def test_compiled_layers_are_estimated_close_to_their_measured_peak_and_plan_above_it(monkeypatch):
    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)
    for fused in (True, False):
        options = dict(checkpointed_layers=0, fused_loss=fused, embeddings_on_cpu=False, compiled_layers=True)
        estimate = estimate_bytes(LLAMA3_8B_NF4, tokens=max(STEP_TOKENS), **options) / GIB
        assert MEASURED_COMPILED_GIB <= estimate <= MEASURED_COMPILED_GIB * 1.12
    options = dict(checkpointed_layers=0, fused_loss=False, embeddings_on_cpu=False, compiled_layers=True)
    every_layer_checkpointed = {**options, "checkpointed_layers": 32}
    assert estimate_bytes(LLAMA3_8B_NF4, tokens=BENCH_STEP_TOKENS, **every_layer_checkpointed) == estimate_bytes(
        LLAMA3_8B_NF4, tokens=BENCH_STEP_TOKENS, **{**every_layer_checkpointed, "compiled_layers": False})
    eager, compiled = _plan(32), _plan(32, compiled_layers=True)
    assert compiled.checkpointed_layers < eager.checkpointed_layers and compiled.fits  # fewer layers recomputed
    assert "layers checkpointed (compiled)" in compiled.describe()


def _bench_lengths():
    import math
    import random

    rng = random.Random(0)
    return [int(min(2048, max(24, rng.lognormvariate(math.log(200), 0.75)))) for _ in range(512)]


def _plan(budget, **kwargs):
    return plan_memory(LLAMA3_8B_NF4, rows_per_process=16, processes=1, row_lengths=_bench_lengths(), packed=True,
                       budget_gib=budget, **kwargs)


def test_more_memory_buys_speed_in_order(monkeypatch):
    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)
    plans = {budget: _plan(budget) for budget in (8, 12, 32, 64, 139)}
    assert all(p.micro_batch == 16 and p.grad_accum == 1 and p.fits for p in plans.values())
    assert plans[8].checkpointed_layers == 32 and plans[8].fused_loss and plans[8].embeddings_on_cpu
    assert not plans[12].embeddings_on_cpu and not plans[32].embeddings_on_cpu  # the device first, then layers
    layers = [plans[b].checkpointed_layers for b in (8, 12, 32, 64, 139)]
    assert layers == sorted(layers, reverse=True) and 0 < plans[32].checkpointed_layers < 32
    assert plans[139].checkpointed_layers == 0 and not plans[139].fused_loss and not plans[139].embeddings_on_cpu
    for plan in plans.values():
        assert plan.estimate_gib <= plan.budget_gib
    assert "16 rows per optimizer step = 16 per micro-batch x 1 accumulated x 1 process" in plans[32].describe()


def test_a_small_budget_cuts_the_step_into_micro_batches(monkeypatch):
    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)
    plan = _plan(7.0)
    assert (plan.micro_batch, plan.grad_accum) in {(8, 2), (4, 4), (2, 8), (1, 16)}
    assert plan.micro_batch * plan.grad_accum == 16 and plan.fits
    hopeless = _plan(1.0)
    assert hopeless.micro_batch == 1 and not hopeless.fits and "does not fit" in hopeless.describe()


def test_explicit_choices_are_kept(monkeypatch):
    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)
    plan = _plan(139, fixed=Fixed(checkpointing=True, fused_loss=True, embeddings_on_cpu=True))
    assert (plan.checkpointed_layers, plan.fused_loss, plan.embeddings_on_cpu) == (32, True, True)
    plan = _plan(12, fixed=Fixed(checkpointing=False))
    assert plan.checkpointed_layers == 0 and plan.micro_batch < 16  # no recompute: smaller micro-batches instead


def test_no_budget_keeps_the_batch_as_given():
    plan = plan_memory(LLAMA3_8B_NF4, rows_per_process=16, processes=2, row_lengths=[100] * 8, packed=True,
                       budget_gib=None, given_micro_batch=4)
    assert (plan.micro_batch, plan.grad_accum, plan.rows_per_step, plan.checkpointed_layers) == (4, 4, 32, 0)
    assert "no budget" in plan.describe()


def test_micro_batch_tokens():
    assert micro_batch_tokens([10, 10, 10, 10], 2, packed=True) == 20
    assert micro_batch_tokens([1, 1, 1, 100], 2, packed=True) <= 101
    assert micro_batch_tokens([5, 30], 3, packed=False) == 90


# -- two plans, one training: equal losses at every step --------------------------------------------

ROWS = sentiment_rows(16)


def _train(tmp_path, name, **trainer_kwargs):
    from hf_instruct_tune.memory_plan import checkpointed_layer_count

    trainer = tiny_lora_trainer(tmp_path / name, ROWS, num_layers=3, max_steps=4, **trainer_kwargs)
    checkpointed = checkpointed_layer_count(trainer.model)
    trainer.train()
    return trainer.memory_plan, checkpointed, logged_losses(trainer)


def test_two_plans_give_the_same_loss_at_every_step(tmp_path, monkeypatch):
    from hf_instruct_tune import memory_plan

    # the given plan: 4 rows x 1, no checkpointing, plain logits; the other: a budget between two rows per
    # micro-batch and four, so 2 rows x 2 accumulated, every layer recomputed, the fused loss
    lengths = []

    def budget_for(rows):
        tokens = micro_batch_tokens(lengths, rows, packed=False)
        return estimate_bytes(shape, tokens=tokens, checkpointed_layers=3, fused_loss=True,
                              embeddings_on_cpu=False) / GIB

    original = memory_plan.plan_memory

    def spy(found_shape, **kwargs):
        nonlocal shape
        shape = found_shape
        lengths.extend(kwargs["row_lengths"])
        if kwargs["budget_gib"] == -1:
            kwargs["budget_gib"] = (budget_for(2) + budget_for(4)) / 2
        return original(found_shape, **kwargs)

    shape = None
    monkeypatch.setattr(memory_plan, "plan_memory", spy)
    given, given_ckpt, reference = _train(tmp_path, "given", memory_plan=False)
    planned, planned_ckpt, losses = _train(tmp_path, "planned", max_memory=-1, gradient_checkpointing=True,
                                           fused_loss=True)
    assert given is None and given_ckpt == 0
    assert (planned.micro_batch, planned.grad_accum) == (2, 2) and planned.fits
    assert planned.checkpointed_layers == 3 == planned_ckpt and planned.fused_loss
    assert len(reference) == len(losses) == 4
    assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-4, atol=1e-5)


def test_embeddings_already_in_cpu_memory_are_reported_so(monkeypatch):
    from trl import SFTConfig

    from hf_instruct_tune.backends import offload_input_embeddings
    from hf_instruct_tune.memory_plan import plan_for_trainer
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model(build_tiny_tokenizer())
    args = SFTConfig(output_dir="unused", use_cpu=True, bf16=False, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2)
    rows = {"input_ids": [[1, 2, 3]] * 8}
    assert not plan_for_trainer(model, args, rows, packed=True, max_memory=1.0).embeddings_on_cpu
    offload_input_embeddings(model)
    assert plan_for_trainer(model, args, rows, packed=True, max_memory=1.0).embeddings_on_cpu


# -- FSDP: one process's share ----------------------------------------------------------------------

# The 8B base of the bench: 4-bit decoder layers, bf16 input embeddings and output head
LLAMA3_8B_NF4_UNDER_FSDP = ModelShape(layers=32, hidden=4096, intermediate=14336, vocab=128256,
                                      weight_bytes=int(5.4 * GIB), embedding_bytes=128256 * 4096 * 2,
                                      trainable_params=41_943_040,
                                      quantized_bytes=int(5.4 * GIB) - 2 * 128256 * 4096 * 2)
# Peaks per GPU of the bench's FSDP runs on 2 H200s (BENCHMARKS.md "Multi-GPU", 2026-11-30), 16 rows per process,
# no layer checkpointed, plain logits: the 4-bit weights whole (uint8 storage), and sharded (bf16 storage, whose
# logits were wrong), on the same rows
MEASURED_FSDP_GIB = {"4-bit whole": (33.91, 33.69), "4-bit sharded": (32.39, 32.17)}


def test_under_fsdp_the_4bit_weights_stay_whole_on_every_gpu():
    shape = LLAMA3_8B_NF4_UNDER_FSDP
    rest = shape.weight_bytes - shape.quantized_bytes
    for gpus in (2, 4, 8):
        share = shape.sharded(gpus)
        assert shape.quantized_bytes + rest / gpus <= share.weight_bytes < shape.quantized_bytes + rest / gpus + GIB
        assert share.trainable_params == shape.trainable_params // gpus  # the adapter's state is sharded
    assert shape.sharded(8).weight_bytes > 0.6 * shape.weight_bytes  # most of a 4-bit base is its 4-bit layers


def test_the_fsdp_estimate_brackets_the_measured_peaks(monkeypatch):
    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)
    shape = dataclasses.replace(LLAMA3_8B_NF4_UNDER_FSDP, adapter_bytes_per_param=8)

    def estimates(tokens: int) -> tuple[float, float]:
        options = dict(tokens=tokens, checkpointed_layers=0, fused_loss=False, embeddings_on_cpu=False)
        # measured with one layer prefetched: two gathered at a time
        return (estimate_bytes(shape.sharded(2, gathered_layers=2), **options) / GIB,
                estimate_bytes(dataclasses.replace(shape, quantized_bytes=0).sharded(2, gathered_layers=2),
                               **options) / GIB)

    # each run's peak is its largest micro-batch's: above the mean-sized one, below the largest the plan budgets for
    at_mean, at_largest = estimates(BENCH_STEP_TOKENS), estimates(micro_batch_tokens(_bench_lengths(), 16, True))
    for kind, (low, high) in zip(("4-bit whole", "4-bit sharded"), zip(at_mean, at_largest)):
        for measured in MEASURED_FSDP_GIB[kind]:
            assert low <= measured <= high
    # on the same rows, what keeping the 4-bit weights whole costs: measured 1.52 GiB on both GPUs
    measured_cost = [w - s for w, s in zip(MEASURED_FSDP_GIB["4-bit whole"], MEASURED_FSDP_GIB["4-bit sharded"])]
    for cost in measured_cost:
        assert at_mean[0] - at_mean[1] == pytest.approx(cost, rel=0.05)


def test_the_shape_of_a_model_counts_integer_weights_as_quantized():
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model(build_tiny_tokenizer(), hidden_size=64, num_layers=2)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.numel() // 2, 1, dtype=torch.uint8),
                                      requires_grad=False)  # stored as bitsandbytes packs two 4-bit values a byte
    shape = ModelShape.of(model)
    assert shape.quantized_bytes == layer.weight.numel()
    assert shape.sharded(4).weight_bytes > shape.quantized_bytes


# -- the layers recomputed in training are the plan's ------------------------------------------------


def _attention_calls_in_one_step(trainer) -> list[int]:
    """How many times each decoder layer's attention ran in one single-micro-batch step (2: recomputed)."""
    layers = trainer.model.get_base_model().model.layers
    calls = [0] * len(layers)
    for index, layer in enumerate(layers):
        layer.self_attn.register_forward_pre_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    trainer.train()
    return calls


def test_training_recomputes_the_layers_the_plan_chose(tmp_path, monkeypatch):
    from hf_instruct_tune import memory_plan

    original = memory_plan.plan_memory
    monkeypatch.setattr(memory_plan, "plan_memory",
                        lambda *args, **kwargs: dataclasses.replace(original(*args, **kwargs), checkpointed_layers=1,
                                                                    tokens_within_budget=None))
    # checkpointing asked for in the arguments, as the CLI builds them when it plans
    trainer = tiny_lora_trainer(tmp_path, ROWS[:4], num_layers=3, max_steps=1, max_memory=100.0,
                                config={"gradient_checkpointing": True})
    assert trainer.memory_plan.checkpointed_layers == 1
    assert _attention_calls_in_one_step(trainer) == [2, 1, 1]


def test_each_micro_batch_recomputes_as_few_layers_as_its_tokens_need(tmp_path, monkeypatch):
    from hf_instruct_tune import memory_plan

    reference = tiny_lora_trainer(tmp_path / "plain", ROWS, num_layers=3, max_steps=4, memory_plan=False)
    tokens_seen = []
    compute_loss = reference.compute_loss
    monkeypatch.setattr(reference, "compute_loss", lambda model, inputs, **kwargs: tokens_seen.append(
        inputs["input_ids"].numel()) or compute_loss(model, inputs, **kwargs))
    reference.train()
    assert min(tokens_seen) < max(tokens_seen)
    threshold = min(tokens_seen)  # the shortest micro-batches fit without recomputing, the others do not
    original = memory_plan.plan_memory

    def plan(*args, **kwargs):  # without recomputing up to `threshold` tokens fit, with 2 layers any micro-batch
        return dataclasses.replace(original(*args, **kwargs), checkpointed_layers=2,
                                   tokens_within_budget=(threshold, threshold, 10_000, 10_000))

    monkeypatch.setattr(memory_plan, "plan_memory", plan)
    trainer = tiny_lora_trainer(tmp_path / "switched", ROWS, num_layers=3, max_steps=4, max_memory=100.0)
    calls = [0, 0, 0]
    for index, layer in enumerate(trainer.model.get_base_model().model.layers):
        layer.self_attn.register_forward_pre_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    trainer.train()
    recomputing = sum(1 for tokens in tokens_seen if tokens > threshold)
    assert 0 < recomputing < len(tokens_seen)
    assert trainer.checkpoint_switch.counts == {0: len(tokens_seen) - recomputing, 2: recomputing}
    assert calls == [len(tokens_seen) + recomputing] * 2 + [len(tokens_seen)]  # layers 1-2 ran again in backward
    assert_close(torch.tensor(logged_losses(trainer)), torch.tensor(logged_losses(reference)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_without_a_plan_checkpointing_is_as_given(tmp_path, checkpointing):
    trainer = tiny_lora_trainer(tmp_path, ROWS[:4], num_layers=2, max_steps=1, memory_plan=False,
                                gradient_checkpointing=checkpointing, config={"gradient_checkpointing": not checkpointing})
    assert _attention_calls_in_one_step(trainer) == [2 if checkpointing else 1] * 2


def test_the_plan_takes_the_loss_kernel_given_and_counts_its_memory(monkeypatch):
    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)
    assert (_plan(139).loss_kernel, _plan(8).loss_kernel) == ("plain", "cce")  # as before: plain when it fits
    roomy, tight = _plan(139, fixed=Fixed(loss_kernel="chunked")), _plan(8, fixed=Fixed(loss_kernel="chunked"))
    assert roomy.loss_kernel == tight.loss_kernel == "chunked" and roomy.fused_loss and tight.fits
    assert "loss: fused cross-entropy (chunked)" in tight.describe()
    # one chunk's fp32 logits and their gradient (1,024 tokens x the vocabulary, with bf16 copies) instead of
    # Cut Cross-Entropy's hidden states: the 8 GiB plan makes room for them with smaller micro-batches
    options = dict(tokens=BENCH_STEP_TOKENS, checkpointed_layers=32, fused_loss=True, embeddings_on_cpu=True)
    chunked, cce = (estimate_bytes(LLAMA3_8B_NF4, **options, loss_kernel=k) for k in ("chunked", "cce"))
    assert chunked - cce == 1024 * 128256 * 16 - BENCH_STEP_TOKENS * 4096 * 4
    assert tight.micro_batch < _plan(8).micro_batch


def test_more_processes_meet_a_larger_micro_batch(monkeypatch):
    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)
    calls = []
    original = micro_batch_tokens

    def counting(lengths, rows, packed, micro_batches=16, runs=4):
        calls.append(micro_batches)
        return original(lengths, rows, packed, micro_batches, runs=runs)

    monkeypatch.setattr("hf_instruct_tune.memory_plan.micro_batch_tokens", counting)
    for processes in (1, 8):
        plan_memory(LLAMA3_8B_NF4, rows_per_process=16, processes=processes, row_lengths=_bench_lengths(),
                    packed=True, budget_gib=32, optimizer_steps=10)
    assert calls[0] == 10 and calls[-1] == 80  # one process's 10 micro-batches; eight processes' 80
