"""A study's pieces as SLURM jobs, through submitit.

Every training, probing and sampling piece is one job; the trainings that start from
nothing are one job array; a probe (or a sampling) waits for its run's training job
(`afterok`: a job whose piece failed still ends well, so the probe runs and reports that;
a job that was cancelled, pre-empted or killed cancels the probe's job with it). Each job runs the
same function the local executor runs, in the Python environment the study was submitted
from, and reads and writes only the study folder, so a shared file system is all the
cluster needs. Logs: <out>/slurm/logs/<job id>/, named per piece in <out>/slurm/jobs.json.

A job's outcome is read from its result file (submitit's), its liveness from `squeue`, so
no accounting database (`sacct`) is needed. A piece that is done on disk is never
submitted again; a piece whose job is still queued or running is waited for, not
resubmitted; any other piece (failed, cancelled, pre-empted, never submitted) is submitted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from localitylab.errors import UserError
from localitylab.io import write_json
from localitylab.studies.pieces import call_piece, piece_work
from localitylab.studies.spec import SlurmSettings

LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
        "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
# A job that ended this way did not run its piece to the end: resuming the study submits the piece again.
STOPPED = {"CANCELLED", "PREEMPTED", "TIMEOUT", "NODE_FAIL", "DEADLINE", "BOOT_FAIL", "OUT_OF_MEMORY"}


# --- on the node -------------------------------------------------------------------------
class PieceNotDone(Exception):
    """Ends a job whose piece did not finish with a failing status, so that SLURM cancels the
    jobs that wait for it (afterok) rather than probing a half-trained run."""


def run_piece(function: Callable[..., str], args: tuple, version: str) -> tuple[str, str]:
    """What a job runs: the piece, its outcome written beside the job's log (outcome.json);
    a piece that did not finish fails the job."""
    from submitit import JobEnvironment

    status, message = piece_outcome(function, args, version)
    write_json(JobEnvironment().paths.folder / "outcome.json", {"status": status, "message": message})
    if status != "done":
        raise PieceNotDone(message.splitlines()[0] if message else status)
    return status, message


def piece_outcome(function: Callable[..., str], args: tuple, version: str) -> tuple[str, str]:
    """The piece, unless this node's localitylab is not the one that submitted it.
    Returns ("done" | "failed" | "stopped" | "refused", message); "stopped": the job was
    cancelled or pre-empted (SIGTERM) and the training wrote its checkpoint first."""
    from localitylab.errors import RunStopped
    from localitylab.version import __version__

    if __version__ != version:
        return "refused", (f"{socket.gethostname()} runs localitylab {__version__} ({sys.executable}), but the study was "
                           f"submitted with {version}; install the same version there")
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or None
    if threads:
        args = (*args[:-1], threads)  # every piece function takes its thread count last
    stopped: list[str] = []

    def attempt(*arguments):
        try:
            return function(*arguments)
        except RunStopped as signal:
            stopped.append(" ".join(str(signal).split()))
            raise

    ok, message = call_piece(attempt, *args)
    if stopped:
        return "stopped", stopped[0]
    return ("done" if ok else "failed"), message


# --- the record of submitted jobs ----------------------------------------------------------
@dataclass
class JobRecord:
    """<out>/slurm/jobs.json: {piece name: {"job": id, "folder": submitit folder}} and the settings."""

    out: Path
    jobs: dict[str, dict[str, str]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.out / "slurm" / "jobs.json"

    @classmethod
    def load(cls, out: Path) -> "JobRecord":
        path = out / "slurm" / "jobs.json"
        if not path.is_file():
            return cls(out)
        data = json.loads(path.read_text())
        return cls(out, data.get("jobs", {}), data.get("settings", {}))

    def write(self) -> None:
        write_json(self.path, {"jobs": self.jobs, "settings": self.settings})

    def log(self, name: str) -> Path:
        return _paths(self.jobs[name]).stdout

    def outcome(self, name: str) -> tuple[str, str] | None:
        """(status, message) from the job's result file; None while it has none."""
        paths = _paths(self.jobs[name])
        written = paths.folder / "outcome.json"
        if written.is_file():
            outcome = json.loads(written.read_text())
            return outcome["status"], outcome["message"]
        if not paths.result_pickle.is_file():
            return None
        from submitit.core.utils import pickle_load

        kind, value = pickle_load(paths.result_pickle)
        if kind == "success":
            return tuple(value)
        return "broken", str(value).strip().splitlines()[-1]  # submitit itself failed before the piece ran


