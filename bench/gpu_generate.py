"""`generate` rows/s: the package (batched, with and without the shared prompt cache) beside plain transformers
generate loops (one row at a time, and batched with left padding), in one process, on the same prompt token ids,
the same max_new_tokens, greedy; and, in a process of its own, Unsloth's inference path.

The prompts are the bench's rows cut to 24-120 words after a shared 48-word preamble, rendered by the adapter's
saved template (`AdapterGenerator.encoder`), so every path decodes the same ids. A random-weight model seldom
emits the stop token, so every row generates about max_new_tokens tokens; the RESULT counts them.

usage (GPU):
  python bench/gpu_generate.py measure ADAPTER_DIR [--rows 16 --max-new-tokens 48 --batch-size 8] [--texts OUT.json]
  python bench/gpu_generate.py unsloth ADAPTER_DIR [same options] [--compare TEXTS.json]
      (a copy of the adapter recorded as trained with Unsloth, so `AdapterGenerator` takes Unsloth's path)
CPU check: python bench/gpu_generate.py measure ADAPTER_DIR --rows 4 --max-new-tokens 4 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
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
    from hf_instruct_tune.generation import AdapterGenerator

    generator, load_s = _timed(lambda: AdapterGenerator(args.adapter))
    print(f"loaded in {load_s:.1f} s on {generator.model.device}", flush=True)
    convs = conversations(args.rows)
    prompts = [generator.encoder.encode_prompt(c) for c in convs]
    for sharing in (True, False):  # warm-up: kernels, the allocator, both paths
        generator.generate(convs[:2], max_new_tokens=2, batch_size=2, prefix_sharing=sharing)
    texts = {}
    for sharing in (True, False):
        results, seconds = _timed(lambda: generator.generate(convs, max_new_tokens=args.max_new_tokens,
                                                             batch_size=args.batch_size, prefix_sharing=sharing))
        name = f"package, batch {args.batch_size}, prefix sharing {'on' if sharing else 'off'}"
        texts[name] = [r.text for r in results]
        new = sum(len(generator.tokenizer(r.text, add_special_tokens=False)["input_ids"]) for r in results)
        _result(name, seconds, len(convs), new, unsloth_inference=getattr(generator, "unsloth_inference", False),
                finished_by_stop=sum(r.finish_reason == "eos" for r in results))
    for batch in (args.batch_size, 1):
        outputs, seconds = _timed(lambda: _plain(generator, prompts, args.max_new_tokens, batch))
        name = f"transformers generate, batch {batch}" + (" (one row at a time)" if batch == 1 else ", left-padded")
        texts[name] = [generator.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        reference = texts[f"package, batch {args.batch_size}, prefix sharing off"]
        _result(name, seconds, len(convs), sum(map(len, outputs)),
                same_text_as_package=sum(a == b for a, b in zip(texts[name], reference)))
    if args.texts:
        with open(args.texts, "w") as fh:
            json.dump(texts, fh)


def unsloth(args) -> None:
    """The package's generate on a copy of the adapter recorded as an Unsloth run: `FastLanguageModel.for_inference`."""
    from hf_instruct_tune.generation import AdapterGenerator

    with tempfile.TemporaryDirectory() as folder:
        copy = os.path.join(folder, "adapter")
        shutil.copytree(args.adapter, copy)
        meta_file = os.path.join(copy, "hf_instruct_tune.json")
        meta = json.load(open(meta_file))
        meta.setdefault("training", {})["backend"] = "unsloth"
        json.dump(meta, open(meta_file, "w"))
        try:
            generator, load_s = _timed(lambda: AdapterGenerator(copy))
            convs = conversations(args.rows)
            generator.generate(convs[:2], max_new_tokens=2, batch_size=2)
            results, seconds = _timed(lambda: generator.generate(convs, max_new_tokens=args.max_new_tokens,
                                                                 batch_size=args.batch_size))
        except Exception as error:
            import traceback

            traceback.print_exc()
            print("RESULT " + json.dumps({"part": "generate", "path": "package, Unsloth inference",
                                          "error": f"{type(error).__name__}: {str(error)[:300]}"}), flush=True)
            return
        new = sum(len(generator.tokenizer(r.text, add_special_tokens=False)["input_ids"]) for r in results)
        extra = {"unsloth_inference": getattr(generator, "unsloth_inference", False), "load_s": round(load_s, 1)}
        if args.compare and os.path.exists(args.compare):
            reference = json.load(open(args.compare))[f"package, batch {args.batch_size}, prefix sharing off"]
            extra["same_text_as_package"] = sum(a == r.text for a, r in zip(reference, results))
        _result(f"package, batch {args.batch_size}, Unsloth inference", seconds, len(convs), new, **extra)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("measure", "unsloth"))
    parser.add_argument("adapter")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--texts", help="measure: write each path's texts here")
    parser.add_argument("--compare", help="unsloth: the texts `measure` wrote, to count equal answers")
    options = parser.parse_args()
    (measure if options.command == "measure" else unsloth)(options)
