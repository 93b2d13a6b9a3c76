"""`hf-instruct-tune train` for a run planned at its full length, stopped after its first steps.

The package decides some settings from the run's planned length (``compile_layers`` auto compiles the decoder
layers when the planned tokens pay the compilation back, ``hf_instruct_tune/layer_compilation.py``); a bench of 16
steps would only ever see a short run's decisions. Here the command line is the CLI's, with ``--max-steps`` the
planned length, and the run stops after ``BENCH_STOP_AFTER`` optimizer steps (the Trainer's own
``should_training_stop``: the adapter and ``hf_instruct_tune.json`` are written as at any run's end, with the
tokens/s of the steps after warm-up). At exit it prints the seconds torch.compile spent by phase, if it ran.
With ``BENCH_PROFILE_STEPS`` set it profiles that window too, as bench/profiled_train.py does. With
``BENCH_ACTIVATION_MEMORY_BUDGET`` (0-1) set, compiled layers are partitioned under torch's activation memory
budget (``torch._functorch.config.activation_memory_budget``: below 1, the compiled backward recomputes the
cheapest of what it would keep). `bench/gpu_frontier.py cli` runs it in place of the CLI when
``BENCH_PLANNED_STEPS`` is set.
"""

from __future__ import annotations

import os
import sys


def _stopping_callback(stop_after: int):
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= stop_after:
                control.should_training_stop = True

    return StopAfter()


def print_compile_times() -> None:
    """torch.compile's seconds by phase (Dynamo, AOTAutograd, Inductor), when anything was compiled."""
    if "torch" not in sys.modules:
        return
    from torch._dynamo.utils import compile_times

    table = compile_times(repr="str", aggregate=True)
    if len(table.strip().splitlines()) > 2:  # more than the header
        print("COMPILE_TIMES\n" + table, flush=True)


if __name__ == "__main__":
    from profiled_train import install  # this script's folder is first on sys.path

    if os.environ.get("BENCH_ACTIVATION_MEMORY_BUDGET"):
        import torch._functorch.config

        torch._functorch.config.activation_memory_budget = float(os.environ["BENCH_ACTIVATION_MEMORY_BUDGET"])
    stop_after = int(os.environ["BENCH_STOP_AFTER"])
    install(lambda: _stopping_callback(stop_after))
    if os.environ.get("BENCH_PROFILE_STEPS"):
        install()  # and a profiler window (bench/profiled_train.py)
    from hf_instruct_tune.cli import main

    try:
        code = main()
    finally:
        print_compile_times()
    sys.exit(code)
