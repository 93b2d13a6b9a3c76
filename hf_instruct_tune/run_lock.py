"""One training run per output folder: an exclusive ``flock`` on ``.NAME.lock`` beside the folder.

The operating system releases the lock when the process ends, however it ends, so a crashed or killed
run never leaves a folder locked. The lock file sits beside the folder, not in it, because a finished
run replaces the folder by a rename.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import InputError


class OutputFolderLock:
    """Hold the lock of ``output_dir`` (``with OutputFolderLock(path):``); refuse at once if a live run holds it."""

    def __init__(self, output_dir: str | Path):
        output_dir = Path(output_dir).absolute()
        self.output_dir = output_dir
        self.path = output_dir.with_name(f".{output_dir.name}.lock")
        self._descriptor: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 32).decode("ascii", "replace").strip()
                os.close(descriptor)
                who = f" (process {holder})" if holder.isdigit() else ""
                raise InputError(f"another training run{who} is writing to this folder; wait for it to finish or "
                                 "choose another --output-dir", source=str(self.output_dir), field="output_dir") from None
            # The file may have been removed by the run that held it, just before it let go: lock the current one.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(descriptor).st_ino:
                break
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode())
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked, so no one holds a lock on a removed file
        os.close(self._descriptor)
        self._descriptor = None

    def __enter__(self) -> OutputFolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
