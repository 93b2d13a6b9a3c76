"""``InstructConfig``: ``trl.SFTConfig`` with defaults that run on any machine, a CPU included."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig


def bf16_supported() -> bool:
    """Whether this machine has a CUDA GPU that computes in bfloat16."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class InstructConfig(SFTConfig):
    """``SFTConfig`` with defaults that work everywhere; every other field and default is ``SFTConfig``'s.

    - ``bf16``: on where a CUDA GPU supports it, off otherwise. ``SFTConfig`` turns it on everywhere, so
      ``SFTConfig(output_dir=...)`` fails on a CPU with "Your setup doesn't support bf16/gpu".
    - ``gradient_checkpointing``: off unless asked for (``SFTConfig`` turns it on), which also keeps
      transformers' deprecation warning about that name away.
    - ``dataloader_pin_memory``: on with a CUDA GPU only (pinning memory means nothing on a CPU, and warns).
    """

    bf16: bool | None = field(default=None, metadata={
        "help": "Train in bfloat16 mixed precision. Default: on where a CUDA GPU supports it, off on CPU."})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "Recompute activations in backward to save memory. Default: off."})
    dataloader_pin_memory: bool | None = field(default=None, metadata={
        "help": "Pin data-loader memory for faster host-to-GPU copies. Default: on with a CUDA GPU, off on CPU."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.fp16 and bf16_supported()
        if self.dataloader_pin_memory is None:
            import torch

            self.dataloader_pin_memory = torch.cuda.is_available()
        super().__post_init__()
