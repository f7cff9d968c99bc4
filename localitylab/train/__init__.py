"""Training: the loop, the recipe, checkpoints."""

from localitylab.train.checkpoint import RunInfo, load, read_checkpoint, save_checkpoint
from localitylab.train.config import TrainConfig
from localitylab.train.loop import TrainResult, evaluate, train

__all__ = ["RunInfo", "TrainConfig", "TrainResult", "evaluate", "load", "read_checkpoint", "save_checkpoint", "train"]
