"""Several processes (GPUs): ``--num-processes N`` re-launches through ``accelerate launch``; ranks log once.

There is no distributed layer here. ``accelerate launch`` or ``torchrun`` starts the processes and sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; the Trainer (through accelerate) wraps the model in DDP or FSDP,
shards the data and averages the loss. This module only:

- builds the ``accelerate launch`` command for ``--num-processes`` (:func:`relaunch_with_accelerate`);
- reads the rank from the environment before ``torch.distributed`` is set up (:func:`process_rank`,
  :func:`world_size`), for the choices made before the Trainer exists (the backend, the GPU to load on);
- keeps the other ranks quiet (:func:`quiet_replicas`), so each message and progress bar appears once;
- ends the process group after a finished run (:func:`end_process_group`), before the interpreter exits.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from .errors import InputError

logger = logging.getLogger(__name__)

_FLAG = "--num-processes"
ERROR_FILE_VARIABLE = "HF_INSTRUCT_TUNE_ERROR_FILE"


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


def end_process_group() -> None:
    """Destroy the default ``torch.distributed`` process group, if one is up.

    Called after a run that finished on this rank. A process that exits with the group still up leaves
    its backend's worker threads to die with the interpreter, which can abort the process (``terminate
    called without an active exception``, exit -6) after the work is done and fail the whole launch.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def fsdp_launched() -> bool:
    """True in a process that ``accelerate launch`` started with FSDP (before the Trainer exists)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in {"1", "true"}


def deepspeed_launched() -> bool:
    """True in a process that ``accelerate launch`` started with DeepSpeed (before the Trainer exists)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in {"1", "true"}


def accelerate_command(argv: list[str], num_processes: int, *, config_file: str | None = None) -> list[str]:
    """The ``accelerate launch`` command that runs ``hf-instruct-tune ARGV`` in ``num_processes`` processes.

    ``--num-processes`` is taken out of ``argv`` and ``--num-processes 1`` appended, so that a
    ``num_processes`` key in a YAML config does not make each worker launch again. With ``config_file``
    (``--fsdp`` writes one), that accelerate config decides. Else with a saved accelerate config
    (``accelerate config``), that config chooses DDP, FSDP or DeepSpeed and the mixed precision; without one,
    the processes run plain DDP (``--multi_gpu``, which on a machine without GPUs means CPU processes over
    gloo) on a free port.
    """
    from accelerate.commands.config import default_config_file

    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if config_file:
        command += ["--config_file", config_file]
    elif not os.path.isfile(default_config_file):
        command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", "0"]
    return [*command, "-m", "hf_instruct_tune", *_without_num_processes(argv), _FLAG, "1"]


def relaunch_with_accelerate(argv: list[str], num_processes: int, *, fsdp: bool = False) -> int:
    """Run ``hf-instruct-tune ARGV`` again under ``accelerate launch`` with ``num_processes`` processes.

    With ``fsdp``, through the FSDP2 config of :mod:`hf_instruct_tune.fsdp`, written to a temporary file.
    Returns the launcher's exit code (128 + N when it was killed by signal N). On Ctrl-C the workers
    save a checkpoint and stop; this waits for them.
    """
    if world_size() > 1:
        raise InputError(f"this process is already one of {world_size()} started by a launcher; drop "
                         "--num-processes (or `num_processes:` in the config) and let the launcher set the count",
                         field="num_processes")
    with tempfile.TemporaryDirectory(prefix="hf-instruct-tune-launch-") as scratch:
        config_file = None
        if fsdp:
            from .fsdp import write_accelerate_config

            config_file = str(write_accelerate_config(os.path.join(scratch, "accelerate_fsdp.yaml"), num_processes))
        command = accelerate_command(argv, num_processes, config_file=config_file)
        logger.info("Launching %d processes%s: %s", num_processes, " with FSDP" if fsdp else "", shlex.join(command))
        error_file = os.path.join(scratch, "exit_code")
        process = subprocess.Popen(command, env={**os.environ, ERROR_FILE_VARIABLE: error_file}, stderr=subprocess.PIPE)
        forwarding = threading.Thread(target=_forward_stderr, args=(process.stderr, error_file), daemon=True)
        forwarding.start()
        try:
            code = _wait(process)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for the checkpoint
            process.send_signal(signal.SIGTERM)
            code = _wait(process)
        forwarding.join(timeout=10)
        if os.path.isfile(error_file):  # the workers' own exit code, not the launcher's summary of it
            return int(Path(error_file).read_text() or 1)
    return 128 - code if code < 0 else code


def report_error_to_launcher(exit_code: int) -> None:
    """Record the exit code of an error already printed by rank 0, for :func:`relaunch_with_accelerate`."""
    path = os.environ.get(ERROR_FILE_VARIABLE)
    if path and process_rank() == 0:
        Path(path).write_text(str(exit_code))


def _forward_stderr(stream, error_file: str) -> None:
    """Pass the workers' stderr through; once they reported an error, keep only ``error:`` lines.

    What follows a worker's one-line error is the launcher's account of the failed worker (a traceback).
    """
    target = sys.stderr.buffer
    while chunk := os.read(stream.fileno(), 65536):
        if os.path.isfile(error_file):
            chunk = b"".join(line for line in chunk.splitlines(keepends=True) if line.startswith(b"error:"))
        target.write(chunk)
        target.flush()


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
