"""Training throughput of the nano models on digits with localitylab's own loop.

Images/s is the median over epochs after the first (which pays for warm-up), measured by
the loop itself: time from the first to the last step of an epoch, evaluation excluded.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from localitylab.train import TrainConfig, train

MODELS = ("pit-n", "vit-n/2", "resnet-n")


def measure(model: str, epochs: int = 4, batch_size: int = 128, device: str = "cpu") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = train(TrainConfig(model, "digits", out=Path(tmp), epochs=epochs, batch_size=batch_size,
                                   warmup_epochs=0, device=device))
    rates = [row["images_per_s"] for row in result.history[1:]]
    return {"model": model, "data": "digits", "batch_size": batch_size, "device": device,
            "threads": torch.get_num_threads(), "images_per_s": statistics.median(rates),
            "epochs_timed": len(rates)}


def run(quick: bool = False) -> list[dict]:
    return [measure(m, epochs=2 if quick else 4) for m in MODELS]
