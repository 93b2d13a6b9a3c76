"""Where the memory plan's checkpointing loses time on the GPU against `--gradient-checkpointing` (issue 10).

One `train --load-in-4bit` run (10 steps, the frontier's rows and model), built as the CLI builds it
(`training._load_model`, `training._build_trainer`), with every choice the same in each mode: 16 x 1, 32/32
layers checkpointed, the fused loss, embeddings in CPU memory. Only the way checkpointing is set up differs:

  flags       `--gradient-checkpointing --fused-loss --offload-embeddings --no-memory-plan --batch-size 16
              --grad-accum 1`: checkpointing enabled before LoRA is applied (`backends.add_lora`)
  plan        `--max-memory 12` with the same flags but the plan on: enabled after the trainer is built
              (`memory_plan.apply_checkpointing`)
  flags_late  flags, then `apply_checkpointing(model, 32)` after the trainer is built, as the plan does
  plan_early  plan, with checkpointing also enabled before LoRA is applied, as the flags do

Per step it records the wall time (after a device sync), the layer forwards (the recompute counted), the
synchronizing CUDA calls (`torch.cuda.set_sync_debug_mode`), the allocator's device allocations, frees and
retries, and this process's CPU time; step 7 is profiled (CUDA runtime calls: cudaMalloc/cudaFree, syncs,
copies; the kernels' total time). One RESULT line.

usage: python bench/plan_path_diag.py MODE MODEL_DIR DATA WORKDIR    (see bench/run_plan_path_diag.sh)
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
import warnings

MODES = ("flags", "plan", "flags_late", "plan_early")
PROFILED_STEP = 7
RUNTIME_CALLS = ("cudaMalloc", "cudaFree", "cudaMallocHost", "cudaHostAlloc", "cudaFreeHost", "cudaStreamSynchronize",
                 "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy", "cudaStreamWaitEvent",
                 "cuMemCreate", "cuMemMap", "cuMemUnmap", "cuMemRelease", "cuMemSetAccess")
ATEN_CALLS = ("aten::_local_scalar_dense", "aten::item", "aten::copy_", "aten::_to_copy", "aten::pin_memory",
              "aten::embedding")


def options(mode: str) -> dict:
    same = dict(gradient_checkpointing=True, fused_loss=True, offload_embeddings=True, batch_size=16, grad_accum=1)
    if mode.startswith("flags"):
        return dict(same, memory_plan=False)
    return dict(same, max_memory=12.0)


def build(mode: str, model_dir: str, data: str, workdir: str):
    import hf_instruct_tune.backends as backends
    from hf_instruct_tune import training
    from hf_instruct_tune.config import TrainConfig
    from hf_instruct_tune.data import DataSource
    from hf_instruct_tune.memory_plan import apply_checkpointing
    from hf_instruct_tune.models import load_tokenizer, resolve_model

    config = TrainConfig(data=data, model=model_dir, output_dir=os.path.join(workdir, f"adapter_{mode}"),
                         formatter="text", template="raw", overwrite=True, max_steps=10, seed=0, max_length=2048,
                         lr=2e-4, warmup_steps=5, load_in_4bit=True, **options(mode))
    if mode == "plan_early":
        add_lora = backends.add_lora
        backends.add_lora = lambda model, **kw: add_lora(model, **dict(kw, gradient_checkpointing=True))
    source = DataSource.open(config.data)
    spec = resolve_model(config.model)
    tokenizer = load_tokenizer(spec)
    formatter, template = training._check_data(source, config.formatter, config.template, tokenizer)
    model, peft_config = training._load_model(config, spec, "transformers")
    trainer = training._build_trainer(config, model, tokenizer, peft_config, source, template, spec, "transformers",
                                      formatter)
    if mode == "flags_late":
        apply_checkpointing(trainer.model, 32)
    return trainer


def setup(trainer) -> dict:
    """What the model holds when training starts: checkpointed layers, their checkpoint function, hooks."""
    from hf_instruct_tune.memory_plan import _decoder_layers

    base = trainer.model.get_base_model()
    layers = _decoder_layers(base)
    funcs = collections.Counter()
    for layer in layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        inner = getattr(func, "func", func)
        funcs[f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__name__', '?')} "
              f"{sorted((getattr(func, 'keywords', None) or {}).items())}"] += 1
    embeddings = trainer.model.get_input_embeddings()
    dtypes = collections.Counter()
    for param in trainer.model.parameters():
        dtypes[f"{str(param.dtype).replace('torch.', '')}{' trainable' if param.requires_grad else ''}"] += param.numel()
    return dict(param_dtypes={k: round(v / 1e6, 1) for k, v in sorted(dtypes.items())},
                lora_dtype=next((str(p.dtype) for n, p in trainer.model.named_parameters() if "lora_A" in n), None),
                autocast=getattr(trainer.accelerator, "native_amp", None),
                args_bf16=trainer.args.bf16,
                checkpointed=sum(bool(layer.gradient_checkpointing) for layer in layers), layers=len(layers),
                checkpoint_funcs=dict(funcs), embedding=type(embeddings).__name__,
                embedding_hooks=len(embeddings._forward_hooks),
                layer_hooks=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules()),
                args_checkpointing=trainer.args.gradient_checkpointing, use_cache=base.config.use_cache,
                attn=base.config._attn_implementation, micro_batch=trainer.args.per_device_train_batch_size,
                grad_accum=trainer.args.gradient_accumulation_steps, fused_loss=trainer.fused_loss,
                prefix_sharing=trainer.prefix_sharing)


def diagnostics(trainer):
    import torch
    from transformers import TrainerCallback

    from hf_instruct_tune.memory_plan import _decoder_layers

    layer_calls = collections.Counter()
    for layer in _decoder_layers(trainer.model.get_base_model()):
        layer.self_attn.register_forward_pre_hook(lambda module, args: layer_calls.update(["calls"]))
    syncs = collections.Counter()
    shown = warnings.showwarning

    def count_syncs(message, category, *args, **kwargs):
        if "synchroniz" in str(message):
            syncs["syncs"] += 1
            return None
        return shown(message, category, *args, **kwargs)

    warnings.showwarning = count_syncs
    warnings.filterwarnings("always", message=".*synchroniz.*")
    steps: list[dict] = []
    profile: dict = {}

    class Diagnostics(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.start = (time.perf_counter(), os.times(), dict(torch.cuda.memory_stats()), layer_calls["calls"],
                          syncs["syncs"])
            self.profiler = None
            if state.global_step + 1 == PROFILED_STEP:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                   torch.profiler.ProfilerActivity.CUDA])
                self.profiler.__enter__()
            torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            wall, times, stats, calls, synced = self.start
            end_times, end_stats = os.times(), torch.cuda.memory_stats()
            steps.append(dict(
                s=round(time.perf_counter() - wall, 3), layer_calls=layer_calls["calls"] - calls,
                syncs=syncs["syncs"] - synced,
                cpu_s=round(end_times.user + end_times.system - times.user - times.system, 2),
                device_allocs=end_stats.get("num_device_alloc", 0) - stats.get("num_device_alloc", 0),
                device_frees=end_stats.get("num_device_free", 0) - stats.get("num_device_free", 0),
                alloc_retries=end_stats.get("num_alloc_retries", 0) - stats.get("num_alloc_retries", 0),
                reserved_gib=round(end_stats.get("reserved_bytes.all.peak", 0) / 2**30, 2)))
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                profile.update(summarize(self.profiler))

    trainer.add_callback(Diagnostics())
    return steps, profile


def summarize(profiler) -> dict:
    events = profiler.key_averages()
    calls = {e.key: [e.count, round(e.cpu_time_total / 1e3, 1)] for e in events
             if e.key in RUNTIME_CALLS or e.key in ATEN_CALLS}
    device = [e for e in events if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)]
    kernels = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)
    return dict(calls=calls, kernels_ms=round(sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3, 1),
                top=[[e.key[:48], e.count, round(getattr(e, "self_device_time_total", 0) / 1e3, 1)]
                     for e in kernels[:8]],
                memcpy=[[e.key, e.count, round(getattr(e, "self_device_time_total", 0) / 1e3, 1)] for e in events
                        if e.key.startswith("Memcpy") or e.key.startswith("Memset")],
                device_events=len(device))


def main() -> int:
    mode, model_dir, data, workdir = sys.argv[1:5]
    if mode not in MODES:
        raise SystemExit(f"MODE should be one of {', '.join(MODES)}, got {mode!r}")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI sets it
    import torch
    import transformers

    trainer = build(mode, model_dir, data, workdir)
    before = setup(trainer)
    steps, profile = diagnostics(trainer)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    trainer.train()
    after = setup(trainer)
    print("RESULT " + json.dumps(dict(
        mode=mode, tokens_per_s=round(trainer.tokens_per_second or 0), wall_s=round(time.perf_counter() - start, 1),
        peak_gib=trainer.peak_memory_gib, setup=before, setup_changed_by_train={k: v for k, v in after.items()
                                                                               if before.get(k) != v},
        steps=steps, profile_step7=profile, load_before=load, load_after=os.getloadavg()[0],
        plan=trainer.memory_plan.describe() if trainer.memory_plan else None,
        versions=dict(torch=torch.__version__, transformers=transformers.__version__))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
