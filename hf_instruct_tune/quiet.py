"""Quiet output: no third-party warnings the user cannot act on.

Imports nothing heavy, so the command line can call it before a backend patches transformers.
"""

from __future__ import annotations

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


def filter_third_party_warnings() -> None:
    """Ignore exactly the warnings in :data:`THIRD_PARTY_WARNINGS` (by message, category and module)."""
    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
