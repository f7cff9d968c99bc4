"""Study files: one TOML file that says what to train, probe and report, and what the
published numbers are. Validated on load; a mistake names the key and its line.

    [study]    name, title, description, dataset, seeds, permute_pixels, gpu_hours, notes
    [recipe]   any `localitylab train` setting (epochs, batch_size, lr, ...; with [study]
               permute_pixels, swaps and swap_distance say how the permuted variant is drawn;
               without it, a model's own permute_pixels, swaps, swap_distance train it on
               permuted pixels, e.g. one [[models]] entry per swap count T)
    [[models]] model (registry name), label, and per-model recipe overrides; task = "mae"
               pre-trains, and init_from = "<label of an earlier model>" starts from its
               checkpoint (same seed), so a study can pre-train and then fine-tune; a
               timm:NAME[.TAG] with pretrained = true is probed with timm's pretrained
               weights and not trained
    [probes]   run (probe names or ["all"]), images, batch_size, options = {...}
    [samples]  n, guidance, steps, sampler, batch_size, classifier = "<label of a classifier in
               this study>", inception_weights = "FILE": every diffusion run (task =
               "diffusion") is sampled and, with a classifier, its samples measured
               (`localitylab sample` and `evaluate-samples`) so the report's generation
               section is filled
    [report]   title
    [executor.slurm]  how pieces are submitted with executor "slurm": partition, account,
               gpus_per_run, cpus_per_run, time (minutes), slurm_opt = {key = value},
               poll_interval (SlurmSettings below)
    [[expect]] model, metric, published, setting, source: shown as "published" beside "ours";
               ours is the model's test accuracy, or with probe = "...": the probe's metric
               at layer ("first", "last" or an index), reduced over heads ("min", "max",
               "mean"); published may be a number or a sentence (a qualitative fact)
    [scale.NAME]  dataset, models = {full = small}, recipe = {...}, probes = {...}, samples = {...}, seeds: a smaller
               variant (e.g. CIFAR -> digits) selected with scale NAME; its seeds
               replace [study] seeds (a cheap scale can afford more of them). A model's
               substitute may carry its own settings at that scale: {full = {model = "small",
               model_kw = {...}, lr = ...}} (they win over the scale's recipe; model_kw merges
               with the entry's)
"""

from __future__ import annotations

import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from localitylab.errors import UserError
from localitylab.io import safe_name
from localitylab.settings import InvalidSettings, Settings, parse_settings
from localitylab.train.config import STUDY_SETTINGS, TrainConfig, learns_positions

BUNDLED = Path(__file__).resolve().parent / "bundled"

STUDY_KEYS = {"name", "title", "description", "dataset", "seeds", "permute_pixels", "gpu_hours", "notes"}
# [probes] keys: run and options, and every probe setting (localitylab/probes/settings.py; `probe_keys`).
PROBE_TABLE_KEYS = {"run", "options"}
PROBE_KEY_NAMES = {"n_images": "images"}  # a setting whose study key is not its name
RUNNER_SETTINGS = ("device", "seed")  # set by the study runner, not the file
SAMPLE_KEYS = {"n", "guidance", "steps", "sampler", "batch_size", "classifier", "inception_weights"}
EXPECT_KEYS = {"model", "metric", "published", "setting", "source", "probe", "layer", "heads"}
SCALE_KEYS = {"dataset", "models", "recipe", "probes", "samples", "seeds", "description"}
# [[models]] keys: the model, its label, its data set, whether it is pretrained (probed, not trained),
# and the training settings a study may set.
MODEL_KEYS = {"model", "label", "dataset", "pretrained", *STUDY_SETTINGS}


@dataclass
class StudyModel:
    """One [[models]] entry of a study: a registry model, its label (the run folder's name)
    and its own training settings."""

    model: str
    label: str
    recipe: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None  # overrides the study's (e.g. a fixed-sequence-length variant)
    pretrained: bool = False  # a timm: model probed with timm's pretrained weights, not trained
    scale_recipe: dict[str, Any] = field(default_factory=dict)  # its substitute's own settings at the chosen scale


