"""The settings of a probe run, declared once: the CLI's `probe` flags, a study file's
[probes] keys and the keywords of `localitylab.probe(...)` are all generated from here.

`ProbeSettings` holds what every probe takes (images, batch size, seed, device, noise
levels); each probe declares its own options as the fields of its `Options` class
(`option(default, help)`), and `probe_fields` (localitylab/probes/registry.py) lists both. A new probe option is one field in
its probe's `Options`: it appears as a command-line option, as a [probes] key and as a keyword. Errors
name the setting by its Python name (`batch_size must be at least 1, got 0`, with
`setting="batch_size"`); the CLI alone says it as a flag.
"""

from __future__ import annotations

import ast
from typing import Annotated, Any, Mapping

from pydantic import BeforeValidator, Field, ValidationError

from localitylab.errors import UserError
from localitylab.settings import Settings, first_error


def option(default: Any, help: str, **extra: Any) -> Any:
    """A probe setting or option: its default and the help the CLI, study files and the API show."""
    return Field(default, description=help, json_schema_extra=extra or None)


def _at_least_one(value: Any, info) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{info.field_name} must be a whole number >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{info.field_name} must be at least 1, got {value}")
    return value


def _timesteps(value: Any) -> Any:
    """'999,500' (the CLI's and a study's spelling) or a sequence of integers."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"timesteps must be integers separated by commas, e.g. 999,500,100,10; "
                             f"got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"timesteps must be one or more integer noise levels, e.g. 999,500,100,10; got {value!r}")
    return list(value)


AtLeastOne = Annotated[int, BeforeValidator(_at_least_one)]


class ProbeSettings(Settings):
    """What every probe takes. `n_images` None: each probe's own default (`Probe.default_images`;
    None there: the whole test split up to `Probe.max_default_images`)."""

    n_images: AtLeastOne | None = option(None, "How many test images (a seeded subset); default: each probe's "
                                         "own (Probe.default_images; `probe list` shows it).")
    batch_size: AtLeastOne = option(64, "Images per forward pass.")
    seed: int = option(0, "Seed for the image subset and any randomness in the probe.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.", in_memory=False)
    timesteps: Annotated[list[int] | None, BeforeValidator(_timesteps)] = option(
        None, "A diffusion model's noise levels to probe at, e.g. 999,500,100,10 (its defaults when not given).")
    over_training: bool = option(False, "Probe every snapshot of the run (trained with snapshots) on the same images: "
                                 "<out>/over-training/<probe>.csv gains step and epoch columns; snapshots already "
                                 "probed are not probed again.", in_memory=False)


def checked(cls: type[Settings], values: Mapping[str, Any]) -> Any:
    """`cls(**values)`, a failure raised as a UserError that names the setting it is about."""
    try:
        return cls.model_validate(dict(values))
    except ValidationError as err:
        problem = err.errors(include_url=False)[0]
        name = str(problem["loc"][0]) if problem.get("loc") else None
        message = first_error(err)
        if problem.get("type") == "extra_forbidden":
            message = f"unknown setting {name!r}; valid: {', '.join(cls.model_fields)}"
        raise UserError(message, setting=name) from None


def literal(text: str) -> Any:
    """A value as typed on the command line: a Python literal, or a bare word as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
