"""Multi-GPU bench results: the table (one GPU, DDP, FSDP) and the check that each saved adapter is whole.

usage (see bench/run_multi_gpu_bench.sh):
  python bench/multi_gpu.py adapters MODEL_DIR OUT        # every OUT/adapter_* -> JSON on stdout (GPU)
  accelerate launch --config_file examples/accelerate_fsdp.yaml bench/multi_gpu.py sharded-logits MODEL_DIR ADAPTER
      # the saved adapter's logits on one GPU against the same weights sharded with FSDP2 -> RESULT line
  python bench/multi_gpu.py table multi_gpu.json [adapters.json]
"""

from __future__ import annotations

import json
import os
import sys

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapters(model_dir: str, out: str) -> None:
    """Load each adapter with PeftModel.from_pretrained on one GPU: whole (every layer and target, full shapes,
    trained B), and its effect on the logits of a fixed input, compared between the runs."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folders = sorted(f for f in os.listdir(out) if f.startswith("adapter_"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": device})
    layers = base.config.num_hidden_layers
    ids = torch.randint(1000, min(120000, base.config.vocab_size), (1, 256), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference = base(input_ids=ids).logits.float()
    report, model = {}, None
    for folder in folders:
        name = folder[len("adapter_"):]
        path = os.path.join(out, folder)
        weights = load_file(os.path.join(path, "adapter_model.safetensors"))
        expected = layers * len(TARGETS) * 2
        empty_b = [k for k, v in weights.items() if "lora_B" in k and float(v.float().abs().max()) == 0.0]
        shapes_ok = _whole_shapes(base, weights, json.load(open(os.path.join(path, "adapter_config.json")))["r"])
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
        model.set_adapter(name)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        report[name] = {"tensors": len(weights), "expected_tensors": expected, "shapes_whole": shapes_ok,
                        "untrained_lora_B": len(empty_b), "loads": True,
                        "logit_change_vs_base": float((logits - reference).norm() / reference.norm()),
                        "delta": (logits - reference).cpu()}
    for name, entry in report.items():  # the distributed adapter's effect against the 1-GPU one of its kind
        kind = name.split("_")[0]
        one = report.get(f"{kind}_1gpu")
        if one is not None and name != f"{kind}_1gpu":
            entry["delta_rel_diff_vs_1gpu"] = float((entry["delta"] - one["delta"]).norm() / one["delta"].norm())
    for entry in report.values():
        del entry["delta"]
    print(json.dumps(report, indent=1))


def _whole_shapes(base, weights: dict, rank: int) -> bool:
    """Every LoRA tensor at its full shape: A is (r, in_features), B is (out_features, r) of the layer it adapts."""
    modules = dict(base.named_modules())
    for key, tensor in weights.items():
        layer = modules.get(key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0])
        if layer is None:
            return False
        full = (rank, layer.in_features) if ".lora_A" in key else (layer.out_features, rank)
        if tuple(tensor.shape) != full:
            return False
    return True


def sharded_logits(model_dir: str, adapter: str) -> dict:
    """Under ``accelerate launch`` with FSDP2: the adapter's logits on one unsharded copy (process 0, as after
    training on one GPU) against the same weights sharded across the processes the way training shards them.

    The base loads as ``train`` loads it (a 4-bit base, through ``nf4_config``, when the adapter was trained on one).
    Both forwards run in bf16 autocast. ``vs_adapter_effect``: the difference over what the adapter changes.
    """
    import torch
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_instruct_tune.backends import nf4_config
    from hf_instruct_tune.metadata import TrainingMetadata

    accelerator = Accelerator()
    device = accelerator.device
    four_bit = bool(TrainingMetadata.load(adapter).training.get("load_in_4bit"))
    kwargs = {"dtype": torch.bfloat16}
    if four_bit:
        kwargs.update(quantization_config=nf4_config(), device_map={"": accelerator.local_process_index})
    base_model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not four_bit:
        base_model.to(device)
    model = PeftModel.from_pretrained(base_model, adapter, is_trainable=True)
    vocab = base_model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), min(120000, vocab), (1, 256),
                        generator=torch.Generator().manual_seed(0)).to(device)
    one = base = None
    if accelerator.is_main_process:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            one = model(input_ids=ids).logits.float()
            with model.disable_adapter():
                base = model(input_ids=ids).logits.float()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        sharded = model(input_ids=ids).logits.float()
    result = {}
    if accelerator.is_main_process:
        diff = float((sharded - one).norm())
        result = {"adapter": os.path.basename(adapter), "load_in_4bit": four_bit, "processes": accelerator.num_processes,
                  "sharded": type(next(iter(model.parameters()))).__name__,
                  "rel_diff": diff / float(one.norm()), "adapter_effect": float((one - base).norm() / base.norm()),
                  "vs_adapter_effect": diff / max(float((one - base).norm()), 1e-30)}
        print("RESULT " + json.dumps(result), flush=True)
    accelerator.wait_for_everyone()
    return result


def _one_gpu_reference(name: str, by_name: dict) -> dict | None:
    """The one-GPU run a multi-GPU run is measured against: ``bf16_fsdp_b32`` against ``bf16_1gpu_b32`` where
    there is one, else against ``bf16_1gpu``."""
    kind, _, rest = name.partition("_")
    _, _, suffix = rest.partition("_")
    return by_name.get(f"{kind}_1gpu_{suffix}") if suffix and f"{kind}_1gpu_{suffix}" in by_name \
        else by_name.get(f"{kind}_1gpu")


def table(results: list[dict], checks: dict | None = None) -> str:
    by_name = {r["variant"]: r for r in results}
    lines = ["| setup | real tok/s per GPU | total real tok/s (sum of ranks) | peak GiB per GPU | scaling efficiency | "
             "saved adapter |", "|---|---:|---:|---:|---:|---|"]
    for r in results:
        name = r["variant"]
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][-160:]!r} | | | | |")
            continue
        world = r.get("world", 1) or 1
        one = _one_gpu_reference(name, by_name)
        eff = (f"{r['real_tokens_per_s'] / (world * one['real_tokens_per_s']):.0%}"
               if one and "error" not in one and world > 1 else ("100%" if world == 1 else "n/a"))
        peaks = ", ".join(f"{p:.1f}" for p in (r.get("peak_per_process") or []))
        check = (checks or {}).get(name)
        adapter = (f"{check['tensors']}/{check['expected_tensors']} tensors"
                   f"{', untrained B: %d' % check['untrained_lora_B'] if check['untrained_lora_B'] else ''}, "
                   f"loads; logits move {check['logit_change_vs_base']:.1%} from the base"
                   if check else "not checked")
        lines.append(f"| {name}: `{r['flags']}` | {r['real_tokens_per_s'] / world:,.0f} | {r['real_tokens_per_s']:,.0f} | "
                     f"{peaks} | {eff} | {adapter} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "adapters":
        adapters(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "sharded-logits":
        sharded_logits(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "table":
        found = len(sys.argv) > 3 and os.path.isfile(sys.argv[3]) and os.path.getsize(sys.argv[3])
        checks = json.load(open(sys.argv[3])) if found else None  # none with SKIP_ADAPTERS
        print(table(json.load(open(sys.argv[2])), checks))
    else:
        sys.exit(__doc__)
