"""Which files in an output folder a run wrote, so that only those are ever replaced, removed or published.

A run lists the files it wrote in its ``hf_instruct_tune.json`` (``files``). Anything else in the folder
is the user's: ``train --overwrite`` keeps it, ``upload`` leaves it out unless named with ``--include``.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

from .errors import InputError
from .metadata import METADATA_FILE_NAME

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_FILE = "adapter_model.safetensors"
# What a run writes, for folders written before runs listed their files.
RUN_FILE_PATTERNS = ("adapter_config.json", "adapter_model.safetensors", METADATA_FILE_NAME, "prompt_template.jinja",
                     "README.md", "loss_curve.png", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                     "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                     "vocab.json", "merges.txt", "training_args.bin", CHECKPOINTS_DIR)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: str | Path) -> None:
    """Give ``path`` the permissions of a normally created file (``0666`` less the umask, usually ``0644``).

    Files written through a temporary file (``mkstemp``) are created ``0600``; renamed into place they
    would stay unreadable to the group and others, unlike every other file of the run.
    """
    os.chmod(path, 0o666 & ~_umask())


def file_state(folder: str | Path) -> dict[str, tuple[int, int, int]]:
    """``{relative name: (inode, size, mtime)}`` for the files under ``folder``, to tell later what changed."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    state = {}
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            state[path.relative_to(folder).as_posix()] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return state


def written_since(folder: str | Path, before: dict[str, tuple[int, int, int]]) -> list[str]:
    """The files under ``folder`` created or rewritten since ``before`` (a :func:`file_state`)."""
    after = file_state(folder)
    return sorted(name for name, state in after.items() if before.get(name) != state)


def run_files(folder: str | Path) -> list[str] | None:
    """The files the run in ``folder`` recorded writing, or ``None`` when it recorded none."""
    from .metadata import TrainingMetadata

    folder = Path(folder)
    try:
        files = TrainingMetadata.load(folder).files
    except InputError:
        return None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return files


def is_run_file(name: str, recorded: list[str] | None) -> bool:
    """Whether the relative path ``name`` was written by a run (per ``recorded``, else by name)."""
    top = name.split("/", 1)[0]
    if top == CHECKPOINTS_DIR:
        return True
    if recorded is not None:
        return name in recorded or top in {entry.split("/", 1)[0] for entry in recorded if "/" in entry}
    return any(fnmatch.fnmatch(top, pattern) for pattern in RUN_FILE_PATTERNS)


def is_previous_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds what ``train`` writes: an adapter, its metadata, or a ``checkpoints`` folder with a
    run's checkpoint in it (a ``checkpoints`` folder of other files is the user's)."""
    from .checkpoints import holds_run_checkpoints

    folder = Path(folder)
    return (any((folder / name).exists() for name in ("adapter_config.json", METADATA_FILE_NAME))
            or holds_run_checkpoints(folder))


def foreign_entries(folder: str | Path) -> list[str]:
    """The top-level entries of ``folder`` that no run wrote (the user's own files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    recorded = run_files(folder)
    return sorted(path.name for path in folder.iterdir() if not is_run_file(path.name, recorded))


def check_output_dir(output_dir: Path) -> None:
    """Refuse a non-empty ``output_dir`` that is not a previous run's: its files are the user's."""
    if not output_dir.is_dir() or is_previous_run(output_dir):
        return
    entries = sorted(path.name for path in output_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise InputError(f"is not empty and holds no earlier run ({shown}); train writes only into a new or empty "
                         "folder or an earlier run's, so choose another --output-dir", source=str(output_dir),
                         field="output_dir")


def install_run(staged: Path, target: Path) -> None:
    """Put the run saved in ``staged`` at ``target`` by renames, keeping the user's files that ``target`` holds.

    ``target`` is never a half-written run: the old folder is renamed aside, ``staged`` renamed into place,
    then the user's files are moved back in, and only what the old run wrote is removed.
    """
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    keep = foreign_entries(target)
    if target.exists():
        os.rename(target, aside)
    try:
        os.rename(staged, target)
    except BaseException:
        if aside.exists() and not target.exists():
            os.rename(aside, target)
        raise
    for name in keep:
        if not (target / name).exists():
            os.rename(aside / name, target / name)
    if aside.exists() and not foreign_entries(aside):  # only the old run's files are left
        shutil.rmtree(aside, ignore_errors=True)


def untrained_lora(adapter_file: str | Path) -> bool:
    """Whether a LoRA adapter never moved from its initialization: it has ``lora_B`` weights and all are 0.

    PEFT initializes ``lora_B`` to zeros, so such an adapter changes nothing: it is the base model. ``False``
    when the file cannot be read as safetensors or has no ``lora_B`` weights (nothing to conclude).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(adapter_file), framework="pt") as weights:
            names = [name for name in weights.keys() if "lora_B" in name]
            return bool(names) and all(not weights.get_tensor(name).any() for name in names)
    except Exception:  # a file that is not safetensors is for others to refuse
        return False
