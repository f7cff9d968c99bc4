"""The training recipe: every setting of `localitylab train`, with its default and why.

Default recipe (DeiT's, as used for ViTs trained from scratch, scaled to small data):
AdamW, lr 1e-3, weight decay 0.05 (none on biases, norms, position embeddings and [cls]),
linear warm-up from 1e-6, cosine decay to 1e-5 per step, label smoothing 0.1, gradient
clipping at norm 1.0; mixup/cutmix and drop-path are off by default and available as
options. Batch size, warm-up length, random-crop padding and horizontal flips left unset are
the data set's (`DataDefaults`: batch 128, 5 warm-up epochs, 1/8 of the side, flips where a
mirror image keeps its class; digits: batch 32, one warm-up epoch, no crop, no flips), and
`recipe_from` records where each value came from. The PiT paper (arXiv 2406.09415) trains its CIFAR
models far longer (the 2,400-epoch recipe); its exact augmentation settings are not
reproduced here: `studies/pit_vs_vit_cifar100.toml` documents what is known and what is not.

A setting is declared once, as a field of `TrainConfig`: its type, default, help text and
check (with the message users see), which commands offer it on the command line (the CLI
builds its options from these fields), whether it defines the run (a resumed run must agree
on it) and whether a study file may set it.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from localitylab.errors import UserError
from localitylab.io import safe_name
from localitylab.settings import InvalidSettings, Settings, SettingValueError, parse_key_values

TASKS = ("classify", "mae", "diffusion")
TRAIN, PRETRAIN = "train", "pretrain mae"  # the commands that start a run, as typed


def _flag(name: str) -> str:
    """How the command line spells a training setting, for the one place the library writes a
    command line: the command that reproduces a run, which run.json records
    (`TrainConfig.command`). The CLI's own spelling is cli/errors.flag_of; it has no exception
    among the training settings, and a test holds the two equal."""
    return "--" + name.replace("_", "-")


# --- checks, each with the message users see ---------------------------------------------------
def check(valid: Callable[[Any], bool], message: str) -> AfterValidator:
    """A setting's check: `message` ({name}: the setting's, {value}, {repr}) when `valid(value)`
    is false; None passes. Write `valid` so that NaN, which fails every comparison, fails it too."""

    def run(value: Any, info: ValidationInfo) -> Any:
        if value is not None and not valid(value):
            raise ValueError(message.format(name=info.field_name, value=value, repr=repr(value)))
        return value

    return AfterValidator(run)


AtLeastOne = Annotated[int, check(lambda v: v >= 1, "{name} must be at least 1, got {value}")]
WholeAtLeastZero = Annotated[int, check(lambda v: v >= 0, "{name} must be >= 0, got {value}")]
AtLeastZero = Annotated[float, check(lambda v: math.isfinite(v) and v >= 0, "{name} must be a number >= 0, got {value}")]
Positive = Annotated[float, check(lambda v: math.isfinite(v) and v > 0, "{name} must be a positive number, got {value}")]
FromZeroBelowOne = Annotated[float, check(lambda v: 0 <= v < 1, "{name} must be in [0, 1), got {value}")]
BetweenZeroAndOne = Annotated[float, check(lambda v: 0 < v < 1, "{name} must be between 0 and 1 (exclusive), got {value}")]
SwapDistance = Annotated[float, check(lambda v: v >= 1, "{name} must be a number >= 1 (pixels) or inf, got {value}")]
DropRate = Annotated[float, check(lambda v: 0 <= v < 1, "{name} is a probability of dropping a block: in [0, 1), got {value}")]
AutoOnOff = Annotated[str, check(lambda v: v in ("auto", "on", "off"), "{name} must be auto, on or off, got {repr}")]
Task = Annotated[str, check(lambda v: v in TASKS, f"{{name}} must be one of {', '.join(TASKS)}; got {{repr}}")]
LOGGERS = ("tensorboard", "wandb")
Logger = Annotated[str, check(lambda v: v in LOGGERS, f"{{name}} must be {' or '.join(LOGGERS)}, got {{repr}}")]

# The recipe: the settings `train` prints at start and run.json records with their source.
RECIPE = ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing", "clip_grad",
          "mixup", "cutmix", "drop_path", "crop_padding", "hflip", "pos_embed_std")
# The recipe settings a data set has a default for (`localitylab.data.DataDefaults`); the
# config holds the first two, the loaded data set the others (`DataInfo.crop_padding`, `.hflip`).
FROM_DATA_SET = ("batch_size", "warmup_epochs", "crop_padding", "hflip", "pos_embed_std")
FILLED_HERE = ("batch_size", "warmup_epochs", "pos_embed_std")
# Where a recipe value came from: given by the user (command line, Python, a study file), the
# data set's default, the task's (a diffusion run's), the global default, or the run being resumed.
USER, DATA_SET, TASK, DEFAULT, RESUMED = "user", "data set", "task", "default", "resumed run"


def setting(default: Any, help: str, *, commands: tuple[str, ...] = (TRAIN, PRETRAIN), defines_run: bool = True,
            in_study: bool = True, path: bool = False, off: Any = None, strict: bool = True) -> Any:
    """A field of TrainConfig with what the CLI, resume and study files need to know of it.

    commands:    the commands that offer it (model and dataset as arguments, the rest as
                 options, in field order)
    defines_run: a resumed run must agree on it
    in_study:    a study's [recipe] or [[models]] may set it
    path:        a file or folder (held as text, shown as PATH)
    off:         how the command line spells None ("off"), if it can
    """
    extra = {"commands": commands, "defines_run": defines_run, "in_study": in_study, "path": path, "off": off}
    return Field(default, description=help, json_schema_extra=extra, strict=strict)


def about(name: str) -> dict[str, Any]:
    """What `setting` recorded of TrainConfig's field `name`."""
    return TrainConfig.model_fields[name].json_schema_extra


