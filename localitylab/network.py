"""Whether the Hugging Face hub can be reached, asked once per process.

huggingface_hub retries a request that fails to connect (five times, with waits of up to
8 s), so with no network a `--pretrained` model or an `hf:` data set took a minute and
twenty lines of retries before saying that it is not in the cache. Before the first hub
lookup, `hub_offline()` opens one TCP connection to the hub's host (HF_ENDPOINT) with a
short timeout; if the name does not resolve or nothing answers, the process switches
huggingface_hub (and `datasets`) to offline mode, so every later lookup reads the local
cache only and fails at once when the file is not there.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

CONNECT_TIMEOUT = 1.5  # seconds for the one connection attempt
_state: dict = {}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def _reachable(url: str, timeout: float = CONNECT_TIMEOUT) -> bool:
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, socket.timeout):  # gaierror, refused, unreachable, timed out
        return False


def _set_offline(value: bool) -> None:
    """Offline mode on (or back as it was) for huggingface_hub, `datasets` and later imports."""
    import sys

    if value:
        _state.setdefault("environ", os.environ.get("HF_HUB_OFFLINE"))
        os.environ["HF_HUB_OFFLINE"] = "1"
    elif "environ" in _state:
        previous = _state.pop("environ")
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is None and value:
        try:
            from huggingface_hub import constants
        except ImportError:
            constants = None
    if constants is not None:
        constants.HF_HUB_OFFLINE = value or _true(os.environ.get("HF_HUB_OFFLINE"))
    config = sys.modules.get("datasets.config")  # imported later, it reads the variable set above
    if config is not None:
        config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE if constants is not None else value
        if hasattr(config, "HF_DATASETS_OFFLINE"):
            config.HF_DATASETS_OFFLINE = config.HF_HUB_OFFLINE


def _true(value: str | None) -> bool:
    return (value or "").upper() in ("1", "ON", "YES", "TRUE")


def offline_by_setting() -> bool:
    """Whether the user set offline mode (HF_HUB_OFFLINE), rather than this module finding the hub unreachable."""
    return "environ" not in _state and (_true(os.environ.get("HF_HUB_OFFLINE"))
                                        or _true(os.environ.get("TRANSFORMERS_OFFLINE")))


def hub_offline() -> bool:
    """True when hub lookups must use the local cache only: the user set HF_HUB_OFFLINE, or the
    hub's host did not answer (then offline mode is switched on for the rest of the process;
    the host is asked once per endpoint)."""
    if offline_by_setting() or "environ" in _state:
        return True
    endpoint = hub_endpoint()
    checked = _state.setdefault("checked", {})
    if endpoint not in checked:
        checked[endpoint] = _reachable(endpoint)
    if not checked[endpoint]:
        _set_offline(True)
        _state["unreachable"] = endpoint
    return not checked[endpoint]


def why_offline() -> str:
    """Half a sentence: why the hub was not asked."""
    if "unreachable" in _state and "environ" in _state:
        return f"the hub ({_state['unreachable']}) could not be reached"
    return "the hub is offline (HF_HUB_OFFLINE)"


def reset() -> None:
    """Forget the answer and undo offline mode where this module set it (tests)."""
    _set_offline(False)
    _state.clear()
