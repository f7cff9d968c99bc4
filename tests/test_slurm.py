"""`study run --executor slurm` against a real SLURM: a one-node cluster on this machine
(scripts/slurm_local.sh: munged, slurmctld and slurmd as root), started once for this file.
Where it cannot start (no root, no slurm-wlm) the tests that need it skip and say why.

One tiny study (2 nano models, 3 epochs, one cheap probe) is submitted once with --detach;
one training job is cancelled mid-training; `study status` shows it; --resume submits only
what did not finish and collects the rest; the tables equal a local run of the same study
bit for bit (CPU, one thread each). A 2-node training (two SLURM tasks on the one node)
runs beside it and is held to the single-process run with the DDP test's tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from localitylab.train import read_checkpoint
from tests.cli_helpers import ROOT, assert_one_line_error, run_cli

STUDY = """
[study]
name = "tiny-slurm"
dataset = "digits"

[recipe]
epochs = 3
batch_size = 128
warmup_epochs = 0

[[models]]
model = "resnet-n"

[[models]]
model = "vit-n/2"

[probes]
run = ["permutation"]
images = 16

[executor.slurm]
cpus_per_run = 1
time = 10
poll_interval = 0.2
"""


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF of a one-node cluster started for this file (and stopped after it)."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("a one-node SLURM needs root here (slurmd runs the jobs); run the suite as root, as CI does")
    missing = [p for p in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(p) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    folder = tmp_path_factory.mktemp("slurm-cluster")
    script = ROOT / "scripts" / "slurm_local.sh"
    started = subprocess.run([str(script), "start", str(folder)], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        pytest.skip(f"a one-node SLURM could not start here: {(started.stderr.strip().splitlines() or ['?'])[-1]}")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    yield folder
    subprocess.run([str(script), "stop", str(folder)], capture_output=True, timeout=60)
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


def _job_of(out: Path, piece: str) -> str:
    return json.loads((out / "slurm" / "jobs.json").read_text())["jobs"][piece]["job"]


def _wait_until(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.01)


def _queued(job: str) -> bool:
    listed = subprocess.run(["squeue", "-h", "-o", "%T", "-j", job], capture_output=True, text=True).stdout.split()
    return any(state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for state in listed)


@pytest.fixture(scope="module")
def slurm_study(slurm_cluster, tmp_path_factory):
    """The tiny study on SLURM, interrupted and resumed, beside the same study run here."""
    from localitylab.studies import load_study, run_study

    root = tmp_path_factory.mktemp("slurm-study")
    spec = root / "tiny.toml"
    spec.write_text(STUDY)
    out = root / "on-slurm"
    started = time.perf_counter()
    detached = run_cli(["study", "run", spec, "--out", out, "--executor", "slurm", "--detach"])
    submitted = json.loads((out / "slurm" / "jobs.json").read_text())["jobs"]
    # Two nodes simulated as two tasks on the one node, queued behind the study's jobs.
    two = root / "two-nodes"
    command = (f"cd {ROOT} && PYTHONPATH={ROOT} {sys.executable} -m cli train vit-n/2 digits --epochs 3 "
               f"--batch-size 128 --warmup-epochs 0 --quiet --nnodes 2 --nproc 1 --out {two}")
    sbatch = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={root}/two.log",
                             "--wrap", command], capture_output=True, text=True, check=True)
    two_nodes_job = sbatch.stdout.strip().split(";")[0]

    # Cancel vit's training once its first epoch is checkpointed (two epochs still to go).
    vit_job = _job_of(out, "train vit-n-p2")
    _wait_until(lambda: (out / "runs" / "vit-n-p2" / "ckpt.pt").is_file(), what="vit-n/2's first checkpoint")
    subprocess.run(["scancel", vit_job], check=True)
    cancelled_at = read_checkpoint(out / "runs" / "vit-n-p2" / "ckpt.pt")["epoch"]

    local = root / "local"  # the same study here, one thread (as each SLURM job has one CPU)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    local_started = time.perf_counter()
    try:
        run_study(load_study(spec), local, log=lambda line: None, formats=("html",))
    finally:
        torch.set_num_threads(threads)
    local_seconds = time.perf_counter() - local_started
    _wait_until(lambda: not _queued(vit_job), what="the cancelled job to leave the queue")
    status = run_cli(["study", "status", out])
    from localitylab.studies.slurm import study_status

    states = {row["piece"]: row["state"] for row in study_status(out)}

    lines: list[str] = []
    resume_started = time.perf_counter()
    from localitylab.studies.spec import slurm_settings

    study = load_study(spec)
    result = run_study(study, out, log=lines.append, formats=("html",), executor="slurm",
                       slurm=slurm_settings(study.slurm))
    _wait_until(lambda: not _queued(two_nodes_job), what="the two-node training")
    print(f"SLURM study: {time.perf_counter() - started:.1f} s in all (resume {time.perf_counter() - resume_started:.1f}"
          f" s); the same study here: {local_seconds:.1f} s")
    return {"out": out, "local": local, "detached": detached, "submitted": submitted, "status": status, "states": states, "resume": lines, "result": result,
            "cancelled_at": cancelled_at, "two": two, "two_log": root / "two.log"}


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    return {f"{p.parent.parent.name}/{p.name}": pd.read_csv(p) for p in sorted(out.glob("runs/*/probes/*.csv"))}


def test_a_detached_study_cancelled_mid_training_resumes_to_the_local_tables(slurm_study):
    out, local = slurm_study["out"], slurm_study["local"]
    detached = slurm_study["detached"]
    assert detached.status == 0, detached.err
    assert "study status" in detached.out and "--resume" in detached.out
    jobs = slurm_study["submitted"]
    assert sorted(jobs) == ["probe resnet-n", "probe vit-n-p2", "train resnet-n", "train vit-n-p2"]
    # The two trainings are one job array; each piece has its own log in the study folder.
    assert jobs["train resnet-n"]["job"].split("_")[0] == jobs["train vit-n-p2"]["job"].split("_")[0]
    assert all(Path(entry["folder"]).is_relative_to(out) for entry in jobs.values())

    status = slurm_study["status"]
    assert status.status == 0, status.err
    assert "train vit-n-p2" in status.out and "pieces done" in status.out
    states = slurm_study["states"]  # what `study status` showed
    # SIGTERM: the training checkpoints and stops (or, were it slower than KillWait, SIGKILL)
    assert states["train vit-n-p2"].startswith(("stopped (resuming the study submits it again)", "ended cancelled")), states
    assert "finished" in states["train resnet-n"] or states["train resnet-n"] == "running", states

    assert slurm_study["cancelled_at"] < 3  # it was cancelled mid-training
    submitted = [line.split("submit ")[1].split(":")[0] for line in slurm_study["resume"] if " submit " in line]
    assert "train vit-n-p2" in submitted and set(submitted) <= {"train vit-n-p2", "probe vit-n-p2"}, submitted
    assert not slurm_study["result"].failed
    assert any("skip   train resnet-n" in line for line in slurm_study["resume"])  # done: never resubmitted

    ours, theirs = _tables(out), _tables(local)
    assert ours.keys() == theirs.keys() and len(ours) == 2
    for name in ours:
        pd.testing.assert_frame_equal(ours[name], theirs[name])
    for run in ("resnet-n", "vit-n-p2"):
        a, b = read_checkpoint(out / "runs" / run / "ckpt.pt"), read_checkpoint(local / "runs" / run / "ckpt.pt")
        timeless = [[{k: v for k, v in epoch.items() if k not in ("epoch_time_s", "images_per_s")} for epoch in c["history"]]
                    for c in (a, b)]
        assert timeless[0] == timeless[1]
        assert all(torch.equal(a["model_state"][k], v) for k, v in b["model_state"].items())
    assert (out / "report" / "report.html").is_file()


def test_two_nodes_equal_one_process_within_the_ddp_tolerance(slurm_study):
    """--nnodes 2 --nproc 1 as two SLURM tasks on the one node (srun, c10d rendezvous)."""
    log = slurm_study["two_log"].read_text()
    assert (slurm_study["two"] / "ckpt.pt").is_file(), log
    single = read_checkpoint(slurm_study["local"] / "runs" / "vit-n-p2" / "ckpt.pt")
    ddp = read_checkpoint(slurm_study["two"] / "ckpt.pt")
    assert ddp["model_state"].keys() == single["model_state"].keys()
    worst = max(float((ddp["model_state"][k].float() - v.float()).abs().max()) for k, v in single["model_state"].items())
    losses = [(a["train_loss"], b["train_loss"]) for a, b in zip(single["history"], ddp["history"], strict=True)]
    print(f"2 nodes (SLURM tasks) vs one process: max weight difference {worst:.2e}")
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in losses)
    assert worst < 1e-2
    assert worst > 0  # two shards summed in another order; one process with one thread would be bit-identical


def test_a_partition_that_does_not_exist_is_one_line(slurm_cluster, tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(STUDY)
    result = run_cli(["study", "run", spec, "--out", tmp_path / "out", "--executor", "slurm", "--partition", "nope"])
    line = assert_one_line_error(result, "(--partition = 'nope')")
    assert "invalid" in line.lower()


def test_a_job_that_fails_at_start_names_its_log(slurm_cluster, tmp_path):
    """Python cannot start on the node: exit 2, one line with the job's log, the ledger intact."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(STUDY)
    out = tmp_path / "out"
    result = run_cli(["study", "run", spec, "--out", out, "--executor", "slurm",
                      "--slurm-opt", "export=ALL,PYTHONHOME=/nonexistent"])
    assert result.status == 2 and result.exception is None, result.err
    last = result.err_lines[-1]
    assert last.startswith("localitylab: error: ") and "before its piece ran" in last
    log = Path(last.split("its log: ")[1])
    assert log.is_file() and log.is_relative_to(out) and "Python" in log.read_text()
    ledger = json.loads((out / "study.json").read_text())
    assert len(ledger["pieces"]) == 4 and len(ledger["failed"]) >= 1 and not ledger["done"]


