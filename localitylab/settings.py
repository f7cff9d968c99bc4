"""One way to declare and validate settings: training recipes, study files and probe options.

A group of settings is a pydantic model deriving from `Settings`: the fields say the types
and defaults, validators say what is valid, and `parse_settings` turns any validation
failure into one `UserError` line that names the key, as the CLI and study files need.

A validator's own message is kept word for word (raise `ValueError("--lr must be ...")`),
so messages written for users stay exactly as they are; a plain type mismatch becomes
"<where><key>: expected <type>, got <value>".
"""

from __future__ import annotations

import ast
from typing import Any, Iterable, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from localitylab.errors import UserError

S = TypeVar("S", bound="Settings")


class Settings(BaseModel):
    """Base of every settings group: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


def first_error(err: ValidationError, where: str = "") -> str:
    """One line for the first problem pydantic found: the validator's message, or the key and what it expected."""
    problem = err.errors(include_url=False)[0]
    key = ".".join(str(part) for part in problem.get("loc", ()))
    context = problem.get("ctx") or {}
    if isinstance(context.get("error"), (ValueError, AssertionError)) and str(context["error"]):
        return str(context["error"])  # a validator's message, written for users
    if problem.get("type") == "extra_forbidden":
        return f"unknown key {key!r}{' in ' + where if where else ''}"
    value = problem.get("input")
    return f"{where + ' ' if where else ''}{key}: {problem.get('msg', 'invalid').lower()}, got {value!r}"


class SettingValueError(ValueError):
    """A validator's ValueError that names settings (by their Python names), which the
    InvalidSettings raised for it carries on (`UserError.settings`)."""

    def __init__(self, message: str, *, settings: tuple[str, ...]) -> None:
        super().__init__(message)
        self.settings = tuple(settings)


class InvalidSettings(UserError):
    """The UserError for settings that do not validate: the one line, and pydantic's first
    problem (`problem["loc"]`, `problem["type"]`) for callers that word it their own way."""

    def __init__(self, err: ValidationError, where: str = "") -> None:
        self.problem = err.errors(include_url=False)[0]
        error = (self.problem.get("ctx") or {}).get("error")
        super().__init__(first_error(err, where), settings=tuple(getattr(error, "settings", ())))


def parse_settings(cls: type[S], data: Mapping[str, Any], where: str = "") -> S:
    """`cls(**data)`, with a UserError naming the key for the first invalid value."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise InvalidSettings(err, where) from None


def parse_key_values(items: Iterable[str] | None, flag: str) -> dict[str, Any]:
    """['depth=6', 'qk_norm=True', 'act_layer=gelu'] -> {'depth': 6, 'qk_norm': True, 'act_layer': 'gelu'}:
    values are Python literals, a bare word is a string. `flag` names the option in errors."""
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
