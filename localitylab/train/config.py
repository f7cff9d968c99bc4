"""The training recipe: every setting of `localitylab train`, with its default and why.

Default recipe (DeiT's, as used for ViTs trained from scratch, scaled to small data):
AdamW, lr 1e-3 at batch 128, weight decay 0.05 (none on biases, norms, position
embeddings and [cls]), 5 epochs of linear warm-up from 1e-6, cosine decay to 1e-5 per step,
label smoothing 0.1, gradient clipping at norm 1.0, random crop with padding (1/8 of the
side) and horizontal flips where the data set allows; mixup/cutmix and drop-path are off
by default and available as options. The PiT paper (arXiv 2406.09415) trains its CIFAR
models far longer (the 2,400-epoch recipe); its exact augmentation settings are not
reproduced here: `studies/pit_vs_vit_cifar100.toml` documents what is known and what is not.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localitylab.errors import UserError
from localitylab.io import safe_name

# Settings that define the run: a resumed run must agree on all of them.
RECIPE_KEYS = (
    "model", "dataset", "epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs",
    "label_smoothing", "clip_grad", "mixup", "cutmix", "drop_path", "crop_padding", "pos_embed", "model_kw",
    "seed", "permute_pixels", "img_size", "task", "mask_ratio", "decoder_dim", "decoder_depth", "decoder_heads",
    "norm_pix_loss", "init_from", "linear_probe",
)
TASKS = ("classify", "mae")


@dataclass
class TrainConfig:
    model: str
    dataset: str
    out: Path | None = None
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    mixup: float = 0.0
    cutmix: float = 0.0
    drop_path: float = 0.0
    crop_padding: int | None = None  # None: the data set's default
    pos_embed: str = "learn"
    model_kw: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # initial weights for timm: models
    seed: int = 0
    permute_pixels: int | None = None  # seed of a fixed pixel permutation, or None
    data_dir: str | None = None
    download: bool = False
    img_size: int | None = None
    device: str = "auto"
    compile: str = "auto"  # torch.compile: auto = on CUDA
    amp: str = "auto"  # bf16 autocast: auto = on CUDA
    eval_batch_size: int = 512
    resume: bool = False
    # What the run optimises: "classify", or "mae" (masked-autoencoder pre-training).
    task: str = "classify"
    mask_ratio: float = 0.75
    decoder_dim: int | None = None  # None: the MAE module's default for this encoder
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    norm_pix_loss: bool | None = None  # None: on for ViT patches, off for a PiT's one-pixel tokens
    init_from: str | None = None  # a localitylab checkpoint whose matching weights start this run
    linear_probe: bool = False  # train only the classifier head on frozen features

    def validate(self) -> "TrainConfig":
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        # Written as "not (valid)" so that NaN, which fails every comparison, is refused too.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        at_least_zero = {"min_lr": self.min_lr, "weight_decay": self.weight_decay, "warmup_epochs": self.warmup_epochs,
                         "mixup": self.mixup, "cutmix": self.cutmix, "clip_grad": self.clip_grad or 0.0}
        for name, value in at_least_zero.items():
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.drop_path < 1:
            raise UserError(f"--drop-path is a probability of dropping a block: in [0, 1), got {self.drop_path}")
        if self.crop_padding is not None and self.crop_padding < 0:
            raise UserError(f"--crop-padding must be >= 0, got {self.crop_padding}")
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        if not 0 < self.mask_ratio < 1:
            raise UserError(f"--mask-ratio must be between 0 and 1 (exclusive), got {self.mask_ratio}")
        if self.linear_probe and not self.init_from:
            raise UserError("--linear-probe trains a head on frozen features: give the features with --init-from")
        if self.task == "mae" and (self.linear_probe or self.mixup or self.cutmix):
            raise UserError("MAE pre-training takes no --linear-probe, --mixup or --cutmix")
        for name in ("compile", "amp"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise UserError(f"--{name} must be auto, on or off, got {getattr(self, name)!r}")
        return self

    def mae_options(self) -> dict[str, Any]:
        """The MAE module's keyword arguments; unset ones take the module's defaults."""
        options = {"mask_ratio": self.mask_ratio, "decoder_dim": self.decoder_dim, "decoder_depth": self.decoder_depth,
                   "decoder_heads": self.decoder_heads, "norm_pix_loss": self.norm_pix_loss}
        return {k: v for k, v in options.items() if v is not None}

    def recipe(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RECIPE_KEYS}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out) if self.out is not None else None
        return data

    def command(self) -> str:
        """The `localitylab train` command line that reproduces this run (non-defaults only)."""
        import shlex

        defaults = TrainConfig(self.model, self.dataset)
        verb = ["pretrain", "mae"] if self.task == "mae" else ["train"]
        parts = ["localitylab", *verb, self.model, self.dataset, "--out", str(self.run_dir())]
        for f in dataclasses.fields(self):
            if f.name in ("model", "dataset", "out", "resume", "task"):
                continue
            value, default = getattr(self, f.name), getattr(defaults, f.name)
            if value == default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.name == "model_kw":
                for key, item in value.items():
                    parts += ["--model-kw", f"{key}={item!r}"]
            elif isinstance(value, bool):
                parts.append(flag if value else "--no-" + flag[2:])
            elif value is None:
                if f.name == "clip_grad":
                    parts += [flag, "0"]  # the CLI's way of saying "off"
                continue
            else:
                parts += [flag, str(value)]
        return " ".join(shlex.quote(p) for p in parts)

    def run_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs") / default_run_name(self)


def default_run_name(config: TrainConfig) -> str:
    """'vit-n/2' on 'digits' -> 'vit-n-p2-digits'; permuted runs get '-perm<seed>'."""
    name = f"{config.model}-{config.dataset}".replace("/", "-p")
    if config.task == "mae":
        name = "mae-" + name
    if config.permute_pixels is not None:
        name += f"-perm{config.permute_pixels}"
    return safe_name(name)
