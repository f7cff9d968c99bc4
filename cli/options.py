"""Parsing helpers shared by commands."""

from __future__ import annotations

from typing import Any


def parse_model_kw(items: list[str] | None, setting: str = "model_kw") -> dict[str, Any]:
    """['depth=6', 'qk_norm=True'] -> {'depth': 6, 'qk_norm': True}; `setting` names the
    option in error messages, which say it as its flag (`opt` uses the same syntax)."""
    from localitylab.settings import parse_key_values

    return parse_key_values(items, setting.lstrip("-").replace("-", "_"))


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

    from cli.errors import flag_of, said
    from localitylab.train.config import COMMANDS, TrainConfig, about

    command = next(c for c in COMMANDS.values() if c.name == name)
    fields = TrainConfig.model_fields
    parameters, from_command_line = [], {}
    for option in command.options:
        field, meta = fields[option], about(option)
        annotation, default = field.annotation, command.default(option)
        if field.is_required():
            parameters.append((option, annotation, typer.Argument(..., help=said(command.describe(option), fields))))
            continue
        names = [flag_of(option)]
        if annotation in (bool, Optional[bool]):
            names = [f"{flag_of(option)}/{flag_of('no_' + option)}"]
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
        parameters.append((option, annotation, typer.Option(default, *names, help=said(command.describe(option), fields))))
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


def probe_options(fields):
    """Decorator for `probe`: after the function's own parameters (the model and where its
    data come from), one option per probe setting in `fields` (localitylab/probes/registry.py
    `probe_fields`: ProbeSettings' and every probe's options; type, default and help from the
    field). The function receives the settings the user typed as `settings` (a dict by
    Python name), the rest of its parameters as they are."""
    import functools
    import inspect
    from typing import Optional

    import typer

    from cli.errors import flag_of

    parameters = []
    for field in fields:
        shown = field.default is not None and field.default is not False
        help_text = field.help + (f" (default: {field.default})" if shown else "")
        kind = _plain_type(field.annotation)
        if kind is bool:
            option = typer.Option(None, f"{flag_of(field.name)}/--no-{flag_of(field.name)[2:]}", help=help_text,
                                  show_default=False)
            parameters.append((field.name, Optional[bool], option))
        else:
            annotation = Optional[int] if kind is int else Optional[str]
            parameters.append((field.name, annotation,
                               typer.Option(None, flag_of(field.name), help=help_text, show_default=False)))
    names = {name for name, _, _ in parameters}

    def decorate(function):
        import typing

        hints = typing.get_type_hints(function)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(function).parameters.values() if p.name != "settings"]

        @functools.wraps(function)
        def run(**values):
            from localitylab.probes.settings import literal

            typed = {name: values.pop(name) for name in list(values) if name in names}
            settings = {name: literal(value) if isinstance(value, str) and name != "device" else value
                        for name, value in typed.items() if value is not None}
            return function(settings=settings, **values)

        run.__signature__ = inspect.Signature(
            own + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                   for name, annotation, default in parameters])
        run.__annotations__ = {**{p.name: p.annotation for p in own},
                               **{name: annotation for name, annotation, _ in parameters}}
        return run

    return decorate


def _plain_type(annotation):
    """int for `int`, `int | None`, `Annotated[int, ...] | None`; likewise bool; else the annotation."""
    import typing

    while True:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = args[0]
        elif args and len(args) == 1 and typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            annotation = args[0]
        else:
            return annotation


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
    from localitylab.studies.spec import SlurmSettings

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
