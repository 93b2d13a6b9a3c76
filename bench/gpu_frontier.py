"""The speed-memory frontier: this package through its CLI at each memory budget, against the baselines.

The package runs as a user runs it, `hf-instruct-tune train` with `--load-in-4bit` and the notebook's batch
(4 x 4, so 16 rows per step), once with no other flag (the memory plan uses the free GPU memory) and once per
`--max-memory B`; its tokens/s, timed tokens and peak come from the run's own `hf_instruct_tune.json`.
The baselines (`gpu_bench.py train hf|unsloth`) train on the same token ids, in the same order, with the same
allocator settings and the same timed steps (6 to 10).

usage (on the GPU machine, see bench/run_gpu_frontier.sh):
  python bench/gpu_frontier.py data OUT.jsonl                       # the bench rows as `text` rows
  python bench/gpu_frontier.py cli NAME MODEL_DIR DATA OUTDIR [FLAGS...]   # one CLI run -> RESULT line
      (--accelerate-config FILE among the flags: through `accelerate launch --config_file FILE`)
  python bench/gpu_frontier.py table RESULTS.json                   # the frontier table (markdown)
  python bench/gpu_frontier.py merge RESULTS.json|.jsonl ...          # one list, each run tagged with its file's
                                                                      # place as "call" (1, 2, ...)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_bench  # noqa: E402

BUDGETS = [8, 12, 32, 64, None]  # GiB; None: no limit
BOUND_FULL = 24_700  # tok/s: 4 FLOP per parameter per token at ~790 TFLOP/s (16,500 with every layer recomputed)


def bound(short_plan: str) -> float:
    """The tok/s bound of a plan: 4 FLOP per parameter per token, plus 2 for the share of layers recomputed (the
    largest micro-batch's, for a plan that recomputes fewer at shorter ones)."""
    match = re.search(r"ckpt (?:up to )?(\d+)/(\d+)", short_plan)
    recomputed = int(match.group(1)) / int(match.group(2)) if match else 0.0
    return BOUND_FULL * 4 / (4 + 2 * recomputed)


def data(out: str) -> None:
    """Write the bench rows as `text` rows: with `--formatter text --template raw` the package encodes each one
    as the baselines' `_features` do (the words' ids, then the EOS)."""
    with open(out, "w") as fh:
        for row in gpu_bench.rows():
            fh.write(json.dumps({"text": row["text"]}) + "\n")
    print(json.dumps({"rows": len(gpu_bench.rows()), "file": out}))


def _in_place_of_cli(launcher: list[str], script: str) -> list[str]:
    """``launcher`` running this folder's ``script`` (the CLI's command line, with its own hooks) in place of its
    trailing ``-m hf_instruct_tune`` (under ``accelerate launch`` too)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    return [*launcher[:-2], path] if launcher[-2:] == ["-m", "hf_instruct_tune"] else launcher


def cli(name: str, model_dir: str, data_file: str, outdir: str, flags: list[str]) -> dict:
    """Run `hf-instruct-tune train` once; the RESULT comes from the adapter's `hf_instruct_tune.json`."""
    out = os.path.join(os.path.abspath(outdir), f"adapter_{name}")
    model_dir, data_file = os.path.abspath(model_dir), os.path.abspath(data_file)
    launcher = [sys.executable, "-m", "hf_instruct_tune"]
    if "--accelerate-config" in flags:  # `accelerate launch --config_file FILE -m hf_instruct_tune train ...`
        at = flags.index("--accelerate-config")
        config = os.path.abspath(flags[at + 1])
        flags = flags[:at] + flags[at + 2:]
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "-m", "hf_instruct_tune"]
    env = dict(os.environ)
    steps = gpu_bench.STEPS
    if env.get("BENCH_PROFILE_STEPS"):  # the same run with a profiler window (bench/profiled_train.py)
        env["BENCH_PROFILE_OUT"] = os.path.join(os.path.abspath(outdir), f"profile_{name}")
    if env.get("BENCH_PLANNED_STEPS"):  # a run planned that long, stopped after STEPS (bench/planned_run_train.py,
        launcher = _in_place_of_cli(launcher, "planned_run_train.py")  # which profiles too where asked)
        env["BENCH_STOP_AFTER"], steps = str(gpu_bench.STEPS), int(env["BENCH_PLANNED_STEPS"])
    elif env.get("BENCH_PROFILE_STEPS"):
        launcher = _in_place_of_cli(launcher, "profiled_train.py")
    command = [*launcher, "train", "--model", model_dir, "--data", data_file,
               "--formatter", "text", "--template", "raw", "--output-dir", out, "--overwrite",
               "--max-steps", str(steps), "--seed", "0", "--max-length", "2048", "--lr", "2e-4",
               "--warmup-steps", "5", *flags]
    start = time.time()
    log = os.path.join(outdir, f"log_cli_{name}.txt")
    with open(log, "w") as fh:
        # from /tmp: `python -m` puts the working folder first on sys.path, and the checkout's package lacks
        # the installed layout (templates/ and cards/ inside it)
        code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, cwd="/tmp", env=env).returncode
    result = {"stack": "hit-cli", "variant": name, "flags": " ".join(flags), "wall_s": round(time.time() - start, 1)}
    if steps != gpu_bench.STEPS:
        result["planned_steps"] = steps
    if code != 0:
        result["error"] = f"exit {code}: " + open(log).read()[-300:]
    else:
        meta = json.load(open(os.path.join(out, "hf_instruct_tune.json")))
        results, training = meta["results"], meta["training"]
        result.update(real_tokens_per_s=results["tokens_per_second"], timed_tokens=results["timed_tokens"],
                      peak_alloc_gib=max(results["peak_memory_gib_per_process"] or [0.0]),
                      peak_per_process=results["peak_memory_gib_per_process"], world=training.get("world_size", 1),
                      plan=training.get("memory_plan"), losses=[e["loss"] for e in results["loss_history"]],
                      step_s=results.get("step_seconds"), step_tokens=results.get("step_tokens"),
                      step_peak_gib=results.get("step_peak_memory_gib"),
                      checkpointed_per_micro_batch=results.get("checkpointed_layers_per_micro_batch"),
                      micro_batches_in_parts=results.get("micro_batches_in_parts"),
                      fused_lora=(training.get("fused_lora") or {}).get("used"),
                      compiled_layers=(training.get("compile_layers") or {}).get("compiled"),
                      dequantized_base=training.get("dequantized_base"), optimizer=training.get("optimizer"))
    print("RESULT " + json.dumps(result), flush=True)
    return result