def test_without_sbatch_the_study_says_so_in_one_line(tmp_path, monkeypatch):
    spec = tmp_path / "tiny.toml"
    spec.write_text(STUDY)
    monkeypatch.setenv("PATH", str(tmp_path))
    result = run_cli(["study", "run", spec, "--out", tmp_path / "out", "--executor", "slurm"])
    assert "sbatch" in assert_one_line_error(result, "--executor")


def test_a_node_with_another_localitylab_is_refused_in_one_line():
    from localitylab.studies.slurm import piece_outcome
    from localitylab.version import __version__

    status, message = piece_outcome(lambda threads: "ran", (None,), "0.0.0-elsewhere")
    assert status == "refused" and __version__ in message and "0.0.0-elsewhere" in message and "\n" not in message
    assert piece_outcome(lambda threads: f"ran on {threads}", (None,), __version__) == ("done", "ran on None")


def test_study_show_prints_the_jobs_it_would_submit(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(STUDY)
    result = run_cli(["study", "show", spec, "--executor", "slurm", "--partition", "gpu", "--slurm-opt", "qos=high"])
    assert result.status == 0, result.err
    assert "4 jobs (the 2 trainings that start from nothing as one job array)" in result.out
    assert "probe vit-n-p2  after train vit-n-p2" in result.out
    assert "partition=gpu" in result.out and "qos=high" in result.out and "cpus_per_task=1" in result.out


def test_a_bad_executor_table_names_the_key_and_its_line(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text(STUDY.replace("cpus_per_run = 1", "cpus_per_run = 0"))
    line = assert_one_line_error(run_cli(["study", "show", spec]), "cpus_per_run")
    assert f"{spec} line {STUDY.splitlines().index('cpus_per_run = 1') + 1}" in line


class _Terminal:
    """stdin as a person at a terminal types it."""

    def __init__(self, typed: str):
        import io

        self._lines = io.StringIO(typed)

    def isatty(self) -> bool:
        return True

    def readline(self, *args) -> str:
        return self._lines.readline(*args)


@pytest.mark.parametrize("typed, cancelled", [("stop\ncancel\n", True), ("\n", False)])
def test_ctrl_c_while_waiting_asks_whether_to_cancel_the_jobs(tmp_path, monkeypatch, capsys, typed, cancelled):
    """Ctrl-C while a study waits on SLURM: at a terminal the shell asks (an answer other than
    cancel or leave is asked again; Enter leaves them), cancels only if told, and names the
    command that goes on either way; exit status 130."""
    from cli import study as shell
    from localitylab.studies import slurm

    asked_to_cancel = []
    monkeypatch.setattr(slurm, "live_jobs", lambda folder: ["41", "42"])
    monkeypatch.setattr(slurm, "cancel", asked_to_cancel.append)
    monkeypatch.setattr(sys, "stdin", _Terminal(typed))
    assert shell._interrupted(tmp_path / "s.toml", tmp_path / "out") == 130
    err = capsys.readouterr().err
    assert asked_to_cancel == ([["41", "42"]] if cancelled else [])
    assert ("cancelled 2 job(s)" in err) == cancelled and ("2 job(s) left running" in err) != cancelled
    assert f"--out {tmp_path / 'out'} --resume" in err


def test_ctrl_c_without_a_terminal_leaves_the_jobs_running(tmp_path, monkeypatch, capsys):
    from cli import study as shell
    from localitylab.studies import slurm

    monkeypatch.setattr(slurm, "live_jobs", lambda folder: ["41"])
    monkeypatch.setattr(slurm, "cancel", lambda jobs: pytest.fail("cancelled without asking"))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    assert shell._interrupted(tmp_path / "s.toml", tmp_path / "out") == 130
    assert "1 job(s) left running" in capsys.readouterr().err
    monkeypatch.setattr(slurm, "live_jobs", lambda folder: [])
    assert shell._interrupted(tmp_path / "s.toml", tmp_path / "out") == 130
    assert capsys.readouterr().err == "localitylab: interrupted\n"
