"""Several processes (GPUs): ``--num-processes N`` re-launches through ``accelerate launch``; ranks log once.

There is no distributed layer here. ``accelerate launch`` or ``torchrun`` starts the processes and sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; the Trainer (through accelerate) wraps the model in DDP or FSDP,
shards the data and averages the loss. This module only:

- builds the ``accelerate launch`` command for ``--num-processes`` (:func:`relaunch_with_accelerate`);
- reads the rank from the environment before ``torch.distributed`` is set up (:func:`process_rank`,
  :func:`world_size`), for the choices made before the Trainer exists (the backend, the GPU to load on);
- keeps the other ranks quiet (:func:`quiet_replicas`), so each message and progress bar appears once.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import warnings

from .errors import InputError

logger = logging.getLogger(__name__)

_FLAG = "--num-processes"


def process_rank() -> int:
    """This process's global rank as set by ``torchrun``, ``accelerate launch`` or MPI; 0 when not launched."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def world_size() -> int:
    """The number of processes in this run as the launcher set it; 1 when not launched."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def local_rank() -> int:
    """This process's index on its machine (the GPU it uses); 0 when not launched."""
    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def quiet_replicas() -> None:
    """On every rank but 0, show only errors from this package, no Python warnings and no progress bars.

    Every rank runs the same code on the same data, so their messages (the detected formatter, dropped
    rows, deprecations, ...) are rank 0's again. transformers' own replica level is the Trainer's
    ``log_level_replica``; this also covers what happens before the Trainer exists (model loading).
    """
    if process_rank() == 0:
        return
    logging.getLogger("hf_instruct_tune").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_warning()
    except ImportError:  # the core dependencies; absent only in a partial install
        pass


FSDP_LAUNCH_OPTIONS = [
    "--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
    "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "FULL_STATE_DICT",
    "--fsdp_use_orig_params", "false", "--fsdp_cpu_ram_efficient_loading", "true",
    "--fsdp_sync_module_states", "true", "--fsdp_offload_params", "false", "--fsdp_backward_prefetch", "BACKWARD_PRE",
    "--mixed_precision", "bf16",
]
"""``accelerate launch`` options of ``--fsdp``: FSDP1 with flat parameters (``use_orig_params=False``, which
with peft's wrap policy keeps each LoRA weight in its own unit and is what lets a 4-bit base shard), one unit
per decoder layer, the whole adapter gathered on process 0 for saving, the base read from disk once."""


def fsdp_launched() -> bool:
    """True in a process that ``accelerate launch`` started with FSDP (before the Trainer exists)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in {"1", "true"}


def accelerate_command(argv: list[str], num_processes: int, *, fsdp: bool = False) -> list[str]:
    """The ``accelerate launch`` command that runs ``hf-instruct-tune ARGV`` in ``num_processes`` processes.

    ``--num-processes`` is taken out of ``argv`` and ``--num-processes 1`` appended, so that a
    ``num_processes`` key in a YAML config does not make each worker launch again. With ``fsdp``, the
    processes run FSDP (:data:`FSDP_LAUNCH_OPTIONS`). Otherwise, with an accelerate config
    (``accelerate config``), that config chooses DDP, FSDP or DeepSpeed and the mixed precision; without one,
    the processes run plain DDP (``--multi_gpu``, which on a machine without GPUs means CPU processes over
    gloo). Either way on a free port.
    """
    from accelerate.commands.config import default_config_file

    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if fsdp:
        command += [*FSDP_LAUNCH_OPTIONS, "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", "0"]
    elif not os.path.isfile(default_config_file):
        command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", "0"]
    return [*command, "-m", "hf_instruct_tune", *_without_num_processes(argv), _FLAG, "1"]


def relaunch_with_accelerate(argv: list[str], num_processes: int, *, fsdp: bool = False) -> int:
    """Run ``hf-instruct-tune ARGV`` again under ``accelerate launch`` with ``num_processes`` processes.

    Returns the launcher's exit code (128 + N when it was killed by signal N). On Ctrl-C the workers
    save a checkpoint and stop; this waits for them.
    """
    if world_size() > 1:
        raise InputError(f"this process is already one of {world_size()} started by a launcher; drop "
                         "--num-processes (or `num_processes:` in the config) and let the launcher set the count",
                         field="num_processes")
    command = accelerate_command(argv, num_processes, fsdp=fsdp)
    logger.info("Launching %d processes: %s", num_processes, shlex.join(command))
    process = subprocess.Popen(command)
    try:
        code = _wait(process)
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for the checkpoint
        process.send_signal(signal.SIGTERM)
        code = _wait(process)
    return 128 - code if code < 0 else code


def _wait(process: subprocess.Popen) -> int:
    try:
        return process.wait()
    except KeyboardInterrupt:  # the workers got the same Ctrl-C; they save a checkpoint and exit
        return process.wait()


def _without_num_processes(argv: list[str]) -> list[str]:
    """``argv`` without ``--num-processes N`` / ``--num-processes=N`` (or an abbreviation argparse accepts)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name, has_value, _ = arg.partition("=")
        if len(name) > len("--n") and _FLAG.startswith(name):
            skip = not has_value
            continue
        kept.append(arg)
    return kept
