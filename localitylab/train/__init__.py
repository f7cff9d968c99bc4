"""Training: the loop, the recipe, checkpoints."""

from localitylab.train.checkpoint import RunInfo, load, read_checkpoint, save_checkpoint
from localitylab.train.config import TrainConfig
from localitylab.train.evaluation import evaluate, evaluate_checkpoint
from localitylab.train.loop import TrainResult, train

__all__ = ["RunInfo", "TrainConfig", "TrainResult", "evaluate", "evaluate_checkpoint", "load", "read_checkpoint", "save_checkpoint", "train"]