class TrainConfig(Settings):
    """Everything a training run is given. Checked when made: a bad value raises a UserError
    that names the setting (`lr must be a positive number, got -1.0`; `err.settings`: ("lr",))."""

    model_config = ConfigDict(protected_namespaces=())  # model_kw is a setting, not pydantic's

    model: str = setting(..., "pit-{n,t,s,b}, vit-{n,t,s,b}/P, resnet-{n,18}, dit-{n,s,b,l,xl}/P or timm:NAME", in_study=False)
    dataset: str = setting(..., "digits, mnist, cifar10, ..., hf:NAME[:CONFIG], folder:PATH, shapes-S: "
                                "`localitylab datasets` lists them", in_study=False)
    out: Path | None = setting(None, "Run folder (default runs/<model>-<dataset>).", defines_run=False,
                               in_study=False, strict=False)
    # What the run optimises: classify or diffusion (the train command's task), or mae
    # (masked-autoencoder pre-training, the pretrain mae command).
    task: Task = setting("classify", "classify, or diffusion (noise prediction, for dit-*/P models).",
                         commands=(TRAIN,))
    label_dropout: FromZeroBelowOne = setting(
        0.1, "`task` diffusion: share of labels dropped to the null class (classifier-free guidance).",
        commands=(TRAIN,))
    mask_ratio: BetweenZeroAndOne = setting(0.75, "Fraction of tokens masked per image (a PiT token is a pixel).",
                                            commands=(PRETRAIN,))
    decoder_dim: int | None = setting(None, "Decoder width (default: scaled to the encoder).", commands=(PRETRAIN,))
    decoder_depth: int | None = setting(None, "Decoder blocks.", commands=(PRETRAIN,))
    decoder_heads: int | None = setting(None, "Decoder attention heads.", commands=(PRETRAIN,))
    norm_pix_loss: bool | None = setting(
        None, "Per-token normalised targets (default: on for ViT patches, off for one-pixel PiT tokens).",
        commands=(PRETRAIN,))
    epochs: AtLeastOne = setting(100, "Training epochs.")
    batch_size: AtLeastOne | None = setting(None, "Images per step (default: the data set's recipe).")
    lr: Positive = setting(1e-3, "Peak learning rate (AdamW).")
    min_lr: AtLeastZero = setting(1e-5, "Learning rate at the end of the cosine.")
    weight_decay: AtLeastZero = setting(0.05, "AdamW weight decay (not on biases, norms, pos_embed, cls; `task` diffusion: 0).")
    warmup_epochs: AtLeastZero | None = setting(None, "Linear warm-up length in epochs (default: the data set's recipe).")
    label_smoothing: FromZeroBelowOne = setting(0.1, "Label smoothing.", commands=(TRAIN,))
    clip_grad: AtLeastZero | None = setting(1.0, "Gradient-norm clipping (0 = off).", off=0)
    mixup: AtLeastZero = setting(0.0, "Mixup alpha (timm; 0 = off).", commands=(TRAIN,))
    cutmix: AtLeastZero = setting(0.0, "CutMix alpha (timm; 0 = off).", commands=(TRAIN,))
    drop_path: DropRate = setting(0.0, "Stochastic depth rate.", commands=(TRAIN,))
    crop_padding: WholeAtLeastZero | None = setting(
        None, "Random-crop padding in pixels (default: the data set's; none for `task` diffusion).")
    hflip: bool | None = setting(None, "Random horizontal flips in training (default: the data set's).")
    pos_embed: str = setting("learn", "Position embedding for pit/vit/dit: learn, sincos (fixed) or none "
                                      "(`task` diffusion: sincos, DiT's).")
    pos_embed_std: Positive | None = setting(
        None, "Initial std of a learned position table, for pit/vit/dit (default: the data set's recipe, else "
              "timm's 0.02).")
    model_kw: dict[str, Any] = setting({}, "key=value passed to the model (repeatable).", strict=False)
    weights: str | None = setting(None, "Initial weights (safetensors or state dict) for timm: models.",
                                  commands=(TRAIN,), defines_run=False, path=True)
    seed: int = setting(0, "Seed: CPU runs with the same seed are bit-identical.")
    permute_pixels: int | None = setting(None, "Train and test on pixels shuffled by this seed's permutation.",
                                         commands=(TRAIN,))
    swaps: WholeAtLeastZero | None = setting(
        None, "With `permute_pixels`: draw that permutation as T random swaps of pixel pairs (the PiT paper's "
        "pixel-swap experiment) instead of a full shuffle.", commands=(TRAIN,))
    swap_distance: SwapDistance | None = setting(
        None, "With `swaps`: the most pixels apart a swapped pair may be (default inf: any pair).", commands=(TRAIN,))
    data_dir: str | None = setting(None, "Where data sets live (default ~/.cache/localitylab/data).",
                                   defines_run=False, path=True)
    download: bool = setting(False, "Fetch an official archive if it is missing (checks its MD5).", defines_run=False)
    img_size: int | None = setting(None, "Image size for folder: and generated data sets.")
    image_column: str | None = setting(None, "hf: data sets: the column of images (default: the Image column; "
                                             "of several, 'image' or 'img').")
    label_column: str | None = setting(None, "hf: data sets: the column of labels (default: the ClassLabel column, "
                                             "else 'label' or 'labels'; of several, 'label' or 'labels').")
    cache: bool = setting(True, "Keep decoded folder:, hf:, tiny-imagenet and imagenet images in the cache "
                                "(off: decode afresh, write nothing).", defines_run=False)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.", defines_run=False, in_study=False)
    compile: AutoOnOff = setting("auto", "torch.compile: auto (on CUDA), on or off.", defines_run=False)
    amp: AutoOnOff = setting("auto", "bf16 autocast: auto (on CUDA), on or off.", defines_run=False)
    eval_batch_size: AtLeastOne = setting(512, "Images per forward pass when evaluating.", commands=(),
                                          defines_run=False)
    init_from: str | None = setting(None, "Start from this checkpoint's matching weights (MAE or any run).",
                                    commands=(TRAIN,), path=True)
    linear_probe: bool = setting(False, "Train only the classifier head on frozen `init_from` features.",
                                 commands=(TRAIN,))
    resume: bool = setting(False, "Continue the run in `out` from its last checkpoint.", defines_run=False,
                           in_study=False)
    log: Logger | None = setting(None, "Also log the figures to tensorboard (<run folder>/tensorboard) or wandb.",
                                 defines_run=False)
    # Not defining: a resumed run may keep other moments from its resume point on.
    snapshots: str | None = setting(
        None, "Keep the weights at these moments (<run>/snapshots/): N log-spaced steps with step 0 and the end "
              "(8), every:K epochs, or a list of epochs (0,1,2,5,10).", defines_run=False, strict=False)
    # Where each recipe value came from (RECIPE_SOURCES); filled when the config is made, kept
    # when it is made again from its own dict (a job file, run.json).
    recipe_from: dict[str, str] | None = setting(None, "Where each recipe value came from.", commands=(),
                                                 defines_run=False, in_study=False, strict=False)

    def __init__(self, model: str | None = None, dataset: str | None = None, /, **settings: Any) -> None:
        """TrainConfig(model, dataset, **settings); model and dataset may be given by name too."""
        given = {key: value for key, value in (("model", model), ("dataset", dataset)) if value is not None}
        try:
            super().__init__(**given, **settings)
        except ValidationError as err:
            raise InvalidSettings(err) from None

    # --- what the command line gives as text -------------------------------------------------------
    @field_validator("model_kw", mode="before")
    @classmethod
    def _model_kw(cls, value: Any) -> Any:
        """The command line gives ['depth=6', ...]; Python and study files give a dict."""
        if value is None or isinstance(value, (list, tuple)):
            try:
                return parse_key_values(value, "model_kw")
            except UserError as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        """Unset recipe settings take the data set's default (batch size and warm-up here; the
        crop and flip where the data set is loaded, which also knows the image size) or the
        global one, and `recipe_from` says which. A value given (not None) is the user's,
        unless `recipe_from` was passed: then it names the user's (the command line's typed
        options) and the rest are defaults. Made again from its own dict, a config keeps its
        sources."""
        if not isinstance(data, dict) or not isinstance(data.get("dataset"), str):
            return data
        data, told = dict(data), data.get("recipe_from")
        _std_from_model_kw(data)
        # A task's own defaults (TASK_DEFAULTS: a diffusion run's) for the settings not given,
        # from Python, a study file or the command line alike.
        task_defaults = TASK_DEFAULTS.get(data.get("task"), {})
        filled = {name for name in task_defaults if data.get(name) is None}
        data.update({name: task_defaults[name] for name in filled})
        sources: dict[str, str] = {}
        data_set = None
        for name in RECIPE:
            given = data.get(name) is not None
            if told is not None and name in told:
                sources[name] = told[name]
            elif name in task_defaults and (name in filled or told is not None):
                sources[name] = TASK
            elif told is None and given:
                sources[name] = USER
            elif name in FROM_DATA_SET and not given:
                if name in FILLED_HERE:  # the crop and flip are the loaded data set's (DataInfo)
                    data[name] = getattr(data_set or (data_set := _data_defaults(data["dataset"])), name)
                # a data set without its own position-table std leaves the models' default
                sources[name] = DEFAULT if name in FILLED_HERE and data[name] is None else DATA_SET
            else:
                sources[name] = DEFAULT
        data["recipe_from"] = sources
        return data

    @field_validator("snapshots", mode="before")
    @classmethod
    def _snapshots(cls, value: Any) -> Any:
        """8, "8", "every:5", "0,1,2", [0, 1, 2] -> its one spelling ("8", "every:5", "0,1,2");
        a bad spec raises the UserError naming `snapshots` (pydantic passes it through)."""
        from localitylab.train.snapshots import parse_snapshots

        spec = parse_snapshots(value)
        return None if spec is None else str(spec)

    # --- checks of settings together ---------------------------------------------------------------
    @model_validator(mode="after")
    def _combinations(self) -> "TrainConfig":
        if self.linear_probe and not self.init_from:
            raise SettingValueError("linear_probe trains a head on frozen features: give the features with init_from",
                                    "linear_probe", "init_from")
        if self.swaps is not None and self.permute_pixels is None:
            raise SettingValueError("swaps says how the permute_pixels permutation is drawn: give its seed with "
                                    "permute_pixels", "swaps", "permute_pixels")
        if self.swap_distance is not None and self.swaps is None:
            raise SettingValueError("swap_distance limits a permutation drawn pair by pair: give the number of pairs "
                                    "with swaps", "swap_distance", "swaps")
        if self.task == "mae" and (self.linear_probe or self.mixup or self.cutmix):
            raise SettingValueError("MAE pre-training takes no linear_probe, mixup or cutmix",
                                    "linear_probe", "mixup", "cutmix")
        if self.task == "diffusion" and (self.linear_probe or self.mixup or self.cutmix or self.drop_path):
            raise SettingValueError("task diffusion takes no linear_probe, mixup, cutmix or drop_path",
                                    "task", "linear_probe", "mixup", "cutmix", "drop_path")
        if self.task != "diffusion" and self.label_dropout != TrainConfig.model_fields["label_dropout"].default:
            raise SettingValueError("label_dropout applies to task diffusion only", "label_dropout", "task")
        self._check_model_fits_task()
        self._check_pos_embed_std_applies()
        self._check_snapshots()
        return self

    def _check_pos_embed_std_applies(self) -> None:
        """pos_embed_std given for a model without a learned position table is refused (it
        would be ignored, yet recorded as the run's and in its command)."""
        from localitylab.settings import SettingValueError

        if (self.recipe_from or {}).get("pos_embed_std") != USER or takes_pos_embed_std(self):
            return
        from localitylab.models.registry import model_kind

        try:
            kind = model_kind(self.model)
        except (UserError, KeyError):
            return  # an unknown name: building the model says what is valid
        why = {"convnet": f"{self.model} is a ConvNet: it has no position table",
               "timm": f"{self.model} is built by timm's own arguments (model_kw)"}.get(
            kind, f"pos_embed is {self.pos_embed!r}, not a learned table")
        raise SettingValueError(f"pos_embed_std sets the initial std of a learned position table; {why}",
                                "pos_embed_std", "pos_embed", "model_kw")

    def _check_snapshots(self) -> None:
        from localitylab.train.snapshots import parse_snapshots

        spec = parse_snapshots(self.snapshots)
        if spec is not None and spec.epochs and spec.epochs[-1] > self.epochs:
            raise UserError(f"snapshots lists epoch {spec.epochs[-1]}, but epochs is {self.epochs}",
                            settings=("snapshots", "epochs"))

    def _check_model_fits_task(self) -> None:
        """A DiT trains only as a denoiser, and only a DiT does (its forward takes a timestep and a label)."""
        from localitylab.models.registry import model_kind

        try:
            kind = model_kind(self.model)
        except (UserError, KeyError):
            return  # an unknown name: building the model says what is valid
        if self.task == "diffusion" and kind != "dit":
            raise SettingValueError(f"task diffusion trains a diffusion transformer (dit-{{n,s,b,l,xl}}/P); "
                                    f"{self.model} is not one", "task")
        if kind == "dit" and self.task != "diffusion":
            raise SettingValueError(f"{self.model} is a diffusion transformer: train it with task diffusion", "task")

    # --- views ---------------------------------------------------------------------------------------
    def diffusion_options(self) -> dict[str, Any]:
        """The diffusion objective's keyword arguments (the schedule is DDPM's linear 1,000 steps)."""
        return {"label_dropout": self.label_dropout}

    def mae_options(self) -> dict[str, Any]:
        """The MAE module's keyword arguments; unset ones take the module's defaults."""
        options = {"mask_ratio": self.mask_ratio, "decoder_dim": self.decoder_dim, "decoder_depth": self.decoder_depth,
                   "decoder_heads": self.decoder_heads, "norm_pix_loss": self.norm_pix_loss}
        return {k: v for k, v in options.items() if v is not None}

    def defining(self) -> dict[str, Any]:
        """The settings that define the run: a resumed run must agree on every one."""
        return {name: getattr(self, name) for name in DEFINING_SETTINGS}

    def pixel_permutation_setting(self) -> str | None:
        """The training permutation as the permutation probe's settings spell it (`global`, or
        `swaps-T-d`), for `localitylab.data.permutation.permutation_for_setting`; None: natural pixels."""
        if self.permute_pixels is None:
            return None
        if self.swaps is None:
            return "global"
        from localitylab.data.permutation import distance_label

        return f"swaps-{self.swaps}-{distance_label(self.swap_distance if self.swap_distance is not None else math.inf)}"

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (the checkpoint is loaded with weights_only=True)."""
        data = self.model_dump()
        data["out"] = str(self.out) if self.out is not None else None
        return data

    def command(self) -> str:
        """The `localitylab` command line that reproduces this run: its command and the
        non-default settings that command offers."""
        command = COMMANDS[self.task]
        parts = ["localitylab", *command.words, self.model, self.dataset, _flag("out"), str(self.run_dir())]
        for name in command.options:
            value, default = getattr(self, name), command.default(name)
            if name in ("model", "dataset", "out", "resume") or value == default:
                continue
            if name == "pos_embed_std" and not takes_pos_embed_std(self):
                continue  # filled from the data set's recipe, but the model has no learned table
            if name == "model_kw":
                for key, item in value.items():
                    parts += [_flag(name), f"{key}={item!r}"]
            elif isinstance(value, bool):
                parts.append(_flag(name if value else "no_" + name))
            elif value is None:
                if about(name)["off"] is not None:
                    parts += [_flag(name), str(about(name)["off"])]
            else:
                parts += [_flag(name), str(value)]
        return " ".join(shlex.quote(p) for p in parts)

    def run_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs") / default_run_name(self)


def _fields_where(key: str) -> tuple[str, ...]:
    return tuple(name for name in TrainConfig.model_fields if about(name)[key])


# Settings that define the run (a resumed run must agree on all of them), and the settings a
# study file may give in [recipe], [[models]] and [scale.NAME] recipe (run placement and
# devices are the study runner's).
DEFINING_SETTINGS = _fields_where("defines_run")
STUDY_SETTINGS = _fields_where("in_study")


@dataclass(frozen=True)
class TrainCommand:
    """A command that starts a run: its words, the task it sets, and where its defaults and
    help differ from the fields' (pre-training clips no gradients and smooths no labels)."""

    name: str
    task: str
    defaults: dict[str, Any] = field(default_factory=dict)  # of fields it offers, or sets without offering
    help: dict[str, str] = field(default_factory=dict)

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.name.split())

    @property
    def options(self) -> tuple[str, ...]:
        """The settings it offers, in the order of its help."""
        return tuple(name for name in TrainConfig.model_fields if self.name in about(name)["commands"])

    def default(self, name: str) -> Any:
        return self.defaults.get(name, TrainConfig.model_fields[name].get_default(call_default_factory=True))

    def describe(self, name: str) -> str:
        return self.help.get(name, TrainConfig.model_fields[name].description or "")

    def config(self, values: dict[str, Any]) -> TrainConfig:
        """The config for the options the user typed on the command line; the rest take the
        command's defaults, the data set's or the global ones. `train` with task diffusion is
        the diffusion command's."""
        task = values.get("task", self.task)
        command = COMMANDS.get(task, self)
        if command.name != self.name:
            raise UserError(f"task {task} is not started by `localitylab {self.name}`; "
                            f"use `localitylab {command.name}`", setting="task")
        typed = {name: USER for name in RECIPE if name in values}
        return TrainConfig(**{**command.defaults, **values, "task": task, "recipe_from": typed})


