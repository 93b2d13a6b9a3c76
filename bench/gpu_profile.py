"""Where a training step's GPU time goes: a torch.profiler breakdown of one step, with and without checkpointing,
and the same step with each decoder layer compiled (`compile_decoder_layers`, the `--compile-layers` lever).

The step is the package's: 4-bit base, LoRA r=16 on every linear layer (`backends.add_lora`), one packed
micro-batch of the bench's first 16 rows (`packing.pack_features`, `torch_varlen` attention), the fused loss,
AdamW, bf16 autocast. Per setting: warm-up steps (more once compiled), the mean of three timed steps, then one
profiled step. The eager settings run first: compiled layers stay compiled. Each setting that fails is
reported and the others still run.

usage (GPU): python bench/gpu_profile.py MODEL_DIR OUT.json [--no-compile]  -> RESULT lines, markdown, the JSON
       python bench/gpu_profile.py markdown OUT.json                      -> the markdown again
       python bench/gpu_profile.py smoke OUT.json      (CPU: a 2-layer model, no 4-bit, sdpa: checks the script)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_bench  # noqa: E402

CATEGORIES = [  # (label, substrings of the lower-cased kernel name), first match wins
    ("NF4 dequantize (bitsandbytes)", ("dequantize", "kdequant", "gemm_4bit", "kgemm")),
    ("attention (flash varlen)", ("flash", "fmha", "attention", "attn")),
    ("matmul (GEMM)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "addmm", "aten::mm", "aten::bmm")),
    ("cross-entropy", ("cce", "cross_entropy", "_ce_", "linear_cross", "softmax")),
    ("optimizer (AdamW)", ("adam", "foreach", "multi_tensor")),
    ("copies and casts", ("copy", "cast", "to_copy", "memcpy", "memset", "fill")),
    ("elementwise, norms, activations", ("elementwise", "vectorized", "reduce", "rms", "silu", "mul", "add",
                                         "triton", "pow", "rsqrt", "mean", "neg", "cat")),
]
TIMED_STEPS = 3


def category(name: object) -> str:
    """The kernel class of a profiler event name; ``other`` for anything unmatched (never raises)."""
    low = str(name or "").lower()
    return next((label for label, keys in CATEGORIES if any(k in low for k in keys)), "other")


def main(model_dir: str, out: str, compile_layers: bool = True, smoke: bool = False) -> dict:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    from transformers import AutoTokenizer

    from hf_instruct_tune.backends import add_lora, load_for_training
    from hf_instruct_tune.layer_compilation import compile_decoder_layers
    from hf_instruct_tune.loss import fused_cross_entropy
    from hf_instruct_tune.memory_plan import apply_checkpointing
    from hf_instruct_tune.packing import pack_features, register_varlen_attention

    cuda = torch.cuda.is_available() and not smoke
    device = "cuda" if cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    base, _ = load_for_training(model_dir, backend="transformers", load_in_4bit=cuda,
                                dtype=torch.bfloat16 if cuda else torch.float32,
                                attn_implementation=register_varlen_attention() if cuda else "sdpa")
    if not cuda:  # a 4-bit model is placed on the GPU as it loads, and refuses `.to()`
        base.to(device)
    head = base.lm_head
    base.lm_head = torch.nn.Identity()
    model = add_lora(base, backend="transformers", r=16, lora_alpha=16, gradient_checkpointing=False)
    model.train()
    layers = model.config.num_hidden_layers
    features = gpu_bench._features(tok)[:16 if cuda else 2]
    batch = pack_features(features, tok.pad_token_id, flash_attn_kwargs=cuda)
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    labels = batch.pop("labels")
    batch.pop("use_cache", None)
    tokens = labels.numel()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            hidden = model(**batch, use_cache=False).logits
        loss = fused_cross_entropy(hidden, head.weight, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    report = {"tokens": tokens, "device": torch.cuda.get_device_name() if cuda else "cpu", "settings": {}}
    settings = [(layers, False), (0, False)] + ([(layers, True)] if compile_layers else [])
    for checkpointed, compiled in settings:
        name = f"{checkpointed}/{layers} checkpointed" + (", compiled layers" if compiled else "")
        try:
            start = time.perf_counter()
            if compiled:
                compile_decoder_layers(model)
            apply_checkpointing(model, checkpointed)
            for _ in range(4 if compiled else 2):
                step()
            sync()
            warmup_s = time.perf_counter() - start
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(TIMED_STEPS):
                loss = step()
            sync()
            step_s = (time.perf_counter() - start) / TIMED_STEPS
            result = {"step_s": step_s, "tokens_per_s": tokens / step_s, "warmup_s": warmup_s,
                      "loss": float(loss), "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}
            result.update(_profile(step, sync, cuda))
        except Exception as error:  # a setting that fails is a finding; the others still run
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        report["settings"][name] = result
        print("RESULT " + json.dumps({"part": "profile", "setting": name,
                                      **{k: v for k, v in result.items() if k not in ("top_kernels", "categories")}}),
              flush=True)
        with open(out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(markdown(report))
    return report


def _profile(step, sync, cuda: bool) -> dict:
    """One profiled step: the share of device time by kernel class, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    kind = "CUDA" if cuda else "CPU"
    events = []
    for e in prof.key_averages():
        device_type = getattr(getattr(e, "device_type", None), "name", "")
        spent = (getattr(e, "self_device_time_total", 0) or getattr(e, "device_time_total", 0)) if cuda \
            else getattr(e, "self_cpu_time_total", 0)
        if spent and spent > 0 and (device_type == kind or not cuda):
            events.append((str(e.key), float(spent), int(getattr(e, "count", 0) or 0)))
    total = sum(spent for _, spent, _ in events) or 1.0
    by_category: dict[str, float] = {}
    for key, spent, _ in events:
        by_category[category(key)] = by_category.get(category(key), 0.0) + spent
    top = sorted(events, key=lambda e: e[1], reverse=True)[:12]
    return {"busy_s": total / 1e6,
            "categories": {k: v / total for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": key[:90], "share": spent / total, "calls": calls} for key, spent, calls in top]}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def markdown(report: dict) -> str:
    lines = [f"Device: {report.get('device', '?')}; {report['tokens']:,} tokens per step (one packed micro-batch).", ""]
    for setting, r in report["settings"].items():
        if "error" in r:
            lines += [f"**{setting}**: failed: {_cell(r['error'])}", ""]
            continue
        lines += [f"**{setting}**: step {r['step_s']:.3f} s ({r['tokens_per_s']:,.0f} tok/s), warm-up "
                  f"{r['warmup_s']:.1f} s, device busy {r['busy_s']:.3f} s in the profiled step, peak "
                  f"{r['peak_alloc_gib']:.1f} GiB, loss {r['loss']:.4f}", "",
                  "| kernel class | share of device time |", "|---|---:|"]
        lines += [f"| {_cell(k)} | {v:.1%} |" for k, v in r["categories"].items()]
        lines += ["", "| top kernels | share | calls |", "|---|---:|---:|"]
        lines += [f"| `{_cell(k['name'])}` | {k['share']:.1%} | {k['calls']} |" for k in r["top_kernels"]]
        lines.append("")
    return "\n".join(lines)


def smoke(out: str) -> None:
    """The whole script on the CPU with a 2-layer model of the bench's architecture and tokenizer."""
    import subprocess

    with tempfile.TemporaryDirectory() as model_dir:
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_bench.py"),
                        "make", model_dir], check=True, env={**os.environ, "BENCH_TINY": "1"})
        report = main(model_dir, out, compile_layers=True, smoke=True)
    failed = [name for name, r in report["settings"].items() if "error" in r]
    sys.exit(f"failed settings: {failed}" if failed else 0)


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "markdown":
        print(markdown(json.load(open(args[1]))))
    elif len(args) == 2 and args[0] == "smoke":
        smoke(args[1])
    elif len(args) in (2, 3) and args[2:] in ([], ["--no-compile"]):
        main(args[0], args[1], compile_layers="--no-compile" not in args)
    else:
        sys.exit(__doc__)
