"""The settings of a probe run, declared once: the CLI's `probe` flags, a study file's
[probes] keys and the keywords of `localitylab.probe(...)` are all generated from here.

`ProbeSettings` holds what every probe takes (images, batch size, seed, device, noise
levels); each probe declares its own options as the fields of its `Options` class
(`option(default, help)`), and `probe_fields` lists both. A new probe option is one field in
its probe's `Options`: it appears as a command-line option, as a [probes] key and as a keyword. Errors
name the setting by its Python name (`batch_size must be at least 1, got 0`, with
`setting="batch_size"`); the CLI alone says it as a flag.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Mapping, Sequence

from pydantic import BeforeValidator, Field, ValidationError

from localitylab.errors import UserError
from localitylab.settings import Settings, first_error

if TYPE_CHECKING:
    from localitylab.probes.base import Probe


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


@dataclass(frozen=True)
class ProbeField:
    """One setting as the front ends offer it: its name, default, help, and whose it is
    ('' for a setting of every probe, else the probes that declare it as an option)."""

    name: str
    default: Any
    help: str
    annotation: Any
    probes: tuple[str, ...] = ()
    in_memory: bool = True  # a keyword of `localitylab.probe` (a model in memory has its own device)


def probe_fields(probes: Iterable["Probe"] | None = None) -> list[ProbeField]:
    """ProbeSettings' fields, then every option of `probes` (all registered ones by default),
    each once, in declaration order."""
    if probes is None:
        from localitylab.probes.registry import get_probe, probe_names

        probes = [get_probe(name) for name in probe_names()]
    fields = [ProbeField(name, info.get_default(), info.description or "", info.annotation, (),
                         (info.json_schema_extra or {}).get("in_memory", True))
              for name, info in ProbeSettings.model_fields.items()]
    index = {field.name: i for i, field in enumerate(fields)}
    for probe in probes:
        for name, info in probe.Options.model_fields.items():
            if name in index:
                known = fields[index[name]]
                if not known.probes:
                    raise ValueError(f"probe {probe.name}'s option {name!r} clashes with the setting of every probe")
                fields[index[name]] = ProbeField(name, known.default, known.help, known.annotation,
                                                 known.probes + (probe.name,))
                continue
            index[name] = len(fields)
            fields.append(ProbeField(name, info.get_default(), info.description or "", info.annotation, (probe.name,)))
    return fields


@dataclass
class ProbeRun:
    """Checked settings of one run of several probes: the common ones and each probe's options."""

    settings: ProbeSettings
    options: list[Settings]  # one per probe, in the order given
    given: dict[str, Any]  # the probe options as given (for meta.json)


def parse_probe_settings(probes: Sequence["Probe"], values: Mapping[str, Any]) -> ProbeRun:
    """Split `values` into ProbeSettings and each probe's options and check them all (no model
    needed). An unknown key, or a value a probe cannot use, is a UserError naming the setting."""
    common = {k: v for k, v in values.items() if k in ProbeSettings.model_fields}
    given = {k: v for k, v in values.items() if k not in ProbeSettings.model_fields}
    known = {name for probe in probes for name in probe.option_names()}
    unknown = sorted(set(given) - known)
    if unknown:
        valid = [*ProbeSettings.model_fields, *sorted(known)]
        raise UserError(f"unknown setting {unknown[0]!r} for {', '.join(p.name for p in probes)}; valid: "
                        f"{', '.join(valid)}", settings=(unknown[0], *valid))
    settings = checked(ProbeSettings, common)
    options = [probe.parse_options({k: v for k, v in given.items() if k in probe.option_names()}) for probe in probes]
    return ProbeRun(settings, options, given)


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
