"""`generate` rows/s: the package (batched, with and without the shared prompt cache) beside plain transformers
generate loops (batched with left padding and, with --one-at-a-time, one row at a time), in one process, on the
same prompt token ids, the same max_new_tokens, greedy; the paths take turns and each is reported by its median.

The prompts are the bench's rows cut to 24-120 words after a shared 48-word preamble, rendered by the adapter's
saved template (`AdapterGenerator.encoder`), so every path decodes the same ids. A random-weight model seldom
emits the stop token, so every row generates about max_new_tokens tokens; the RESULT counts them.

usage (GPU):
  python bench/gpu_generate.py measure ADAPTER_DIR [--rows 16 --max-new-tokens 48 --batch-size 8 --repeats 3]
      [--one-at-a-time] [--texts OUT.json]
CPU check: python bench/gpu_generate.py measure ADAPTER_DIR --rows 4 --max-new-tokens 4 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_bench  # noqa: E402

PREAMBLE = " ".join(f"t{i}" for i in range(2000, 2048))


def conversations(rows: int) -> list[list[dict]]:
    rng = random.Random(1)
    out = []
    for row in gpu_bench.rows()[:rows]:
        words = row["text"].split()[: rng.randint(24, 120)]
        out.append([{"role": "user", "content": PREAMBLE + " " + " ".join(words)}])
    return out


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    start = time.perf_counter()
    value = fn()
    _sync()
    return value, time.perf_counter() - start


def _result(path: str, seconds: float, rows: int, new_tokens: int, **extra) -> dict:
    result = {"part": "generate", "path": path, "rows": rows, "seconds": round(seconds, 3),
              "rows_per_s": rows / seconds, "new_tokens": new_tokens, "new_tokens_per_s": new_tokens / seconds, **extra}
    print("RESULT " + json.dumps(result), flush=True)
    return result


def _plain(generator, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """transformers' `generate` on left-padded batches of `prompts` (batch_size 1: one row at a time)."""
    import torch

    model, pad, stop = generator.model, generator.tokenizer.pad_token_id, generator.encoder.stop_token_id
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        for row in out[:, width:].tolist():
            outputs.append(row[: row.index(stop)] if stop in row else row)
    return outputs


def measure(args) -> None:
    """Each path timed ``--repeats`` times, the paths taking turns (so none pays the warm-up alone or sees a
    different GPU state), and reported by the median."""
    import statistics

    from hf_instruct_tune.generation import AdapterGenerator

    generator, load_s = _timed(lambda: AdapterGenerator(args.adapter))
    print(f"loaded in {load_s:.1f} s on {generator.model.device}", flush=True)
    convs = conversations(args.rows)
    prompts = [generator.encoder.encode_prompt(c) for c in convs]
    package = f"package, batch {args.batch_size}, prefix sharing"
    paths = {
        f"{package} on": lambda: generator.generate(convs, max_new_tokens=args.max_new_tokens,
                                                     batch_size=args.batch_size, prefix_sharing=True),
        f"{package} off": lambda: generator.generate(convs, max_new_tokens=args.max_new_tokens,
                                                      batch_size=args.batch_size, prefix_sharing=False),
        f"transformers generate, batch {args.batch_size}, left-padded":
            lambda: _plain(generator, prompts, args.max_new_tokens, args.batch_size),
    }
    if args.one_at_a_time:
        paths["transformers generate, batch 1 (one row at a time)"] = lambda: _plain(
            generator, prompts, args.max_new_tokens, 1)
    for run in paths.values():  # warm-up: kernels and the allocator for every path's shapes
        run()
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    outputs: dict[str, object] = {}
    for _ in range(args.repeats):
        for name, run in paths.items():
            outputs[name], took = _timed(run)
            seconds[name].append(took)
    texts = {}
    reference_name = f"{package} off"
    for name, value in outputs.items():
        median = statistics.median(seconds[name])
        if name.startswith("package"):
            texts[name] = [r.text for r in value]
            new = sum(len(generator.tokenizer(r.text, add_special_tokens=False)["input_ids"]) for r in value)
            _result(name, median, len(convs), new, repeats=seconds[name],
                    finished_by_stop=sum(r.finish_reason == "eos" for r in value))
        else:
            texts[name] = [generator.tokenizer.decode(o, skip_special_tokens=True) for o in value]
            _result(name, median, len(convs), sum(map(len, value)), repeats=seconds[name],
                    same_text_as_package=sum(a == b for a, b in zip(texts[name], texts[reference_name])))
    if args.texts:
        with open(args.texts, "w") as fh:
            json.dump(texts, fh)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("measure",))
    parser.add_argument("adapter")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path, taking turns")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="also time transformers generate one row at a time (slow)")
    parser.add_argument("--texts", help="write each path's texts here")
    measure(parser.parse_args())