def merge(paths: list[str]) -> list[dict]:
    """The runs of several result files (a JSON list or JSON lines) in one list, each tagged with the 1-based
    place of its file as ``call``."""
    runs = []
    for call, path in enumerate(paths, start=1):
        text = open(path).read()
        found = (json.loads(text) if text.lstrip().startswith("[")
                 else [json.loads(line) for line in text.splitlines() if line.strip()])
        runs.extend({**run, "call": call} for run in found)
    return runs


def _fits(result: dict, budget: float | None) -> bool:
    return "error" not in result and (budget is None or result["peak_alloc_gib"] <= budget)


def _short_plan(line: str) -> str:
    """``Memory plan: 16 rows ... = 16 per micro-batch x 1 accumulated ...`` -> ``16 x 1, 32/32 ckpt, fused loss, ...``"""
    match = re.search(r"= (\d+) per micro-batch x (\d+) accumulated .*?; (\d+/\d+) layers checkpointed"
                      r"( \((?:compiled|Liger kernels)\))?( at the largest micro-batch, fewer at shorter ones)?; "
                      r"loss: ([^;]+); input embeddings on (\w+)(; 4-bit base dequantized once[^;]*)?; "
                      r"estimated peak ([\d.]+)", line)
    if not match:
        return line
    micro, accum, ckpt, compiled, per_micro_batch, loss, where, dequantized, estimate = match.groups()
    ckpt = f"up to {ckpt}" if per_micro_batch else ckpt
    accum = f"{accum} (the longest in parts)" if "runs in parts" in line else accum
    kernels = {" (compiled)": " (compiled layers)", " (Liger kernels)": " (Liger kernels)"}.get(compiled or "", "")
    return (f"{micro} x {accum}, ckpt {ckpt}{kernels}, "
            f"{'fused' if 'fused' in loss else 'plain'} loss, embeddings on {where}"
            f"{', base dequantized once' if dequantized else ''}, estimate {estimate} GiB")


