"""Parsing helpers shared by commands."""

from __future__ import annotations

import ast
from typing import Any


def parse_model_kw(items: list[str] | None, flag: str = "--model-kw") -> dict[str, Any]:
    """['depth=6', 'qk_norm=True', 'act_layer=gelu'] -> {'depth': 6, 'qk_norm': True, 'act_layer': 'gelu'}.

    `flag` names the option in error messages (`--opt` uses the same syntax)."""
    from localitylab.errors import UserError

    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"{flag} expects key=value, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word is a string
        result[key] = value
    return result
