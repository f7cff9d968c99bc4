"""One registry for probes: the CLI, studies and reports are generic over it."""

from __future__ import annotations

from localitylab.errors import UserError
from localitylab.probes.base import Probe

_PROBES: dict[str, Probe] = {}


def register_probe(cls: type[Probe]) -> type[Probe]:
    """Class decorator: add one instance of the probe to the registry under `cls.name`."""
    if not cls.name or cls.name in _PROBES:
        raise ValueError(f"probe name {cls.name!r} missing or registered twice")
    _PROBES[cls.name] = cls()
    return cls


def get_probe(name: str) -> Probe:
    _ensure_loaded()
    if name not in _PROBES:
        raise UserError(f"unknown probe {name!r}; valid: {', '.join(_PROBES)}, all")
    return _PROBES[name]


def probe_names() -> list[str]:
    _ensure_loaded()
    return list(_PROBES)


_loaded = False


def _ensure_loaded() -> None:
    # Each probe file registers itself on import. Add a new probe's module here.
    global _loaded
    if not _loaded:
        _loaded = True
        import importlib

        for module in PROBE_MODULES:
            importlib.import_module(f"localitylab.probes.{module}")


# One line per probe file.
# The order is the order of `probe all` and of report sections: attention first, then the
# position embedding, then the probes that put ConvNets on the same scale, then the ones
# for particular checkpoints (mae-reconstruction: MAE pre-training only).
PROBE_MODULES: list[str] = ["attention_distance", "attention_maps", "pe_similarity", "receptive_field", "permutation",
                             "mae_reconstruction"]