def _cell(result: dict | None) -> str:
    return f"{result['real_tokens_per_s']:,.0f} @ {result['peak_alloc_gib']:.1f}" if result else ""


def table(results: list[dict]) -> str:
    """One row per budget: the package's CLI runs for it, and the fastest baseline run whose peak fits it.

    A run repeated in the lease (the same variant name) gives one cell per run; the ratio is the package's
    slowest run against the fastest fitting Unsloth run."""
    package: dict[str, list[dict]] = {}
    for r in results:
        if r["stack"] == "hit-cli":
            package.setdefault(r["variant"], []).append(r)
    lines = ["| budget | this package, CLI | real tok/s @ peak GiB | share of bound | best Unsloth that fits | "
             "real tok/s @ peak GiB | best transformers+peft that fits | ratio vs Unsloth |",
             "|---|---|---:|---:|---|---:|---|---:|"]
    runs = []  # (budget, the package's run name, the row's label): default flags, then with --compile-layers
    for budget in BUDGETS:
        label = f"{budget} GiB" if budget else "no limit"
        short_run = f"max_memory_{budget}" if budget else "default"
        if short_run in package or f"planned_{budget or 'none'}" not in package:
            runs.append((budget, short_run, label))
        if f"compiled_{budget or 'none'}" in package:
            runs.append((budget, f"compiled_{budget or 'none'}", f"{label}, compiled layers"))
        planned = package.get(f"planned_{budget or 'none'}")
        if planned:
            steps = planned[0].get("planned_steps", gpu_bench.STEPS)
            runs.append((budget, f"planned_{budget or 'none'}", f"{label}, a run planned for {steps:,} steps"))
    for budget, name, label in runs:
        ours = package.get(name, [])
        failed = [r for r in ours if "error" in r]
        ours = [r for r in ours if "error" not in r]
        best = {}
        for stack in ("unsloth", "hf"):
            fitting = [r for r in results if r["stack"] == stack and _fits(r, budget)]
            best[stack] = max(fitting, key=lambda r: r["real_tokens_per_s"], default=None)
        if not ours:
            cell = f"failed: {failed[0]['error'][:60]}" if failed else "not run"
            lines.append(f"| {label} | {cell} | | | | | | |")
            continue
        slowest = min(ours, key=lambda r: r["real_tokens_per_s"])
        plan = _short_plan(slowest.get("plan") or "")
        flags = slowest["flags"] or "(default flags)"
        share = " / ".join(f"{r['real_tokens_per_s'] / bound(plan):.0%}" for r in ours)
        cells = "; ".join(_cell(r) + ("" if _fits(r, budget) else " (over budget)") for r in ours)
        u, h = best["unsloth"], best["hf"]
        ratio = f"{slowest['real_tokens_per_s'] / u['real_tokens_per_s']:.2f}" if u else ""
        lines.append(f"| {label} | `{flags}`: {plan} | {cells} | {share} | "
                     f"{u['variant'] if u else 'none fits'} | {_cell(u)} | "
                     f"{h['variant'] + ': ' + _cell(h) if h else 'none fits'} | {ratio} |")
    tokens = sorted({r.get("timed_tokens") for r in results if "error" not in r})
    lines.append("")
    lines.append(f"Timed tokens per run (steps 6-{gpu_bench.STEPS}): {', '.join(f'{t:,}' for t in tokens)}"
                 f"{' (identical)' if len(tokens) == 1 else ''}.")
    return "\n".join(lines)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "data":
        data(sys.argv[2])
    elif cmd == "cli":
        cli(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
    elif cmd == "merge":
        print(json.dumps(merge(sys.argv[2:]), indent=1))
    elif cmd == "table":
        print(table(json.load(open(sys.argv[2]))))
    else:
        sys.exit(__doc__)
