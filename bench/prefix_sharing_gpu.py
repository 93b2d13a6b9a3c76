"""Prefix sharing on the GPU: the 8B QLoRA workload with a long shared system prompt, shared vs not, through the CLI.

Every bench row (bench/gpu_bench.py `rows`: log-normal lengths, median ~200 tokens) gets the same ~1,000-token
system prompt in front: the prompt is the system prompt and the first third of the row, the completion (the
supervised tokens) the rest. `hf-instruct-tune train --load-in-4bit` with default flags (16 rows per optimizer
step; the memory plan and `torch_varlen` attention, as a user gets them on a GPU) runs once with
`--prefix-sharing` and once with `--no-prefix-sharing`, on the same rows in the same order. Each run reports its
real tokens/s (the tokens the rows hold, after the first 5 steps), the time of the first 5 steps apart (they
include the compilation of the attention kernels), its peak GPU memory, and its losses, which should agree
step by step (the same rows; bf16 and NF4 rounding apart).

usage (on the GPU machine, see bench/run_prefix_sharing_gpu.sh):
  python bench/prefix_sharing_gpu.py data OUT.jsonl [--prefix-tokens N] [--rows N]
  python bench/prefix_sharing_gpu.py check                       # tiny model: compiled flex == padded sdpa
  python bench/prefix_sharing_gpu.py cli NAME MODEL_DIR DATA OUTDIR [FLAGS...]  # one CLI run -> RESULT line
  python bench/prefix_sharing_gpu.py table RESULTS.json [--write BENCHMARKS.md --date D]  # the BENCHMARKS.md rows
On CPU, `check` runs the same comparison on the eager branch, and `cli` with a tiny model (BENCH_TINY=1
`gpu_bench.py make DIR`) checks the plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_bench  # noqa: E402

PREFIX_TOKENS, STEPS, WARM_STEPS = 1000, int(os.environ.get("BENCH_STEPS", 15)), 5
RUN_COMMAND = "bash bench/run_prefix_sharing_gpu.sh"


def system_prompt(tokens: int = PREFIX_TOKENS, seed: int = 1) -> str:
    """A fixed prompt of ``tokens`` words of the bench tokenizer (one token each)."""
    rng = random.Random(seed)
    return " ".join(f"t{rng.randrange(1000, 120000)}" for _ in range(tokens))


def data_rows(prefix_tokens: int = PREFIX_TOKENS, n: int = 512) -> list[dict[str, str]]:
    """The bench rows as prompt/completion rows behind one shared system prompt."""
    system = system_prompt(prefix_tokens)
    out = []
    for row in gpu_bench.rows(n):
        words = row["text"].split()
        cut = max(1, len(words) // 3)
        out.append({"prompt": system + " " + " ".join(words[:cut]), "completion": " ".join(words[cut:])})
    return out


def data(out: str, prefix_tokens: int, n: int) -> None:
    rows = data_rows(prefix_tokens, n)
    with open(out, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(json.dumps({"rows": len(rows), "prefix_tokens": prefix_tokens, "file": out}))


def cli(name: str, model_dir: str, data_file: str, outdir: str, flags: list[str]) -> dict:
    """Run `hf-instruct-tune train` once; the RESULT comes from the adapter's `hf_instruct_tune.json` and the log."""
    out = os.path.join(os.path.abspath(outdir), f"adapter_{name}")
    command = [sys.executable, "-m", "hf_instruct_tune", "train", "--model", os.path.abspath(model_dir),
               "--data", os.path.abspath(data_file), "--formatter", "prompt_completion", "--template", "raw",
               "--output-dir", out, "--overwrite", "--max-steps", str(STEPS), "--seed", "0", "--max-length", "4096",
               "--lr", "2e-4", "--warmup-steps", "5", *flags]
    log = os.path.join(outdir, f"log_{name}.txt")
    start = time.time()
    with open(log, "w") as fh:
        # from /tmp: `python -m` puts the working folder first on sys.path, and the checkout's package lacks
        # the installed layout (templates/ and cards/ inside it)
        code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, cwd="/tmp").returncode
    text = open(log).read()
    result = {"variant": name, "flags": " ".join(flags), "wall_s": round(time.time() - start, 1),
              "attention": _logged(text, r"Attention: (\S+)"), "plan": _logged(text, r"(Memory plan: .*)"),
              "sharing": _logged(text, r"(Prefix sharing: .*)"),
              "flex_fallback": _logged(text, r"(FlexAttention could not run compiled.*)")}
    if code != 0:
        result["error"] = f"exit {code}: " + text[-400:]
    else:
        meta = json.load(open(os.path.join(out, "hf_instruct_tune.json")))
        results = meta["results"]
        rate, tokens, runtime = results["tokens_per_second"], results["timed_tokens"], results["train_runtime_s"]
        warm = min(WARM_STEPS, STEPS // 2)  # the steps the package's throughput leaves out
        timed_s = tokens / rate if rate else None
        step_s = timed_s / (STEPS - warm) if timed_s else None
        result.update(real_tokens_per_s=rate, timed_tokens=tokens, train_runtime_s=runtime, untimed_steps=warm,
                      step_s=step_s, first_steps_s=runtime - timed_s if timed_s and runtime else None,
                      warmup_overhead_s=runtime - timed_s - warm * step_s if step_s and runtime else None,
                      peak_alloc_gib=max(results["peak_memory_gib_per_process"] or [0.0]),
                      prefix_sharing=meta["training"].get("prefix_sharing"),
                      losses=[e["loss"] for e in results["loss_history"]])
    print("RESULT " + json.dumps(result), flush=True)
    return result


def _logged(text: str, pattern: str) -> str | None:
    found = re.findall(pattern, text)
    return found[-1].strip() if found else None


def check(lengths: tuple[int, ...] = (300, 420, 555, 700)) -> dict:
    """A tiny random Llama with LoRA: a shared batch under ``torch_varlen``'s BlockMask branch (compiled flex on
    CUDA) against the same rows padded under ``sdpa``, loss and LoRA grads, for rows of several lengths (the
    compiled kernels should compile once, not per length)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_instruct_tune.collator import pad_examples
    from hf_instruct_tune.memory_plan import apply_checkpointing
    from hf_instruct_tune.packing import register_varlen_attention
    from hf_instruct_tune.prefix_sharing import share_prefixes, shared_prefix_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    register_varlen_attention()

    def model(attn: str):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             pad_token_id=0, eos_token_id=2, bos_token_id=1)
        config._attn_implementation = attn
        lora = LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
        peft = get_peft_model(LlamaForCausalLM(config).float().to(device), lora).train()
        apply_checkpointing(peft, layers=1)  # the memory plan's non-reentrant checkpointing, on one layer of two
        return peft

    def grads(m):
        return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}

    def to_device(batch):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}

    dense_model, sparse_model = model("sdpa"), model("torch_varlen")
    result: dict = {"check": "compiled flex BlockMask == padded sdpa", "device": device, "runs": []}
    for length in lengths:
        g = torch.Generator().manual_seed(length)
        prefix = torch.randint(3, 512, (length // 2,), generator=g).tolist()
        rows = []
        for _ in range(6):
            rest = torch.randint(3, 512, (int(torch.randint(8, length // 2, (1,), generator=g)),), generator=g).tolist()
            ids = prefix + rest + [2]
            rows.append({"input_ids": ids, "labels": [-100] * len(prefix) + rest + [2]})
        dense_model.zero_grad()
        loss = dense_model(**to_device(pad_examples(rows, pad_token_id=0))).loss
        loss.backward()
        sparse_model.zero_grad()
        start = time.time()
        shared_loss, _ = shared_prefix_loss(sparse_model, to_device(share_prefixes(rows, compact=True)))
        shared_loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        expected, got = grads(dense_model), grads(sparse_model)
        worst = max(float((got[n] - g_).abs().max() / g_.abs().max().clamp_min(1e-12)) for n, g_ in expected.items())
        result["runs"].append({"tree_tokens": int(share_prefixes(rows)["input_ids"].shape[1]),
                               "loss_rel_diff": abs(shared_loss.item() - loss.item()) / loss.item(),
                               "grad_max_rel_diff": worst, "seconds": round(time.time() - start, 2)})
    counters = {}
    try:
        from torch._dynamo.utils import counters as dynamo_counters

        counters = {k: v for k, v in dynamo_counters["stats"].items()}
    except ImportError:
        pass
    result["dynamo_stats"] = counters
    from hf_instruct_tune import packing

    result["compiled_flex_runs"] = {str(k): v for k, v in packing._COMPILED_FLEX_WORKS.items()}
    result["ok"] = all(r["loss_rel_diff"] < 1e-3 and r["grad_max_rel_diff"] < 2e-2 for r in result["runs"])
    print("RESULT " + json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    """The BENCHMARKS.md "Prefix sharing" GPU rows: shared vs not, and the first losses side by side."""
    runs = {r.get("variant"): r for r in results if "variant" in r}
    shared, plain = runs.get("shared"), runs.get("no_sharing")
    lines = [f"8B (random Llama-3 architecture), NF4 (`--load-in-4bit`), one H200, a {PREFIX_TOKENS:,}-token system "
             f"prompt in front of every bench row, 16 rows per step, {STEPS} steps (the first {WARM_STEPS} untimed); "
             f"`{RUN_COMMAND}`:", "",
             f"| run | attention | real tok/s | step s | first {WARM_STEPS} steps s (incl. compile) | peak GiB | plan |",
             "|---|---|---:|---:|---:|---:|---|"]
    for label, run in (("`--prefix-sharing`", shared), ("`--no-prefix-sharing`", plain)):
        if run is None:
            lines.append(f"| {label} | not run | | | | | |")
        elif "error" in run:
            lines.append(f"| {label} | failed: {run['error'][-80:].strip()} | | | | | |")
        else:
            plan = (run.get("plan") or "").split("; ")
            attention = f"{run.get('attention')}{' (dense fallback)' if run.get('flex_fallback') else ''}"
            lines.append(f"| {label} | {attention} | {run['real_tokens_per_s']:,.0f} | {run['step_s']:.2f} | "
                         f"{run['first_steps_s']:.1f} | {run['peak_alloc_gib']:.1f} | {'; '.join(plan[1:3])} |")
    if shared and plain and "error" not in shared and "error" not in plain:
        lines += ["", f"Speed-up: {shared['real_tokens_per_s'] / plain['real_tokens_per_s']:.2f}x real tokens/s. "
                  f"{shared.get('sharing') or ''}", "", "| step | loss shared | loss not shared | relative difference |",
                  "|---:|---:|---:|---:|"]
        for step, (a, b) in enumerate(zip(shared["losses"], plain["losses"]), 1):
            lines.append(f"| {step} | {a:.4f} | {b:.4f} | {abs(a - b) / abs(b):.1e} |")
    checks = [r for r in results if "check" in r]
    for c in checks:
        worst = max((r["grad_max_rel_diff"] for r in c["runs"]), default=float("nan"))
        lines += ["", f"Tiny-model check on {c['device']} ({c['check']}, rows of {len(c['runs'])} lengths): "
                  f"{'passed' if c['ok'] else 'FAILED'}, loss within "
                  f"{max(r['loss_rel_diff'] for r in c['runs']):.1e} relative, LoRA grads within {worst:.1e}."]
    return "\n".join(lines)


GPU_HEADING = "### GPU: 8B QLoRA with a 1,000-token shared system prompt"


def write_section(markdown: str, path: str = "BENCHMARKS.md", date: str | None = None) -> None:
    """Put ``markdown`` under :data:`GPU_HEADING` at the end of the "## Prefix sharing" section of ``path``,
    replacing that subsection when it is there already."""
    text = open(path).read()
    heading = f"{GPU_HEADING}{', ' + date if date else ''}"
    block = f"{heading}\n\n{markdown.strip()}\n"
    start = text.find("\n" + GPU_HEADING)
    if start >= 0:
        following = [i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i >= 0]
        end = min(following) if following else len(text)
        text = text[:start + 1] + block + text[end:]
    else:
        section = text.find("\n## Prefix sharing")
        if section < 0:
            text = text.rstrip("\n") + "\n\n## Prefix sharing\n\n" + block
        else:
            after = text.find("\n## ", section + 1)
            end = after if after >= 0 else len(text)
            text = text[:end].rstrip("\n") + "\n\n" + block + text[end:]
    with open(path, "w") as fh:
        fh.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data")
    p.add_argument("out")
    p.add_argument("--prefix-tokens", type=int, default=PREFIX_TOKENS)
    p.add_argument("--rows", type=int, default=512)
    sub.add_parser("check")
    p = sub.add_parser("cli")
    for name in ("name", "model_dir", "data_file", "outdir"):
        p.add_argument(name)
    p = sub.add_parser("table")
    p.add_argument("results")
    p.add_argument("--write", metavar="BENCHMARKS_MD", help="also put the rows into this file's Prefix sharing section")
    p.add_argument("--date", help="the date of the run, for the heading")
    args, rest = parser.parse_known_args(argv)
    if args.command == "cli":
        cli(args.name, args.model_dir, args.data_file, args.outdir, rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "data":
        data(args.out, args.prefix_tokens, args.rows)
    elif args.command == "check":
        check()
    else:
        markdown = table(json.load(open(args.results)))
        print(markdown)
        if args.write:
            write_section(markdown, args.write, args.date)


if __name__ == "__main__":
    main()
