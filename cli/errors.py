"""Turn user mistakes into one line on stderr and exit status 2.

The library raises `UserError`; Click (or the copy Typer vendors) raises usage errors. Both
become `localitylab: error: <what is wrong>`, with no traceback unless `--debug` is given.
"""

from __future__ import annotations

import re
import sys
import warnings


def _exception_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, exits, aborts, no-args-help) from plain Click and Typer's vendored Click."""
    usage, exits, aborts, no_args = [], [], [], []
    modules = []
    for name in ("click", "typer._click"):
        try:
            modules.append(__import__(name, fromlist=["exceptions"]))
        except ImportError:
            pass
    for module in modules:
        exc = module.exceptions
        usage.append(exc.ClickException)
        for attr, bucket in (("Exit", exits), ("Abort", aborts), ("NoArgsIsHelpError", no_args)):
            if hasattr(exc, attr):
                bucket.append(getattr(exc, attr))
    import typer.exceptions

    for attr, bucket in (("Exit", exits), ("Abort", aborts)):
        if hasattr(typer.exceptions, attr):
            bucket.append(getattr(typer.exceptions, attr))
    return tuple(usage), tuple(exits), tuple(aborts), tuple(no_args)


def run_cli(command, argv: list[str]) -> int:
    usage_errors, exits, aborts, no_args = _exception_types()
    debug = "--debug" in argv
    with warnings.catch_warnings():
        warnings.showwarning = notes(warnings.showwarning)
        return _run(command, argv, debug, usage_errors, exits, aborts, no_args)


def notes(show):
    """The library's own warnings (its categories, e.g. an image cache it could not write) as
    one line on stderr, `localitylab: note: ...`; any other warning as `show` shows it."""

    def shown(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] == "localitylab":
            print(f"localitylab: note: {one_line(str(message))}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return shown


def _run(command, argv: list[str], debug: bool, usage_errors, exits, aborts, no_args) -> int:
    from localitylab.errors import RunStopped, UserError

    try:
        result = command.main(args=argv, prog_name="localitylab", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except no_args as shown:  # `localitylab` alone: the help, as a usage hint
        print(shown.format_message(), file=sys.stderr)
        return 2
    except exits as done:
        return getattr(done, "exit_code", 0)
    except RunStopped as stopped:  # a training run asked to stop: checkpoint written, not an error
        print(f"localitylab: {one_line(str(stopped))}", file=sys.stderr)
        return stopped.exit_code
    except aborts + (KeyboardInterrupt,):
        print("localitylab: interrupted", file=sys.stderr)
        return 130
    except usage_errors as err:
        if debug:
            raise
        print(f"localitylab: error: {one_line(err.format_message())}", file=sys.stderr)
        return 2
    except UserError as err:
        if debug:
            raise
        print(f"localitylab: error: {one_line(spoken(err))}", file=sys.stderr)
        return 2


# Settings whose flag is not their name with dashes (the library's name -> the CLI's flag).
FLAGS = {"n_images": "--images"}


def flag_of(setting: str) -> str:
    """The command-line flag of a library setting: batch_size -> --batch-size."""
    return FLAGS.get(setting, "--" + setting.replace("_", "-"))


def spoken(err) -> str:
    """The library's message with each setting it names (`err.settings`) said as its flag; a
    word of a path (runs/out/ckpt.pt) is left as it is."""
    text = str(err)
    for name in sorted(getattr(err, "settings", ()), key=len, reverse=True):
        text = re.sub(rf"(?<![\w./\\-]){re.escape(name)}(?![\w/\\-])", flag_of(name), text)
    return text


def said(text: str, settings) -> str:
    """A library text (a setting's help, a data set's description) with each setting it names
    in backticks (`init_from`) said as its flag (--init-from); other backticked words stay."""
    return re.sub(r"`(\w+)`", lambda m: flag_of(m[1]) if m[1] in settings else m[0], text)


def one_line(text: str) -> str:
    return " ".join(text.split())
