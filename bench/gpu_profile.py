"""Where a training step's GPU time goes: a torch.profiler breakdown of one step, with and without checkpointing.

The step is the package's: 4-bit base, LoRA r=16 on every linear layer (`backends.add_lora`), one packed
micro-batch of the bench's first 16 rows (`packing.pack_features`, `torch_varlen` attention), the fused loss,
AdamW, bf16 autocast. Two warm-up steps, then one profiled step per setting.

usage (GPU): python bench/gpu_profile.py MODEL_DIR OUT.json   -> prints markdown tables, writes the JSON
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_bench  # noqa: E402

CATEGORIES = [  # (label, substrings of the kernel name), first match wins
    ("NF4 dequantize (bitsandbytes)", ("dequantize", "kdequant", "gemm_4bit", "kgemm")),
    ("attention (flash varlen)", ("flash", "fmha", "attention")),
    ("matmul (GEMM)", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")),
    ("cross-entropy", ("cce", "cross_entropy", "_ce_", "linear_cross", "softmax")),
    ("optimizer (AdamW)", ("adam", "foreach", "multi_tensor")),
    ("copies and casts", ("copy", "cast", "to_copy", "memcpy", "memset", "fill")),
    ("elementwise, norms, activations", ("elementwise", "vectorized", "reduce", "rms", "silu", "mul", "add",
                                         "triton")),
]


def _category(name: str) -> str:
    low = name.lower()
    return next((label for label, keys in CATEGORIES if any(k in low for k in keys)), "other")


def main(model_dir: str, out: str) -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    from hf_instruct_tune.backends import add_lora, load_for_training
    from hf_instruct_tune.loss import fused_cross_entropy
    from hf_instruct_tune.memory_plan import apply_checkpointing
    from hf_instruct_tune.packing import pack_features, register_varlen_attention

    tok = AutoTokenizer.from_pretrained(model_dir)
    base, _ = load_for_training(model_dir, backend="transformers", load_in_4bit=True, dtype=torch.bfloat16,
                                attn_implementation=register_varlen_attention())
    head = base.lm_head
    base.lm_head = torch.nn.Identity()
    model = add_lora(base, backend="transformers", r=16, lora_alpha=16, gradient_checkpointing=False)
    model.train()
    batch = pack_features(gpu_bench._features(tok)[:16], tok.pad_token_id, flash_attn_kwargs=True)
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items()}
    labels = batch.pop("labels")
    batch.pop("use_cache", None)
    tokens = labels.numel()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(**batch, use_cache=False).logits
        loss = fused_cross_entropy(hidden, head.weight, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    report = {"tokens": tokens, "settings": {}}
    for layers in (32, 0):
        apply_checkpointing(model, layers)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        plain_s = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
        total = sum(e.device_time_total for e in events)
        kernels = sorted(events, key=lambda e: e.device_time_total, reverse=True)
        by_category: dict[str, float] = {}
        for e in events:
            by_category[_category(e.key)] = by_category.get(_category(e.key), 0.0) + e.device_time_total
        report["settings"][f"{layers}/32 checkpointed"] = {
            "step_s": plain_s, "tokens_per_s": tokens / plain_s, "gpu_busy_s": total / 1e6,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "categories": {k: v / total for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": e.key[:90], "share": e.device_time_total / total, "calls": e.count}
                            for e in kernels[:12]],
        }
    json.dump(report, open(out, "w"), indent=1)
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = []
    for setting, r in report["settings"].items():
        lines += [f"**{setting}**: step {r['step_s']:.3f} s ({r['tokens_per_s']:,.0f} tok/s on {report['tokens']:,} "
                  f"tokens), GPU busy {r['gpu_busy_s']:.3f} s ({r['gpu_busy_s'] / r['step_s']:.0%} of the step), "
                  f"peak {r['peak_alloc_gib']:.1f} GiB", "", "| kernel class | share of GPU time |", "|---|---:|"]
        lines += [f"| {k} | {v:.1%} |" for k, v in r["categories"].items()]
        lines += ["", "| top kernels | share | calls |", "|---|---:|---:|"]
        lines += [f"| `{k['name']}` | {k['share']:.1%} | {k['calls']} |" for k in r["top_kernels"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "markdown":
        print(markdown(json.load(open(sys.argv[2]))))
    elif len(sys.argv) == 3:
        main(sys.argv[1], sys.argv[2])
    else:
        sys.exit(__doc__)