# A diffusion run's defaults where they differ from a classifier's (DiT, Peebles & Xie 2023):
# DiT's fixed sin-cos table, no weight decay, no random crops (a generator learns whatever the
# augmentation shows it: shifted images with padded borders) and no label smoothing (there is
# no classifier). Learning rate and schedule stay the toolkit's (warm-up and cosine from 1e-3:
# DiT's constant 1e-4 at batch 256 is tuned for ImageNet latents over 400k steps).
TASK_DEFAULTS = {"diffusion": {"pos_embed": "sincos", "weight_decay": 0.0, "crop_padding": 0, "label_smoothing": 0.0}}

COMMANDS = {
    "classify": TrainCommand(TRAIN, "classify"),
    "diffusion": TrainCommand(TRAIN, "diffusion", defaults=TASK_DEFAULTS["diffusion"]),
    "mae": TrainCommand(PRETRAIN, "mae", defaults={"clip_grad": None, "label_smoothing": 0.0}, help={
        "model": "pit-{n,t,s,b} or vit-{n,t,s,b}/P",
        "out": "Run folder (default runs/mae-<model>-<dataset>).",
        "epochs": "Pre-training epochs.",
        "clip_grad": "Gradient-norm clipping (0 = off, as in MAE).",
    }),
}


def default_run_name(config: TrainConfig) -> str:
    """'vit-n/2' on 'digits' -> 'vit-n-p2-digits'; permuted runs get '-perm<seed>', and
    '-swaps<T>-d<d>' where the permutation is T swaps within distance d."""
    name = f"{config.model}-{config.dataset}".replace("/", "-p")
    if config.task == "mae":
        name = "mae-" + name
    if config.permute_pixels is not None:
        name += f"-perm{config.permute_pixels}"
    setting = config.pixel_permutation_setting()
    if setting is not None and setting.startswith("swaps-"):
        _, count, distance = setting.split("-")
        name += f"-swaps{count}-d{distance}"
    return safe_name(name)


