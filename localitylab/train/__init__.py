"""Training: the loop, the recipe, checkpoints.

The names below load on first use, so that the recipe (`localitylab.train.config`, which the
CLI reads to build its options) can be imported without torch.
"""

import importlib

_WHERE = {
    "TrainedRun": "checkpoint", "load": "checkpoint", "read_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "TrainConfig": "config", "evaluate": "evaluation", "evaluate_checkpoint": "evaluation",
    "TrainResult": "loop", "train": "loop",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'localitylab.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"localitylab.train.{_WHERE[name]}"), name)
