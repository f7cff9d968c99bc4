"""One way to declare and validate settings: training recipes, study files and probe options.

A group of settings is a pydantic model deriving from `Settings`: the fields say the types
and defaults, validators say what is valid, and `parse_settings` turns any validation
failure into one `UserError` line that names the key, as the CLI and study files need.

A validator's own message is kept word for word (raise `ValueError("--lr must be ...")`),
so messages written for users stay exactly as they are; a plain type mismatch becomes
"<where><key>: expected <type>, got <value>".
"""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

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


def parse_settings(cls: type[S], data: Mapping[str, Any], where: str = "") -> S:
    """`cls(**data)`, with a UserError naming the key for the first invalid value."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise UserError(first_error(err, where)) from None
