"""Multi-process training from the command line: `localitylab train --nproc N` writes the job
(`localitylab.train.job.write_job`) and `launch` starts N ranks through torchrun, each one

    torchrun --standalone --nproc-per-node N -m cli.worker JOB.json

Every rank reads the same configuration as data and speaks as the localitylab command does:
one-line errors, the same exit statuses. For several machines, call torchrun yourself with
its rendezvous options.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import warnings
from pathlib import Path

from cli.errors import notes, one_line, spoken

WORKER = "cli.worker"


def launch(job: Path, nproc: int) -> None:
    """Train the job in `job` on `nproc` local processes through torchrun."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from localitylab.errors import UserError

    arguments = ["--standalone", f"--nproc-per-node={nproc}", "--module", WORKER, str(job)]
    # Workers print their own one-line errors; the launcher only says how many failed.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(get_args_parser().parse_args(arguments))
    except ChildFailedError as failed:
        codes = sorted({f.exitcode for f in failed.failures.values()})
        raise UserError(
            f"{len(failed.failures)} of {nproc} training processes failed (exit {', '.join(map(str, codes))}); "
            f"their messages are above. Re-run: torchrun {shlex.join(arguments[:2])} -m {WORKER} "
            f"{shlex.quote(str(job))}"
        ) from None


def launch_nodes(config_file: Path, nnodes: int, nproc: int) -> None:
    """Train the job in `config_file` on `nnodes` nodes of the SLURM allocation this runs in,
    `nproc` processes each: srun starts one torchrun per node (one per task where the
    allocation has fewer nodes than that, e.g. several tasks on one node), and they meet at a
    c10d rendezvous on the allocation's first node. `config_file` must be on a file system
    every node sees."""
    import shutil
    import subprocess

    from localitylab.errors import UserError

    job = os.environ.get("SLURM_JOB_ID")
    if job is None or shutil.which("srun") is None:
        raise UserError(f"nnodes {nnodes} trains across the nodes of a SLURM allocation: run it inside one (sbatch "
                        f"or salloc asking for {nnodes} nodes or tasks), where srun starts torchrun on each",
                        setting="nnodes")
    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ.get("SLURM_JOB_NODELIST", "")],
                           capture_output=True, text=True).stdout.split() or ["localhost"]
    endpoint = f"{nodes[0]}:{29400 + int(job) % 1000}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id=localitylab-{job}",
                "--module", WORKER, str(config_file)]
    placement = ["--nodes", str(nnodes), "--ntasks-per-node=1"] if len(nodes) >= nnodes else []
    srun = ["srun", f"--ntasks={nnodes}", *placement, "--kill-on-bad-exit=1", "--unbuffered"]
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", os.environ.get(
        "SLURM_CPUS_PER_TASK", "1"))}
    code = subprocess.run(srun + torchrun, env=environment).returncode
    if code != 0:
        raise UserError(f"training on {nnodes} nodes failed (srun exit {code}); the ranks' messages are above. "
                        f"Re-run: {shlex.join(srun + torchrun)}")


def how_to_continue(stopped, config):
    """A stopped run's message as the command line says it: the command that continues it."""
    from localitylab.errors import RunStopped

    hint = f"Continue with: {config.command()} --resume"
    text, found = re.subn(r"The same settings with resume=True continue the run\.\s*$", hint, str(stopped))
    return RunStopped(text if found else f"{text} {hint}", stopped.exit_code)


def stop_with_the_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a launcher killed outright
    (SIGKILL, the OOM killer) would leave its ranks training and holding the run folder's
    lock. On Linux a rank asks for SIGTERM when its parent dies: it then stops as on Ctrl-C
    (the step finishes, a checkpoint is written, the lock is let go)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    from localitylab.errors import RunStopped, UserError
    from localitylab.train.distributed import print_main
    from localitylab.train.job import read_job, run_job
    from localitylab.train.progress import final_message

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {WORKER} JOB.json", file=sys.stderr)
        return 2
    stop_with_the_launcher()
    # The same one-line messages and exit statuses as the localitylab command.
    warnings.showwarning = notes(warnings.showwarning)
    try:
        try:
            config, result = run_job(argv[0])
        except RunStopped as stopped:
            raise how_to_continue(stopped, read_job(argv[0])[0]) from None
    except RunStopped as stopped:
        print(f"localitylab: {one_line(str(stopped))}", file=sys.stderr)
        return stopped.exit_code
    except UserError as err:
        print(f"localitylab: error: {one_line(spoken(err))}", file=sys.stderr)
        return 2
    if result.final:
        print_main(final_message(config.run_dir() / "ckpt.pt", result.final, config.task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