@dataclass
class Study:
    path: Path
    name: str
    title: str
    description: str
    dataset: str
    seeds: list[int]
    permute_pixels: int | None
    recipe: dict[str, Any]
    models: list[StudyModel]
    probes: list[str]
    probe_images: int | None  # None: each probe's own default
    probe_batch_size: int | None  # None: ProbeSettings' default
    probe_options: dict[str, Any]
    expect: list[dict[str, Any]]
    gpu_hours: float | None = None
    notes: str = ""
    scale: str | None = None
    scales: list[str] = field(default_factory=list)
    scale_recipe: dict[str, Any] = field(default_factory=dict)  # a scale's settings win over per-model ones
    model_map: dict[str, str] = field(default_factory=dict)  # a scale's substitutions, e.g. pit-t -> pit-n
    samples: dict[str, Any] = field(default_factory=dict)  # [samples]: how diffusion runs are sampled; {} for none
    slurm: dict[str, Any] = field(default_factory=dict)  # [executor.slurm]: SlurmSettings' values; {} for none

    def train_settings(self, entry: StudyModel, seed: int, permute: int | None, out: Path,
                       init_from: Path | None = None) -> dict[str, Any]:
        """TrainConfig's settings for one run. `init_from`: the checkpoint of the run that
        entry.init_from names (the runner knows where that run lives); the label itself never
        reaches TrainConfig."""
        settings = {**self.recipe, **entry.recipe, **self.scale_recipe}
        own = dict(entry.scale_recipe)
        if "model_kw" in own:  # the substitute's model_kw adds to the entry's (e.g. its pos_embed) rather than replacing it
            own["model_kw"] = {**settings.get("model_kw", {}), **own["model_kw"]}
        settings = {**settings, **own, "seed": seed}
        if not learns_positions(entry.model, settings.get("pos_embed", TrainConfig.model_fields["pos_embed"].default)):
            # A scale's shared start for learned tables (pos_embed_std) means nothing to the
            # sin-cos, table-free and ConvNet entries it also reaches: dropped for them, not refused.
            settings.pop("pos_embed_std", None)
            if "pos_embed_std" in settings.get("model_kw", {}):
                settings["model_kw"] = {k: v for k, v in settings["model_kw"].items() if k != "pos_embed_std"}
        if self.permute_pixels is not None:  # [study] permute_pixels: every model once natural, once permuted
            settings["permute_pixels"] = permute
            if permute is None:  # the natural variant: a [recipe] swaps setting is the permuted variant's
                settings.pop("swaps", None)
                settings.pop("swap_distance", None)
        settings["init_from"] = str(init_from) if init_from is not None else None
        return {"model": entry.model, "dataset": self.dataset_of(entry), "out": out, "resume": True, **settings}

    def train_config(self, entry: StudyModel, seed: int, permute: int | None, out: Path,
                     init_from: Path | None = None) -> TrainConfig:
        return TrainConfig(**self.train_settings(entry, seed, permute, out, init_from))

    @property
    def sources(self) -> dict[str, str]:
        """{label: label of the run it starts from} for the models with init_from."""
        return {e.label: e.recipe["init_from"] for e in self.models if e.recipe.get("init_from")}

    def dataset_of(self, entry: StudyModel) -> str:
        return entry.dataset or self.dataset


def bundled_study(name: str) -> Path:
    """A study file shipped with localitylab: ./studies/NAME.toml if present, else the package's copy."""
    local = Path("studies") / f"{name}.toml"
    return local if local.is_file() else BUNDLED / f"{name}.toml"


