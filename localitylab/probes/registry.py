"""One registry for probes: the CLI, studies and reports are generic over it.

Each probe file registers its class with `@register_probe`; `localitylab/probes/__init__.py`
imports the probe files in the order of `probe all` and of the report's sections, so the
registry is full whenever the package is imported and never imports a probe itself.
"""

from __future__ import annotations

from localitylab.errors import UserError
from localitylab.probes.base import Probe

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