def _paths(entry: dict[str, str]):
    from submitit.core.utils import JobPaths

    return JobPaths(entry["folder"], job_id=entry["job"], task_id=0)


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: state} of these jobs as squeue knows them (array tasks one by one); a job
    that squeue no longer lists is absent."""
    if not job_ids:
        return {}
    wanted = {j.split("_")[0] for j in job_ids}
    try:
        listed = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i %T", "-j", ",".join(sorted(wanted))],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"cannot ask SLURM about the study's jobs (squeue): {err}") from None
    states = {}
    for line in listed.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    if listed.returncode != 0 and not states:  # squeue refuses a list with a purged job: ask one by one
        for job in wanted if len(wanted) > 1 else ():
            states.update(queue_states([job]))
    return states


def check_sbatch() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("executor 'slurm' submits through submitit, which is not installed: "
                        "pip install 'localitylab[slurm]'", setting="executor") from None
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise UserError("SLURM's sbatch and squeue are not on PATH here; submit from a machine of the cluster "
                        "(a login node), or run the study with executor 'local'", setting="executor")


def cancel(job_ids: list[str]) -> None:
    """scancel these jobs (those still queued or running)."""
    if job_ids:
        subprocess.run(["scancel", *sorted(set(job_ids))], capture_output=True, timeout=60)


# --- submitting ------------------------------------------------------------------------------
@dataclass
class Work:
    """One piece as a job: what it runs, and the pieces (by name) whose jobs it waits for."""

    piece: Any
    function: Callable[..., str]
    args: tuple
    after: list[str] = field(default_factory=list)
    alike: bool = False  # one of the pieces submitted together as one job array

    @property
    def name(self) -> str:
        return self.piece.name


def submission(settings: SlurmSettings, after_jobs: list[str] = ()) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for one piece's job (or one array of them)."""
    extra = {key: str(value) for key, value in settings.slurm_opt.items()}
    if after_jobs:  # a piece's job returns normally even when the piece failed: afterok fails only if the job died
        extra["dependency"] = "afterok:" + ":".join(after_jobs)
        extra["kill-on-invalid-dep"] = "yes"  # ... and then SLURM cancels the waiting job (resuming submits both)
    parameters: dict[str, Any] = {"job_name": "localitylab", "time": settings.time, "cpus_per_task": settings.cpus_per_run,
                                  "additional_parameters": extra, "stderr_to_stdout": True}
    if settings.partition:
        parameters["partition"] = settings.partition
    if settings.account:
        parameters["account"] = settings.account
    if settings.gpus_per_run:
        parameters["gpus_per_node"] = settings.gpus_per_run
    return parameters


def submit(work: list[Work], record: JobRecord, settings: SlurmSettings, waiting: dict[str, str]) -> None:
    """Submit the pieces (the alike ones as one array, the others one job each, after the jobs
    of the pieces they wait for), recording each job as soon as it exists."""
    from localitylab.version import __version__

    folder = record.out / "slurm" / "logs" / "%j"
    alike = [w for w in work if w.alike and not w.after]
    groups = ([alike] if len(alike) > 1 else []) + [[w] for w in work if len(alike) <= 1 or w not in alike]
    for group in groups:
        after = sorted({waiting[name] for w in group for name in w.after if name in waiting})
        executor = _executor(folder, settings, after)
        try:  # submitit echoes sbatch's complaints on stderr: they come back in the error, once
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
                    _maybe_batch(executor, len(group) > 1):
                jobs = [executor.submit(run_piece, w.function, w.args, __version__) for w in group]
        except Exception as err:  # sbatch said no: its own words, in one line
            record.write()
            named = _named_in(_sbatch_words(err), settings)
            given = "".join(f" ({name} = {getattr(settings, name)!r})" for name in named)
            raise UserError(f"SLURM refused the job of {group[0].name}: {_sbatch_words(err)}{given}",
                            settings=named) from None
        for w, job in zip(group, jobs):
            record.jobs[w.name] = {"job": str(job.job_id), "folder": str(folder)}
            waiting[w.name] = str(job.job_id)
        record.write()


def _maybe_batch(executor, batch: bool):
    """submitit's batch() (the pieces as one job array), or nothing."""
    return executor.batch() if batch else contextlib.nullcontext()


def _executor(folder: Path, settings: SlurmSettings, after: list[str]):
    from submitit import SlurmExecutor

    executor = SlurmExecutor(folder=folder, max_num_timeout=0)
    executor.update_parameters(**submission(settings, after))
    return executor


def _sbatch_words(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if "error" in line.lower() and line.strip()]
    text = (lines[-1] if lines else str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__)
    return text.replace("sbatch: error: ", "")


def _named_in(message: str, settings: SlurmSettings) -> tuple[str, ...]:
    """The settings SLURM's refusal is about (an unknown partition or account)."""
    lowered = message.lower()
    return tuple(name for name in ("partition", "account") if name in lowered and getattr(settings, name))


