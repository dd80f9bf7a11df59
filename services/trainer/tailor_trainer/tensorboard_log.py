"""TensorBoard event files of a fine-tuning run (`tensorboard: true` in the method's config).

Written by TensorBoard's own writer (PyTorch's `torch.utils.tensorboard.SummaryWriter`, which needs the
`tensorboard` package) into the adapter artifact's `runs/` folder once training has finished, from the
whole run's history (steps before a resume included, which a writer started at the resume would miss):
per step the training loss and learning rate, per evaluation the held-out loss, the run's tokens/s, and
the config as text. Read them with `tailor artifacts get <adapter> --out a && tensorboard --logdir a/runs`.
Not live: a worker's staging folder is not reachable from outside, so nothing is streamed while it trains
(`tailor pipeline watch` shows the live numbers)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from tailor_runtime.errors import FailedPrecondition

RUNS = "runs"


def require_tensorboard() -> None:
    """Refuse before training starts, not after it, when the writer cannot be imported."""
    if importlib.util.find_spec("tensorboard") is None:
        raise FailedPrecondition(
            "tensorboard: true needs the tensorboard package on the trainer worker (pip install "
            "tensorboard, or the trainer image built from requirements.txt); set tensorboard: false"
        )


def write_run(folder: Path, result: Any, config: dict[str, Any], tokens_per_s: float) -> Path:
    """Write the run's event files into `folder` (created); returns it."""
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for step, (loss, rate) in enumerate(zip(result.losses, result.learning_rates, strict=False), start=1):
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/learning_rate", rate, step)
        for step, loss in result.eval_losses:
            writer.add_scalar("eval/loss", loss, step)
        if result.eval_loss is not None and not result.eval_losses:
            writer.add_scalar("eval/loss", result.eval_loss, len(result.losses))
        writer.add_scalar("train/tokens_per_s", tokens_per_s, len(result.losses))
        writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```")
    finally:
        writer.close()
    return folder