class _Locator:
    """Finds the line of a key in the TOML text, for error messages."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()

    def line(self, key: str, table: str | None = None) -> int | None:
        in_table = table is None
        for number, line in enumerate(self.lines, start=1):
            stripped = line.strip()
            if stripped.startswith("["):
                header = stripped.strip("[]").strip()
                in_table = table is None or header == table or header.startswith(table + ".")
                if table is not None and header == table:
                    continue
            if in_table and re.match(rf"^\s*(\"?){re.escape(key)}\1\s*=", line):
                return number
            if in_table and re.search(rf"[{{,]\s*(\"?){re.escape(key)}\1\s*=", line):
                return number
        return None

    def error(self, message: str, key: str | None = None, table: str | None = None) -> UserError:
        number = self.line(key, table) if key else None
        where = f"{self.path}" + (f" line {number}" if number else "")
        return UserError(f"{where}: {message}")


def _check_keys(found: dict[str, Any], allowed: set[str], where: str, locator: _Locator, table: str | None) -> None:
    for key in found:
        if key not in allowed:
            raise locator.error(f"unknown key {key!r} in {where}; valid: {', '.join(sorted(allowed))}", key, table)


def load_study(path: str | Path, scale: str | None = None) -> Study:
    """Read, check and return a study file (its variant [scale.NAME] when `scale` is given).
    Every mistake is one UserError that names the file, the key and its line."""
    path = Path(path)
    text, data = _read_study_file(path)
    locator = _Locator(path, text)
    _check_layout(data, locator)
    study = data["study"]
    dataset, substitutes, scale_recipe, probes_raw = _scaled(data, scale, path, locator)
    model_map = {full: small["model"] if isinstance(small, dict) else small for full, small in substitutes.items()}
    samples = _samples(data, scale, locator)
    models = _study_models(data["models"], substitutes, scale, locator)
    expect = data.get("expect", [])
    for index, entry in enumerate(expect):
        _check_keys(entry, EXPECT_KEYS, f"[[expect]] entry {index + 1}", locator, "expect")
        for required in ("model", "published"):
            if required not in entry:
                raise locator.error(f"[[expect]] entry {index + 1} needs {required!r}")
        if "probe" in entry:
            _check_probe_expectation(entry, index, locator)
    seeds = study.get("seeds", [0])
    _check_seeds(seeds, "study", locator)
    if scale is not None and "seeds" in data["scale"][scale]:
        seeds = data["scale"][scale]["seeds"]  # checked with the layout
    probes = _probe_names(probes_raw, locator)

    result = Study(
        path=path, name=safe_name(str(study["name"])), title=str(data.get("report", {}).get("title", study.get("title", study["name"]))),
        description=str(study.get("description", "")), dataset=dataset, seeds=seeds,
        permute_pixels=study.get("permute_pixels"), recipe=dict(data.get("recipe", {})), models=models,
        probes=probes, probe_images=probes_raw.get("images"), probe_batch_size=probes_raw.get("batch_size"),
        probe_options=_probe_options(probes_raw),
        expect=[dict(e) for e in expect], gpu_hours=study.get("gpu_hours"), notes=str(study.get("notes", "")),
        scale=scale, scales=list(data.get("scale", {})), scale_recipe=scale_recipe, model_map=model_map,
        samples=samples, slurm=_executor_table(data, locator),
    )
    _validate_values(result, locator)
    _validate_samples(result, locator)
    return result


def _read_study_file(path: Path) -> tuple[str, dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a study file (not UTF-8 text); expected TOML") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the study file: {err.strerror or err}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML: {err}") from None


def _check_layout(data: dict[str, Any], locator: _Locator) -> None:
    """The tables the file has, their keys and kinds: [study], [recipe], [[models]], [[expect]], [scale.NAME]."""
    _check_keys(data, {"study", "recipe", "models", "probes", "samples", "report", "expect", "scale", "executor"},
                "the file", locator, None)
    study = data.get("study")
    if not isinstance(study, dict):
        raise locator.error("needs a [study] table with at least name and dataset")
    _check_keys(study, STUDY_KEYS, "[study]", locator, "study")
    for required in ("name", "dataset"):
        if required not in study:
            raise locator.error(f"[study] needs {required!r}")
    _check_study_values(study, locator)
    for table in ("recipe", "probes", "samples", "report"):
        if not isinstance(data.get(table, {}), dict):
            raise locator.error(f"'{table}' must be a [{table}] table, got {data[table]!r}", table)
    _check_keys(data.get("recipe", {}), STUDY_SETTINGS, "[recipe]", locator, "recipe")
    models = data.get("models", [])
    if not isinstance(models, list) or not models:
        raise locator.error("needs at least one [[models]] entry with a 'model' key")
    expect = data.get("expect", [])
    if not isinstance(expect, list) or not all(isinstance(e, dict) for e in expect):
        raise locator.error("'expect' must be a list of [[expect]] tables", "expect")
    scales = data.get("scale", {})
    if not isinstance(scales, dict):
        raise locator.error("'scale' must be a table of [scale.NAME] tables", "scale")
    for scale_name, scale_table in scales.items():
        if not isinstance(scale_table, dict):
            raise locator.error(f"'scale.{scale_name}' must be a [scale.{scale_name}] table, got {scale_table!r}", "scale")
        _check_keys(scale_table, SCALE_KEYS, f"[scale.{scale_name}]", locator, f"scale.{scale_name}")
        for table in ("models", "recipe", "probes", "samples"):
            if not isinstance(scale_table.get(table, {}), dict):
                raise locator.error(f"[scale.{scale_name}] {table} must be a table, got {scale_table[table]!r}", table,
                                    f"scale.{scale_name}")
        if "seeds" in scale_table:
            _check_seeds(scale_table["seeds"], f"scale.{scale_name}", locator)
        for full, small in scale_table.get("models", {}).items():
            if isinstance(small, dict):
                _check_keys(small, {"model", *STUDY_SETTINGS}, f"[scale.{scale_name}] models.{full}", locator,
                            f"scale.{scale_name}")
                small = small.get("model")
            if not isinstance(small, str):
                raise locator.error(f"[scale.{scale_name}] models: {full} must map to a model name (\"\" to leave it "
                                    f"out) or a table with a 'model' key, got {small!r}", full, f"scale.{scale_name}")


# The [executor.slurm] table's settings live here, beside the study file that holds them, so
# that checking a study file does not import the submitter (slurm.py, which runs the study).
class SlurmSettings(Settings):
    """How each piece of a study is submitted to SLURM: the [executor.slurm] table of a study
    file, or the command line's options of the same names."""

    partition: str | None = Field(None, description="SLURM partition (default: the cluster's default).")
    account: str | None = Field(None, description="SLURM account to charge.")
    gpus_per_run: int = Field(0, ge=0, description="GPUs for each piece's job.")
    cpus_per_run: int = Field(1, ge=1, description="CPU cores for each piece's job (its torch threads).")
    time: int = Field(60, ge=1, description="Time limit of each piece's job, in minutes.")
    slurm_opt: dict[str, Any] = Field(default_factory=dict, description="Any other sbatch option, key=value "
                                      "(e.g. qos=high, constraint=a100); repeatable.")
    poll_interval: float = Field(10.0, gt=0, description="Seconds between two looks at the queue while waiting.")