def _std_from_model_kw(data: dict[str, Any]) -> None:
    """`model_kw` {"pos_embed_std": X} (how it was given before the setting existed, and how the
    studies' files give it) is the same setting: it fills `pos_embed_std`, so the recipe
    records what the model is built with; given both ways, the two must agree."""
    kw = data.get("model_kw")
    try:
        kw = parse_key_values(kw, "model_kw") if isinstance(kw, (list, tuple)) else kw
    except UserError:
        return  # the model_kw field says what is wrong with it
    if not isinstance(kw, dict) or "pos_embed_std" not in kw:
        return
    given = data.get("pos_embed_std")
    try:
        differ = given is not None and float(given) != float(kw["pos_embed_std"])
    except (TypeError, ValueError):
        differ = True
    if differ:
        raise SettingValueError(f"the position table's std is given twice: {given} as pos_embed_std and "
                                f"{kw['pos_embed_std']} in model_kw; give it once", "pos_embed_std", "model_kw")
    data["pos_embed_std"] = kw["pos_embed_std"]


def takes_pos_embed_std(config: TrainConfig) -> bool:
    """Whether the run's model is built with a learned position table (a pit, vit or dit with
    pos_embed learn), the only models `pos_embed_std` applies to."""
    return learns_positions(config.model, config.pos_embed)


