"""``hf-instruct-tune train``: fine-tune a LoRA adapter on instruction data."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..config import TrainConfig, field_type
from ..errors import InputError

EXAMPLES = """examples:
  hf-instruct-tune train --data examples/dataset.json --template alpaca-zh --output-dir outputs/sentiment
  hf-instruct-tune train config.yaml --max-steps 100
  hf-instruct-tune train --model meta-llama/Meta-Llama-3-8B --data data.jsonl --load-in-4bit --packing \\
      --push-to you/llama3-sentiment-lora
  hf-instruct-tune train config.yaml --num-processes 2 --fsdp    # a base too large for one GPU
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="Fine-tune a LoRA adapter.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a LoRA adapter with EOS-safe labels. Options can also come from a YAML file; "
                    "flags override it.")
    parser.add_argument("config", nargs="?", help="A YAML file of options (keys as below, with underscores).")
    for item in dataclasses.fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        kind = field_type(item)
        help_text = item.metadata.get("help", "")
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        if kind is not bool and default is not None and default != "":
            help_text += f" (default: {','.join(default) if isinstance(default, list) else default})"
        elif kind is bool and default is not None and "default" not in help_text.lower():
            help_text += f" (default: {'on' if default else 'off'})"
        if kind is bool:
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=item.name, default=argparse.SUPPRESS, metavar=item.name.upper(),
                                help=help_text, **({"type": str} if kind in (list, str) else {}))
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..config import build_config

    names = {item.name for item in dataclasses.fields(TrainConfig)}
    overrides = {name: value for name, value in vars(args).items() if name in names}
    config = build_config(args.config, overrides)
    if config.fsdp:
        import torch

        if not torch.cuda.is_available():
            raise InputError("--fsdp needs CUDA GPUs (accelerate runs FSDP on GPUs only); without them, "
                             "--num-processes N alone trains in N CPU processes", field="fsdp")
    if config.num_processes and config.num_processes > 1:
        from ..launch import relaunch_with_accelerate

        return relaunch_with_accelerate(sys.argv[1:] if args.argv is None else args.argv, config.num_processes,
                                        fsdp=config.fsdp)
    if config.fsdp:
        from ..launch import fsdp_launched

        if not fsdp_launched():
            raise InputError("--fsdp shards the model across processes: add --num-processes N (N >= 2), or start "
                             "the command with `accelerate launch --config_file examples/accelerate_fsdp.yaml`",
                             field="fsdp")
    # the package's default allocator setting, set before CUDA starts: less fragmentation at the same peak
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    from ..backends import import_backend_early

    import_backend_early(config.backend)  # Unsloth must patch transformers before anything imports it
    from ..launch import end_process_group, process_rank
    from ..training import run_training

    result = run_training(config)
    end_process_group()
    if process_rank() != 0:  # rank 0 reports for a multi-process run
        return 0
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    steps = f"{result.global_step} step{'' if result.global_step == 1 else 's'}"
    print(f"Trained {steps}{loss}. Adapter saved to {result.output_dir}", file=sys.stderr)
    if not result.adapter_moved:
        print("warning: the adapter did not move: every LoRA B matrix is still 0, so it generates exactly like the "
              "base model (were all steps warm-up? see --warmup-steps, --max-steps, --lr). 'upload' refuses it "
              "unless given --force.", file=sys.stderr)
    return 0
