"""The demo: train pit-n on digits and evaluate it (what `make demo` runs)."""

from __future__ import annotations

from pathlib import Path

from localitylab.train.config import TrainConfig
from localitylab.train.evaluate import evaluate_checkpoint
from localitylab.train.loop import train
from localitylab.train.progress import Reporter

# Short and enough for >= 90% test accuracy on 2 CPU cores in well under a minute.
DEMO_RECIPE = dict(epochs=15, batch_size=32, warmup_epochs=1)


def run_demo(out: str | Path = "runs/demo", device: str = "auto", reporter: Reporter | None = None) -> dict:
    config = TrainConfig("pit-n", "digits", out=Path(out) / "pit-n-digits", device=device, resume=True, **DEMO_RECIPE)
    result = train(config, reporter)
    return evaluate_checkpoint(result.checkpoint, device=device) | {"checkpoint": str(result.checkpoint)}
