"""`hf-instruct-tune` with a torch.profiler window over a few training steps, on every process.

The command line is the CLI's (`python bench/profiled_train.py train --model ...`, or under `accelerate launch
... bench/profiled_train.py train ...`); the window is ``BENCH_PROFILE_STEPS`` ("FIRST:LAST", optimizer steps,
1-based, default "8:9"), and each process writes ``BENCH_PROFILE_OUT/profile_rank{R}.json``: the window's wall
seconds, device time by category (kernels summed over streams: NCCL collectives apart from compute), the share of
the wall time the compute stream was busy, the CPU time of the optimizer step, and the top operators by device and
by CPU time. The window's Chrome trace is kept gzipped beside it, and where its GPU sat idle
(bench/trace_gaps.py) is in the summary's "gaps". `bench/gpu_frontier.py cli` runs it in place of the CLI when
``BENCH_PROFILE_STEPS`` is set.

usage: python bench/profiled_train.py summary DIR   -> one line per profile found in DIR
"""

from __future__ import annotations

import json
import os
import sys
import time

NCCL_MARKERS = ("nccl", "allgather", "reducescatter", "allreduce")
COPY_MARKERS = ("memcpy", "memset", "copy", "chunk_cat", "split_with_sizes")


def _window() -> tuple[int, int]:
    first, _, last = os.environ.get("BENCH_PROFILE_STEPS", "8:9").partition(":")
    return int(first), int(last or first)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def _busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of ``intervals`` (start, end) in microseconds."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy / 1e6


def summarize(prof, wall_s: float, steps: int) -> dict:
    """What one process's profiler window shows."""
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kinds: dict[str, list] = {"nccl": [], "copy": [], "compute": []}
    for event in kernels:
        name = event.name.lower()
        kind = ("nccl" if any(m in name for m in NCCL_MARKERS) else
                "copy" if any(m in name for m in COPY_MARKERS) else "compute")
        kinds[kind].append(event)
    nccl, copies, compute = kinds["nccl"], kinds["copy"], kinds["compute"]
    span = lambda events: _busy_seconds([(e.time_range.start, e.time_range.end) for e in events])  # noqa: E731
    optimizer_cpu = sum(e.cpu_time_total for e in prof.events() if e.name.startswith("Optimizer.step")) / 1e6
    table = prof.key_averages()
    by_device = sorted(table, key=lambda e: -e.self_device_time_total)[:20]
    by_cpu = sorted(table, key=lambda e: -e.self_cpu_time_total)[:20]
    return {
        "rank": _rank(), "steps": steps, "wall_s": round(wall_s, 4), "step_s": round(wall_s / steps, 4),
        "kernels": len(kernels) // steps,
        "compute_busy_s": round(span(compute) / steps, 4), "nccl_busy_s": round(span(nccl) / steps, 4),
        "copy_busy_s": round(span(copies) / steps, 4), "any_busy_s": round(span(kernels) / steps, 4),
        "compute_share_of_wall": round(span(compute) / wall_s, 3),
        "optimizer_step_cpu_s": round(optimizer_cpu / steps, 4),
        "top_device": [(e.key[:90], round(e.self_device_time_total / 1e3 / steps, 2), e.count // steps)
                       for e in by_device],
        "top_cpu": [(e.key[:90], round(e.self_cpu_time_total / 1e3 / steps, 2), e.count // steps) for e in by_cpu],
    }


def _gaps(prof, steps: int, out: str) -> dict:
    """Where the window's GPU sat idle (bench/trace_gaps.py), from its Chrome trace (kept, gzipped, in ``out``)."""
    import gzip
    import shutil

    from trace_gaps import analyze  # this script's folder is first on sys.path

    path = os.path.join(out, f"trace_rank{_rank()}.json")
    prof.export_chrome_trace(path)
    with open(path) as fh:
        gaps = analyze(json.load(fh), steps)
    with open(path, "rb") as raw, gzip.open(path + ".gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    os.remove(path)
    return gaps


def _profiling_callback():
    import torch
    from transformers import TrainerCallback

    first, last = _window()

    class StepProfile(TrainerCallback):
        def __init__(self):
            self.prof = None
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == first and self.prof is None:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == last:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                wall = time.perf_counter() - self.start
                self.prof.__exit__(None, None, None)
                out = os.environ.get("BENCH_PROFILE_OUT", ".")
                os.makedirs(out, exist_ok=True)
                summary = summarize(self.prof, wall, last - first + 1)
                summary["gaps"] = _gaps(self.prof, last - first + 1, out)
                with open(os.path.join(out, f"profile_rank{_rank()}.json"), "w") as fh:
                    json.dump(summary, fh, indent=1)
                self.prof = None

    return StepProfile()


def install(make_callback=None) -> None:
    """Give every Trainer built in this process a callback from ``make_callback`` (the profiling one by default)."""
    import transformers

    make_callback = make_callback or _profiling_callback
    original = transformers.Trainer.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(make_callback())

    transformers.Trainer.__init__ = __init__


def summary(folder: str) -> None:
    for name in sorted(os.listdir(folder)):
        if name.startswith("profile_rank") and name.endswith(".json"):
            data = json.load(open(os.path.join(folder, name)))
            print(json.dumps({k: v for k, v in data.items() if not k.startswith("top_") and k != "gaps"}))
            if "gaps" in data:
                print("  gaps: " + json.dumps(data["gaps"], indent=1).replace("\n", "\n  "))
            for key in ("top_device", "top_cpu"):
                print(f"  {key}:")
                for row in data[key][:12]:
                    print(f"    {row[1]:9.2f} ms x{row[2]:<5} {row[0]}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["summary"]:
        summary(sys.argv[2])
        sys.exit(0)
    install()
    from hf_instruct_tune.cli import main

    sys.exit(main())