# --- waiting ---------------------------------------------------------------------------------
@dataclass
class Watch:
    """The jobs a study waits for; `step` looks once and says what ended."""

    record: JobRecord
    waiting: dict[str, str]  # piece name -> job id

    def step(self) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
        """({piece: (status, message)} of the pieces whose job ended since the last look, {job: state} of the rest)."""
        states = queue_states(list(self.waiting.values()))
        ended = {}
        for name, job in list(self.waiting.items()):
            state = states.get(job, "GONE")
            if state in LIVE:
                continue
            outcome = self.record.outcome(name)
            if outcome is None:
                if state == "COMPLETED" or state == "GONE":  # the result file may trail the job's end a moment
                    time.sleep(0.2)
                    outcome = self.record.outcome(name)
                if outcome is None:
                    outcome = ("stopped", f"job {job} {state.lower()}") if state in STOPPED else \
                        ("broken", f"job {job} ended {state.lower()} before its piece ran")
            ended[name] = outcome
            del self.waiting[name]
        return ended, {job: states.get(job, "GONE") for job in self.waiting.values()}


def run_on_slurm(plan, ledger, settings: SlurmSettings, detach: bool,
                 progress: Callable[[int, int, dict[str, str]], None] | None) -> bool:
    """Submit what is neither done nor queued, then (unless `detach`) wait for every job,
    recording each piece in the ledger as its job ends. False when detached."""
    check_sbatch()
    record = JobRecord.load(plan.out)
    record.settings = settings.model_dump()
    live = queue_states([entry["job"] for entry in record.jobs.values()])
    waiting: dict[str, str] = {}
    work, pieces = [], {}
    for piece, is_done, function, args, after in piece_work(plan):
        pieces[piece.name] = piece
        if is_done():
            ledger.skip(piece)  # done on disk: never submitted again
        elif piece.name in record.jobs and live.get(record.jobs[piece.name]["job"]) in LIVE:
            waiting[piece.name] = record.jobs[piece.name]["job"]
            ledger.log(f"{ledger.progress()} queued {piece.name}: job {waiting[piece.name]} (submitted before)")
        else:
            work.append(Work(piece, function, args, after, alike=piece.name.startswith("train ")))
    submit(work, record, settings, waiting)
    for w in work:
        ledger.log(f"{ledger.progress()} submit {w.name}: job {waiting[w.name]}, log {record.log(w.name)}")
    if detach:
        ledger.write()
        return False
    _wait(Watch(record, waiting), pieces, ledger, settings, progress)
    return True


def _wait(watch: Watch, pieces: dict[str, Any], ledger, settings: SlurmSettings,
          progress: Callable[[int, int, dict[str, str]], None] | None) -> None:
    """Look at the queue every poll_interval seconds until every job has ended. A job that
    ended before its piece ran (or on a node with another localitylab) stops the study: the
    other jobs are cancelled and a UserError names the job's log."""
    total = len(watch.waiting)
    while watch.waiting:
        ended, states = watch.step()
        for name, (status, message) in ended.items():
            log = watch.record.log(name)
            if status in ("broken", "refused"):
                ledger.record(pieces[name], False, f"{message} (log: {log})")
                cancel(list(watch.waiting.values()))
                ledger.write()
                raise UserError(f"{name}: {message}; its log: {log}")
            ledger.record(pieces[name], status == "done", message if status != "stopped" else
                          f"{message}; resuming the study submits it again (log: {log})")
        if progress is not None:
            progress(total - len(watch.waiting), total, states)
        if watch.waiting:
            time.sleep(settings.poll_interval)


def live_jobs(out: Path) -> list[str]:
    """The study's jobs that are still queued or running."""
    record = JobRecord.load(Path(out))
    states = queue_states([entry["job"] for entry in record.jobs.values()])
    return [job for job, state in states.items() if state in LIVE]


def study_status(out: Path) -> list[dict[str, str]]:
    """Each piece of the study in `out`: its job, its state and its log."""
    out = Path(out)
    if not (out / "study.json").is_file():
        raise UserError(f"{out} holds no study (no study.json)", setting="folder")
    ledger = json.loads((out / "study.json").read_text())
    record = JobRecord.load(out)
    states = queue_states([entry["job"] for entry in record.jobs.values()]) if record.jobs and shutil.which("squeue") else {}
    rows = []
    for name in ledger.get("pieces", []):
        entry = record.jobs.get(name)
        row = {"piece": name, "job": entry["job"] if entry else "", "log": str(record.log(name)) if entry else ""}
        state = states.get(entry["job"]) if entry else None
        outcome = record.outcome(name) if entry else None
        if name in ledger.get("done", []) or name in ledger.get("skipped", []):
            row["state"] = "done"
        elif state in LIVE:
            row["state"] = state.lower()
        elif outcome is not None:
            row["state"] = {"done": "finished (resuming the study collects it)",
                            "stopped": f"stopped (resuming the study submits it again): {outcome[1]}"}.get(outcome[0],
                                                                                                f"failed: {outcome[1]}")
        elif name in ledger.get("failed", {}):
            row["state"] = "failed: " + ledger["failed"][name].splitlines()[0]
        elif entry:
            row["state"] = f"ended {(state or 'gone').lower()} without a result (resuming the study submits it again)"
        else:
            row["state"] = "not submitted"
        rows.append(row)
    return rows
