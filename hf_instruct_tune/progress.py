"""Training log lines for people: ``step 3/60  loss 1.2345  lr 2.00e-04`` instead of Python dicts of strings."""

from __future__ import annotations

from transformers.trainer_callback import ProgressCallback


def format_log(logs: dict, max_steps: int) -> str:
    """One trainer log entry as a line: ``step 3/60  loss 1.2345  grad norm 0.61  lr 2.00e-04  epoch 1.50``."""
    step = logs.get("step")
    if "train_runtime" in logs:
        parts = [f"done in {logs['train_runtime']:.0f} s"]
        if logs.get("train_loss") is not None:
            parts.append(f"mean loss {logs['train_loss']:.4f}")
        return ", ".join(parts)
    parts = [f"step {step}/{max_steps}"] if step is not None else []
    labels = [("loss", "loss", "{:.4f}"), ("eval_loss", "eval loss", "{:.4f}"), ("grad_norm", "grad norm", "{:.3g}"),
              ("learning_rate", "lr", "{:.2e}"), ("epoch", "epoch", "{:.2f}")]
    for key, label, pattern in labels:
        value = logs.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {pattern.format(value)}")
    return "  ".join(parts)


class ReadableProgressCallback(ProgressCallback):
    """transformers' progress bar, with log lines such as ``step 3/60  loss 1.2345`` instead of Python dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            line = format_log({**logs, "step": state.global_step}, state.max_steps)
            if line:
                self.training_bar.write(line)