def slurm_settings(table: dict[str, Any] | None, given: dict[str, Any] | None = None) -> SlurmSettings:
    """The study file's [executor.slurm] table with the given values (the command line's) on top."""
    merged = {**(table or {}), **{k: v for k, v in (given or {}).items() if v is not None}}
    if "slurm_opt" in (table or {}) and "slurm_opt" in (given or {}):
        merged["slurm_opt"] = {**table["slurm_opt"], **given["slurm_opt"]}
    return parse_settings(SlurmSettings, merged, "[executor.slurm]")


def _executor_table(data: dict[str, Any], locator: _Locator) -> dict[str, Any]:
    """[executor.slurm]: SlurmSettings' keys and values, checked here; {} without one."""
    executor = data.get("executor", {})
    if not isinstance(executor, dict):
        raise locator.error("'executor' must be a table of [executor.NAME] tables", "executor")
    _check_keys(executor, {"slurm"}, "[executor]", locator, "executor")
    table = executor.get("slurm", {})
    if not isinstance(table, dict):
        raise locator.error("[executor] slurm must be a [executor.slurm] table", "slurm", "executor")
    try:
        slurm_settings(table)
    except UserError as err:
        key = next((k for k in table if k in str(err)), None)
        raise locator.error(str(err), key, "executor.slurm") from None
    return dict(table)


def _check_seeds(seeds: Any, table: str, locator: _Locator) -> None:
    """[study] seeds and [scale.NAME] seeds: distinct integers (each seed is a run folder)."""
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise locator.error(f"[{table}] seeds must be a non-empty list of integers, got {seeds!r}", "seeds", table)
    if len(set(seeds)) != len(seeds):
        raise locator.error(f"[{table}] seeds must be distinct, got {seeds!r}", "seeds", table)