def learns_positions(model: str, pos_embed: str) -> bool:
    """Whether `model` built with `pos_embed` has a learned position table."""
    from localitylab.models.registry import model_kind
    from localitylab.models.spec import POS_EMBED_KINDS

    try:
        return model_kind(model) in POS_EMBED_KINDS and pos_embed == "learn"
    except (UserError, KeyError):
        return False


def _data_defaults(dataset: str) -> Any:
    """The data set's DataDefaults; the global ones for a name the registry does not know (its
    load says so, with the valid names, as before a config knew its data set's defaults)."""
    from localitylab.data.registry import DataDefaults, dataset_defaults  # torch: not when only the help is asked for

    try:
        return dataset_defaults(dataset)
    except UserError:
        return DataDefaults()


def recipe_record(config: TrainConfig, crop_padding: int, hflip: bool) -> dict[str, dict[str, Any]]:
    """{setting: {"value", "from"}} for every recipe setting, as the run used it: the crop and
    flip as the loaded data set resolved them (`DataInfo.crop_padding`, `.hflip`)."""
    from localitylab.models.pos_embed import POS_EMBED_STD

    values = {name: getattr(config, name) for name in RECIPE} | {"crop_padding": crop_padding, "hflip": hflip}
    values["pos_embed_std"] = POS_EMBED_STD if config.pos_embed_std is None else config.pos_embed_std
    sources = config.recipe_from or {}
    used = [name for name in RECIPE if name != "pos_embed_std" or takes_pos_embed_std(config)]
    return {name: {"value": values[name], "from": sources.get(name, DEFAULT)} for name in used}


def describe_recipe(record: dict[str, dict[str, Any]], dataset: str) -> str:
    """One line: the recipe's values grouped by where they came from."""
    names = {USER: "given", DATA_SET: f"defaults of {dataset}", TASK: "defaults of the task", DEFAULT: "defaults", RESUMED: "from the resumed run"}
    groups: dict[str, list[str]] = {}
    for name, entry in record.items():
        value = entry["value"]
        shown = ("on" if value else "off") if isinstance(value, bool) else "off" if value is None else f"{value:g}" \
            if isinstance(value, float) else str(value)
        groups.setdefault(entry["from"], []).append(f"{name} {shown}")
    return "recipe: " + "; ".join(f"{', '.join(items)} ({names.get(source, source)})"
                                  for source, items in groups.items())
