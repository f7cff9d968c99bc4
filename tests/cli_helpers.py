"""Running the command line, for the tests: in-process or as a real process.

`run_cli(args)` calls `cli.main.main` (the `localitylab` entry point, which returns the exit
status) with stdout and stderr captured, and also collects the warnings the command raised:
a real process prints those on stderr, where they would break the one-line error.

`run_command(*args)` runs `python -m cli.main ARGS` (or another module) as a real process
from the repository root and waits; `start_command` starts one and returns at once (to be
signalled or killed). These are the suite's one way to start a process.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _process(args, module: str | None, env: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    python = [sys.executable, "-m", module] if module else [sys.executable]
    return [*python, *map(str, args)], {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}


def run_command(*args, module: str | None = "cli.main", env: dict[str, str] | None = None, cwd: Path = ROOT,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (`python ARGS` with module=None) to the end, output captured as
    text; `env` adds variables."""
    argv, environment = _process(args, module, env)
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=environment, timeout=timeout)


def start_command(*args, module: str = "cli.main", env: dict[str, str] | None = None, cwd: Path = ROOT,
                  new_session: bool = False) -> subprocess.Popen:
    """`python -m MODULE ARGS`, started and not waited for; with `new_session` it leads its
    own process group (so that killing the group also kills the workers it starts)."""
    argv, environment = _process(args, module, env)
    return subprocess.Popen(argv, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)


@dataclass
class CliResult:
    status: int | None  # None when an exception escaped main()
    out: str
    err: str  # stderr, plus the warnings a real process would print there
    exception: BaseException | None = None

    @property
    def err_lines(self) -> list[str]:
        return self.err.strip().splitlines()


def run_cli(args: list[str]) -> CliResult:
    from cli.main import main

    out, err = io.StringIO(), io.StringIO()
    status, exception = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main([str(a) for a in args])
            except SystemExit as done:
                status = done.code if isinstance(done.code, int) else 1
            except BaseException as escaped:  # noqa: BLE001 - a test of what escapes
                if isinstance(escaped, KeyboardInterrupt):
                    raise
                exception = escaped
    shown = {}
    for w in caught:
        # Python shows a warning once per place by default, and hides deprecations outside __main__.
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
            continue
        shown.setdefault((str(w.message), w.category, w.filename, w.lineno),
                         warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    text = err.getvalue() + "".join(shown.values())
    if exception is not None:
        text += f"Traceback (most recent call last):\n{type(exception).__name__}: {exception}\n"
    return CliResult(status, out.getvalue(), text, exception)


def tree(*roots: Path) -> set[str]:
    """Every file and folder under `roots`, as paths: a snapshot to compare before and after."""
    found = set()
    for root in roots:
        for folder, dirs, files in os.walk(root):
            found.update(os.path.join(folder, name) for name in dirs + files)
    return found


def assert_one_line_error(result: CliResult, message: str) -> str:
    """Exit status 2, exactly one line on stderr that names the problem, no traceback."""
    assert result.exception is None, f"an exception escaped: {result.err}"
    assert result.status == 2, f"status {result.status}; stderr: {result.err}"
    lines = result.err_lines
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {result.err}"
    assert lines[0].startswith("localitylab: error: "), lines[0]
    assert "Traceback" not in result.err
    assert message in lines[0], f"{message!r} not in {lines[0]!r}"
    return lines[0]