def _scaled(data: dict[str, Any], scale: str | None, path: Path,
            locator: _Locator) -> tuple[str, dict[str, str | dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(data set, model substitutions, recipe, [probes]) of the chosen variant: the file's own
    without a scale, else with [scale.NAME]'s settings over them. A substitution is a model
    name or a table of the name and its settings (checked with the layout)."""
    dataset, model_map, scale_recipe = data["study"]["dataset"], {}, {}
    probes_raw = dict(data.get("probes", {}))
    _check_keys(probes_raw, probe_keys(), "[probes]", locator, "probes")
    if scale is None:
        return dataset, model_map, scale_recipe, probes_raw
    scales = data.get("scale", {})
    if scale not in scales:
        valid = ", ".join(scales) or "none in this file"
        raise UserError(f"{path}: unknown scale {scale!r}; valid: {valid}")
    chosen = scales[scale]
    _check_keys(chosen.get("recipe", {}), STUDY_SETTINGS, f"[scale.{scale}] recipe", locator, f"scale.{scale}")
    _check_keys(chosen.get("probes", {}), probe_keys(), f"[scale.{scale}] probes", locator, f"scale.{scale}")
    probes_raw.update(chosen.get("probes", {}))
    # "" in models leaves a model out at this scale
    return chosen.get("dataset", dataset), dict(chosen.get("models", {})), dict(chosen.get("recipe", {})), probes_raw


def _samples(data: dict[str, Any], scale: str | None, locator: _Locator) -> dict[str, Any]:
    """[samples], with [scale.NAME] samples over it; keys checked (values by `_validate_samples`)."""
    samples = dict(data.get("samples", {}))
    _check_keys(samples, SAMPLE_KEYS, "[samples]", locator, "samples")
    if scale is not None and "samples" in data.get("scale", {}).get(scale, {}):
        chosen = data["scale"][scale]["samples"]
        _check_keys(chosen, SAMPLE_KEYS, f"[scale.{scale}] samples", locator, f"scale.{scale}")
        samples.update(chosen)
    return samples


def _study_models(entries: list[Any], substitutes: dict[str, str | dict[str, Any]], scale: str | None,
                  locator: _Locator) -> list[StudyModel]:
    models: list[StudyModel] = []
    labels: set[str] = set()
    pretrained_labels: set[str] = set()  # not trained here: no checkpoint to start from
    for index, raw in enumerate(entries):
        if not isinstance(raw, dict) or "model" not in raw:
            raise locator.error(f"[[models]] entry {index + 1} needs a 'model' key")
        _check_keys(raw, MODEL_KEYS, f"[[models]] entry {index + 1}", locator, "models")
        for key in ("model", "dataset"):
            if key in raw and not isinstance(raw[key], str):
                raise locator.error(f"[[models]] entry {index + 1}: {key} must be a string, got {raw[key]!r}", key,
                                    "models")
        substitute = substitutes.get(raw["model"], raw["model"])
        own = {k: v for k, v in substitute.items() if k != "model"} if isinstance(substitute, dict) else {}
        name = substitute["model"] if isinstance(substitute, dict) else substitute
        if name == "":
            continue
        label = safe_name(str(raw.get("label", name)).replace("/", "-p"))
        if scale is not None and raw.get("label") is None and name != raw["model"]:
            label = safe_name(name.replace("/", "-p"))
        if label in labels:
            raise locator.error(f"two models share the label {label!r}; give each a distinct 'label'", "label", "models")
        labels.add(label)
        pretrained = raw.get("pretrained", False)
        if not isinstance(pretrained, bool) or (pretrained and not name.startswith("timm:")):
            raise locator.error(f"[[models]] entry {index + 1}: pretrained = true applies to timm:NAME models (timm's "
                                f"pretrained weights), got pretrained = {pretrained!r} for {name!r}", "pretrained",
                                "models")
        recipe_part = {k: v for k, v in raw.items() if k not in ("model", "label", "dataset", "pretrained")}
        if pretrained and recipe_part:
            raise locator.error(f"[[models]] entry {index + 1}: a pretrained model is not trained, so "
                                f"{sorted(recipe_part)[0]!r} does not apply", sorted(recipe_part)[0], "models")
        source = recipe_part.get("init_from")
        if source is not None and (source not in labels - {label} or source in pretrained_labels):
            raise locator.error(
                f"[[models]] entry {index + 1}: init_from must be the label of an earlier model in this study "
                f"(one of: {', '.join(sorted(labels - {label})) or 'none'}), got {source!r}", "init_from", "models")
        models.append(StudyModel(name, label, recipe_part, raw.get("dataset"), pretrained, own))
        if pretrained:
            pretrained_labels.add(label)
    return models


def probe_keys() -> set[str]:
    """The keys of a [probes] table: run, options and every probe setting but the runner's,
    from the probes' settings (so a new probe option is a key with no edit here)."""
    from localitylab.probes.registry import probe_fields

    return PROBE_TABLE_KEYS | {PROBE_KEY_NAMES.get(field.name, field.name) for field in probe_fields()
                               if field.name not in RUNNER_SETTINGS}


def _probe_options(probes_raw: dict[str, Any]) -> dict[str, Any]:
    """The probe settings of [probes] other than images and batch_size, by Python name:
    options = {...} and the settings given as keys of their own."""
    own = {key: value for key, value in probes_raw.items()
           if key not in PROBE_TABLE_KEYS and key not in ("images", "batch_size")}
    return {**dict(probes_raw.get("options", {})), **own}


def _probe_names(probes_raw: dict[str, Any], locator: _Locator) -> list[str]:
    """[probes] run, with the form of options (the values are checked with the probes' settings)."""
    probes = probes_raw.get("run", ["all"])
    if isinstance(probes, str):
        probes = [probes]
    if not isinstance(probes, list) or not probes or not all(isinstance(p, str) for p in probes):
        raise locator.error(f"[probes] run must be a probe name or a list of them, got {probes!r}", "run", "probes")
    if not isinstance(probes_raw.get("options", {}), dict):
        raise locator.error(f"[probes] options must be a table (options = {{ key = value }}), "
                            f"got {probes_raw['options']!r}", "options", "probes")
    return list(probes)


def _validate_values(study: Study, locator: _Locator) -> None:
    """Check names and settings without loading data or building models."""
    from localitylab.data.registry import check_dataset_name
    from localitylab.models.registry import parse_model_name
    from localitylab.probes.registry import probe_names

    for dataset in {study.dataset, *(e.dataset for e in study.models if e.dataset)}:
        try:
            check_dataset_name(dataset)
        except UserError as err:
            raise locator.error(str(err), "dataset") from None
    if study.permute_pixels is not None:
        for table, recipe in (("recipe", study.recipe), (f"scale.{study.scale}", study.scale_recipe),
                              *(("models", e.recipe) for e in study.models)):
            if "permute_pixels" in recipe:
                raise locator.error("permute_pixels is set in [study], which trains every model on natural and on "
                                    f"permuted pixels; remove it from [{table}] (or from [study] to give each model "
                                    "its own)", "permute_pixels", table)
    for entry in study.models:
        if entry.pretrained:  # probed only: a name timm knows, with pretrained weights
            try:
                from localitylab.models.timm_adapter import check_timm_name

                parse_model_name(entry.model)
                check_timm_name(entry.model[len("timm:"):])
            except UserError as err:
                raise locator.error(f"model {entry.model!r}: {err}", "model", "models") from None
            continue
        try:
            parse_model_name(entry.model)
        except UserError as err:
            raise locator.error(f"model {entry.model!r}: {err}", "model", "models") from None
        source = Path("unused") / "ckpt.pt" if entry.recipe.get("init_from") else None
        settings = study.train_settings(entry, study.seeds[0], study.permute_pixels, Path("unused"), source)
        try:
            TrainConfig(**settings)  # TrainConfig's own checks: one mechanism for both
        except InvalidSettings as err:
            key = str(err.problem["loc"][0]) if err.problem["loc"] else None
            if key is not None and err.problem["type"].endswith("_type"):  # a string where a number belongs...
                table = "models" if key in entry.recipe else "recipe"
                raise locator.error(f"{key} = {settings[key]!r} has the wrong type; expected {_type_name(key)}",
                                    key, table) from None
            raise locator.error(f"model {entry.model!r}: {err}", "model", "models") from None
    for name in study.probes:
        if name != "all" and name not in probe_names():
            raise locator.error(f"unknown probe {name!r}; valid: {', '.join(probe_names())}, all", "run", "probes")
    from localitylab.probes.registry import get_probe
    from localitylab.probes.base import parse_probe_settings

    chosen = probe_names() if "all" in study.probes else study.probes
    given = {"n_images": study.probe_images, "batch_size": study.probe_batch_size}
    try:
        parse_probe_settings([get_probe(name) for name in chosen],
                             {**study.probe_options, **{k: v for k, v in given.items() if v is not None}})
    except UserError as err:
        key = next(iter(err.settings), None)
        key = PROBE_KEY_NAMES.get(key, key)
        where = key if key and locator.line(key, "probes") else "options"  # its own line, or options = {...}
        message = str(err).replace("n_images", "images")  # the file's name for it
        raise locator.error(f"[probes] {message}", where, "probes") from None


def diffusion_labels(study: Study) -> set[str]:
    """The labels of the study's diffusion models (task = "diffusion", in their recipe or the study's)."""
    return {e.label for e in study.models
            if not e.pretrained and {**study.recipe, **e.recipe, **study.scale_recipe}.get("task") == "diffusion"}


def _validate_samples(study: Study, locator: _Locator) -> None:
    """[samples]: values `localitylab sample` accepts, and a classifier that this study trains."""
    from localitylab.generation.runs import SampleRequest, check_sample_request

    samples = study.samples
    if not samples:
        return
    if not diffusion_labels(study):
        raise locator.error("[samples] applies to diffusion models (task = \"diffusion\"); this study has none",
                            None, "samples")
    kinds = {"n": int, "steps": int, "batch_size": int, "guidance": (int, float), "sampler": str,
             "classifier": str, "inception_weights": str}
    for key, value in samples.items():
        if isinstance(value, bool) or not isinstance(value, kinds[key]):
            raise locator.error(f"[samples] {key} has the wrong type: {value!r}", key, "samples")
    request = SampleRequest("unused", **{k: samples[k] for k in ("n", "steps", "sampler", "batch_size") if k in samples})
    if "guidance" in samples:
        request.guidance = float(samples["guidance"])
    try:
        check_sample_request(request)
        if not 1 <= request.steps <= 1000:
            raise UserError(f"steps must be between 1 and 1000, got {request.steps}")
    except UserError as err:
        raise locator.error(f"[samples] {err}", None, "samples") from None
    classifier = samples.get("classifier")
    if classifier is not None:
        classifiers = {e.label for e in study.models if not e.pretrained} - diffusion_labels(study)
        if classifier not in classifiers:
            raise locator.error(f"[samples] classifier must be the label of a classifier this study trains (one of: "
                                f"{', '.join(sorted(classifiers)) or 'none'}), got {classifier!r}", "classifier",
                                "samples")


def _check_probe_expectation(entry: dict[str, Any], index: int, locator: _Locator) -> None:
    """An [[expect]] row read from a probe's table names the probe, its metric, a layer and a reduction over heads."""
    from localitylab.probes.registry import probe_names

    where = f"[[expect]] entry {index + 1}"
    if entry["probe"] not in probe_names():
        raise locator.error(f"{where}: unknown probe {entry['probe']!r}; valid: {', '.join(probe_names())}", "probe",
                            "expect")
    if "metric" not in entry:
        raise locator.error(f"{where} reads the {entry['probe']} table and needs its 'metric'", None, "expect")
    layer = entry.get("layer", "last")
    if layer not in ("first", "last") and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise locator.error(f"{where}: layer must be 'first', 'last' or a block index >= 0, got {layer!r}", "layer",
                            "expect")
    if entry.get("heads", "mean") not in ("min", "max", "mean"):
        raise locator.error(f"{where}: heads must be 'min', 'max' or 'mean', got {entry['heads']!r}", "heads", "expect")


def _check_study_values(study: dict[str, Any], locator: _Locator) -> None:
    """Types of the [study] table: names become folders and seeds become paths, so check them here."""
    for key in ("name", "dataset", "title", "description", "notes"):
        if key in study and not isinstance(study[key], str):
            raise locator.error(f"[study] {key} must be a string, got {study[key]!r}", key, "study")
    permute = study.get("permute_pixels")
    if permute is not None and (isinstance(permute, bool) or not isinstance(permute, int)):
        raise locator.error(f"[study] permute_pixels must be an integer seed, got {permute!r}", "permute_pixels", "study")
    hours = study.get("gpu_hours")
    if hours is not None and (isinstance(hours, bool) or not isinstance(hours, (int, float)) or hours < 0):
        raise locator.error(f"[study] gpu_hours must be a number >= 0, got {hours!r}", "gpu_hours", "study")


def _type_name(key: str) -> str:
    """'int' for TrainConfig's `epochs: int`, 'float' for `clip_grad: float | None`."""
    kinds = [a for a in typing.get_args(TrainConfig.model_fields[key].annotation) if a is not type(None)]
    kind = kinds[0] if kinds else TrainConfig.model_fields[key].annotation
    kind = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind
    return getattr(typing.get_origin(kind) or kind, "__name__", str(kind))
