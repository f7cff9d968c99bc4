"""Parsing helpers shared by commands."""

from __future__ import annotations

from typing import Any


def parse_model_kw(items: list[str] | None, flag: str = "--model-kw") -> dict[str, Any]:
    """['depth=6', 'qk_norm=True'] -> {'depth': 6, 'qk_norm': True}; `flag` names the option
    in error messages (`--opt` uses the same syntax)."""
    from localitylab.settings import parse_key_values

    return parse_key_values(items, flag)


def parse_timesteps(text: str | None) -> list[int] | None:
    """'999,500,100,10' -> [999, 500, 100, 10]; None stays None (the model's defaults)."""
    if text is None:
        return None
    from localitylab.errors import UserError

    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--timesteps must be integers separated by commas, e.g. 999,500,100,10; got {text!r}") from None
    if not levels:
        raise UserError("--timesteps needs at least one noise level, e.g. 999,500,100,10")
    return levels


def training_options(name: str):
    """Decorator for a command that starts a run (`train`, `pretrain mae`): its arguments and
    options are TrainConfig's fields that the command offers (type, default, help from the
    field), then --nproc and --quiet. The function receives the TrainConfig, nproc and quiet.
    """
    import functools
    import inspect
    import typing
    from pathlib import Path
    from typing import List, Optional

    import typer

    from localitylab.train.config import COMMANDS, TrainConfig, about, flag

    command = next(c for c in COMMANDS.values() if c.name == name)
    fields = TrainConfig.model_fields
    parameters, from_command_line = [], {}
    for option in command.options:
        field, meta = fields[option], about(option)
        annotation, default = field.annotation, command.default(option)
        if field.is_required():
            parameters.append((option, annotation, typer.Argument(..., help=command.describe(option))))
            continue
        names = [flag(option)]
        if annotation in (bool, Optional[bool]):
            names = [f"{flag(option)}/--no-{flag(option)[2:]}"]
        elif annotation == dict[str, Any]:  # key=value, repeated; TrainConfig parses them
            annotation, default = Optional[List[str]], None
        elif meta["path"]:
            annotation = Optional[Path]
            from_command_line[option] = lambda value: str(value) if value is not None else None
        elif meta["off"] is not None:  # None is spelt `off` (clip_grad 0): not optional here
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
            annotation = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
            off = meta["off"]
            default = annotation(off) if default is None else default
            from_command_line[option] = lambda value, off=off: None if value == off else value
        parameters.append((option, annotation, typer.Option(default, *names, help=command.describe(option))))
    parameters += [("nproc", int, typer.Option(1, "--nproc", help="Processes to train on (DDP through torchrun; GPUs or CPU).")),
                   ("quiet", bool, typer.Option(False, "--quiet/--no-quiet", help="No progress bar; one line per epoch."))]

    def decorate(function):
        # A command that can train across nodes takes `nnodes` (inside a SLURM allocation).
        nodes = "nnodes" in inspect.signature(function).parameters
        options = parameters + ([("nnodes", int, typer.Option(1, "--nnodes", help="Nodes to train on, inside a SLURM "
                                                               "allocation (srun starts torchrun on each; --nproc per node)."))]
                                if nodes else [])

        @functools.wraps(function)
        def run(context: typer.Context, **values):
            nproc, quiet = values.pop("nproc"), values.pop("quiet")
            more = {"nnodes": values.pop("nnodes")} if nodes else {}
            # Only what the user typed: the rest takes the data set's default or the global one,
            # and the run records which (TrainConfig.recipe_from).
            values = {key: from_command_line.get(key, lambda v: v)(value) for key, value in values.items()
                      if _given(context, key)}
            return function(command.config(values), nproc, quiet, **more)

        run.__signature__ = inspect.Signature(
            [inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
            + [inspect.Parameter(option, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
               for option, annotation, default in options])
        run.__annotations__ = {"context": typer.Context,
                               **{option: annotation for option, annotation, _ in options}}
        return run

    return decorate


def _given(ctx, name: str) -> bool:
    """Was option `name` typed (or its argument given), rather than left at its default?"""
    source = ctx.get_parameter_source(name)
    return source is None or source.name != "DEFAULT"


def slurm_options(function):
    """Decorator: SlurmSettings' fields become options of the command (their flags from their
    names, their help from their descriptions, all unset by default); the function receives
    `slurm`, the values given ({name: value}, `slurm_opt` parsed from key=value)."""
    import functools
    import inspect
    import types
    import typing
    from typing import List, Optional

    import typer

    from cli.errors import flag_of
    from localitylab.studies.slurm import SlurmSettings

    added = []
    for name, field in SlurmSettings.model_fields.items():
        kind = field.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `str | None`: the str
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        annotation = Optional[List[str]] if (typing.get_origin(kind) or kind) is dict else Optional[kind]
        added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                       default=typer.Option(None, flag_of(name), help=field.description)))
    own = [p for p in inspect.signature(function).parameters.values() if p.name != "slurm"]

    @functools.wraps(function)
    def run(**values):
        given = {p.name: values.pop(p.name) for p in added}
        if given.get("slurm_opt") is not None:
            given["slurm_opt"] = parse_model_kw(given["slurm_opt"], flag_of("slurm_opt"))
        return function(**values, slurm={k: v for k, v in given.items() if v is not None})

    run.__signature__ = inspect.Signature(own + added)
    run.__annotations__ = {p.name: p.annotation for p in own + added}
    return run
