"""Quiet output: no third-party warnings the user cannot act on.

Imports nothing heavy, so the command line can call it before a backend patches transformers.
"""

from __future__ import annotations

import logging
import re
import warnings

# (message regex, category, module regex): each names one warning that libraries raise about each other.
THIRD_PARTY_WARNINGS = [
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` on every model it wraps.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # PEFT looks up the base model's config online to decide whether embeddings changed; LoRA never changes them.
    (r"Could not find a config file in .* - will assume that the vocabulary was not modified", UserWarning,
     r"peft\.utils\.save_and_load"),
    # The same lookup without a network (a machine offline, HF_HUB_OFFLINE unset).
    (r"Unable to fetch remote file due to the following error .* lookup for the file config\.json in ", UserWarning,
     r"peft\.utils\.other"),
]


# (logger, message regex): each names one log record a library writes about an optional part of itself.
THIRD_PARTY_LOG_RECORDS = [
    # Liger Kernel tries its CuTe DSL kernels, an optional extra, before the Triton kernels it then runs.
    ("liger_kernel.backends.registry",
     r"^Backend impl '[\w.]*\._cutedsl\.[\w.]*' for op '\w+' could not be imported: ImportError"),
    # bitsandbytes, imported on a machine without a GPU, looks online for a CPU 4-bit kernel; the package loads
    # 4-bit weights on CUDA GPUs only.
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community"),
]


class _DroppedRecords(logging.Filter):
    """Drops the records whose message matches ``pattern``."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def filter_third_party_warnings() -> None:
    """Ignore exactly the warnings in :data:`THIRD_PARTY_WARNINGS` (by message, category and module) and the log
    records in :data:`THIRD_PARTY_LOG_RECORDS`."""
    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    filter_third_party_logs()


def filter_third_party_logs() -> None:
    """Drop exactly the log records in :data:`THIRD_PARTY_LOG_RECORDS`; run when the package is imported, before
    the libraries that write them."""
    for name, pattern in THIRD_PARTY_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DroppedRecords) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DroppedRecords(pattern))
