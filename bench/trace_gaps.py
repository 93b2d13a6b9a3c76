"""Where a profiled window's GPU sat idle, from its Chrome trace (`torch.profiler`'s `export_chrome_trace`).

A gap is a stretch of the window in which no kernel, copy or fill ran on any stream. Each gap is charged to the
kernel that ended it: "launched late" when the CPU launched that kernel during the gap (the GPU had run out of
queued work), "queued" when it was launched before (the GPU waited on something else: an event, another stream),
"unmatched" when the trace holds no launch for it. Launches are the CUDA runtime's and the driver's (Triton's
kernels are launched through ``cuLaunchKernelEx``).
A late launch is charged to the CPU operators enclosing it (the innermost three, and the phase: forward, backward,
optimizer); the host-device synchronizations of the window (``cudaStreamSynchronize``, blocking copies) are listed
with their enclosing operators, since each one empties the GPU's queue.

usage: python bench/trace_gaps.py TRACE.json [STEPS]   -> the summary as JSON
"""

from __future__ import annotations

import bisect
import json
import sys
from collections import defaultdict

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync")
MIN_GAP_US = 5.0


def _phase(stack: list[str]) -> str:
    if any(name.startswith("Optimizer.") for name in stack):
        return "optimizer"
    if any(name.startswith("autograd::engine::evaluate_function") for name in stack):
        return "backward"
    return "forward/other"


class _Stacks:
    """The CPU operators enclosing a time on a thread."""

    def __init__(self, ops: list[dict]):
        self.by_thread: dict = defaultdict(list)
        for op in ops:
            self.by_thread[(op.get("pid"), op.get("tid"))].append((op["ts"], op["ts"] + op.get("dur", 0), op["name"]))
        self.starts = {}
        for key, spans in self.by_thread.items():
            spans.sort(key=lambda s: (s[0], -s[1]))
            self.starts[key] = [s[0] for s in spans]

    def at(self, thread, time: float, depth_limit: int = 4000) -> list[str]:
        spans, starts = self.by_thread.get(thread, []), self.starts.get(thread, [])
        stop = bisect.bisect_right(starts, time)
        enclosing = [s for s in spans[max(0, stop - depth_limit):stop] if s[1] >= time]
        return [name for _, _, name in enclosing]  # outermost first


def analyze(trace: dict, steps: int = 1) -> dict:
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("cat") in LAUNCH_CATEGORIES]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    if not device:
        return {"error": "no device events in the trace"}
    launches = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    stacks = _Stacks(ops)

    gaps, busy_end, busy = [], device[0]["ts"], 0.0
    for event in device:
        start, end = event["ts"], event["ts"] + event.get("dur", 0)
        if start - busy_end > MIN_GAP_US:
            gaps.append((busy_end, start, event))
        if end > busy_end:
            busy += end - max(start, busy_end)
            busy_end = end
    window = busy_end - device[0]["ts"]

    by_site: dict = defaultdict(lambda: [0.0, 0])
    by_phase: dict = defaultdict(float)
    late = queued = unmatched = 0.0
    for gap_start, gap_end, event in gaps:
        length = gap_end - gap_start
        launch = launches.get(event.get("args", {}).get("correlation"))
        if launch is None:
            unmatched += length
            site = ("unmatched", event["name"][:60])
        elif launch["ts"] < gap_start:
            queued += length
            site = ("queued", event["name"][:60])
        else:
            late += length
            stack = stacks.at((launch.get("pid"), launch.get("tid")), launch["ts"])
            by_phase[_phase(stack)] += length
            site = (_phase(stack), " < ".join(reversed(stack[-3:])) or launch["name"])
        by_site[site][0] += length
        by_site[site][1] += 1

    syncs: dict = defaultdict(lambda: [0, 0.0])
    for call in runtime:
        if call["name"] in SYNC_CALLS and (call["name"] != "cudaMemcpyAsync" or call.get("dur", 0) > 50):
            stack = stacks.at((call.get("pid"), call.get("tid")), call["ts"])
            key = call["name"] + ": " + (" < ".join(reversed(stack[-3:])) or "-")
            syncs[key][0] += 1
            syncs[key][1] += call.get("dur", 0)

    per_step = lambda us: round(us / 1e3 / steps, 2)  # noqa: E731  milliseconds a step
    return {
        "steps": steps, "window_ms_per_step": per_step(window), "busy_ms_per_step": per_step(busy),
        "idle_ms_per_step": per_step(window - busy), "gaps_per_step": len(gaps) // steps,
        "late_launch_idle_ms_per_step": per_step(late), "queued_idle_ms_per_step": per_step(queued),
        "unmatched_idle_ms_per_step": per_step(unmatched),
        "late_launch_idle_by_phase_ms": {k: per_step(v) for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
        "top_idle_sites": [(phase, site, per_step(total), count // steps or count)
                           for (phase, site), (total, count) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:25]],
        "syncs": [(key, count, round(dur / 1e3, 2)) for key, (count, dur) in
                  sorted(syncs.items(), key=lambda kv: -kv[1][1])[:15]],
    }


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        result = analyze(json.load(fh), int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print(json.dumps(result, indent=1))
