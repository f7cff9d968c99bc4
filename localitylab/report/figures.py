"""A figure as the report embeds it: its title, the PNG as a data URI, and its caption."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Figure:
    title: str
    data_uri: str
    caption: str = ""


def image_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
