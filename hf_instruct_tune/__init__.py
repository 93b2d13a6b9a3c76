"""Instruction fine-tuning for the Hugging Face stack, EOS-safe by construction."""

__version__ = "0.1.0"
