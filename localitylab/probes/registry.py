"""One registry for probes: the CLI, studies and reports are generic over it.

Each probe file registers its class with `@register_probe`; `localitylab/probes/__init__.py`
imports the probe files in the order of `probe all` and of the report's sections, so the
registry is full whenever the package is imported and never imports a probe itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from localitylab.errors import UserError
from localitylab.probes.base import Probe
from localitylab.probes.settings import ProbeSettings

_PROBES: dict[str, Probe] = {}


def register_probe(cls: type[Probe]) -> type[Probe]:
    """Class decorator: add one instance of the probe to the registry under `cls.name`."""
    if not cls.name or cls.name in _PROBES:
        raise ValueError(f"probe name {cls.name!r} missing or registered twice")
    _PROBES[cls.name] = cls()
    _describe_keywords()
    return cls


def _describe_keywords() -> None:
    """Keep `localitylab.probe`'s listed keywords in step with the registry (once its module is loaded)."""
    import sys

    api = sys.modules.get("localitylab.probes.api")
    if api is not None and hasattr(api, "describe_keywords"):
        api.describe_keywords()


def get_probe(name: str) -> Probe:
    """The probe called `name` (`_` taken for `-`); an unknown name gets the closest valid ones."""
    if name not in _PROBES and name.replace("_", "-") in _PROBES:
        name = name.replace("_", "-")
    if name not in _PROBES:
        import difflib

        close = difflib.get_close_matches(name.replace("_", "-"), list(_PROBES), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UserError(f"unknown probe {name!r}{hint}; valid: {', '.join(_PROBES)}, all")
    return _PROBES[name]


def probe_names() -> list[str]:
    return list(_PROBES)


# The front ends' settings are generated from every registered probe, so they are listed here,
# above the Probe, rather than in settings.py, which the Probe's own module imports.
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


def probe_fields(probes: Iterable[Probe] | None = None) -> list[ProbeField]:
    """ProbeSettings' fields, then every option of `probes` (all registered ones by default),
    each once, in declaration order."""
    if probes is None:
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
