"""The training-loss plot for the model card (``loss_curve.png``), when matplotlib is installed."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PLOT_FILE_NAME = "loss_curve.png"


def plot_loss_curve(loss_history: list[dict], path: str | Path) -> Path | None:
    """Plot ``[{"step", "loss"}, ...]`` to ``path``; return the path, or ``None`` without matplotlib or data."""
    points = [(entry["step"], entry["loss"]) for entry in loss_history or [] if entry.get("loss") is not None]
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no loss curve in the card (pip install 'hf_instruct_tune[plot]').")
        return None
    path = Path(path)
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        axes.plot([s for s, _ in points], [loss for _, loss in points], marker="o" if len(points) < 30 else None)
        axes.set_xlabel("step")
        axes.set_ylabel("training loss")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, metadata={"Software": None})
    finally:
        plt.close(figure)
    return path
