"""One training run for the fault tests, started as its own process so that it can be killed.

    python -m tests.fault_runner OUT [--resume] [--nproc N] [--torn-write-at K] [--signal-at E:B:SIG]

--torn-write-at K: the K-th checkpoint write of this process stops half-way (half the
bytes in the temporary file), touches OUT.torn and hangs, waiting to be killed.
--signal-at E:B:SIG: the process sends itself SIG (KILL, TERM, INT) right after batch B of
epoch E: an exact step, however fast or slow the machine is, so the tests cannot race.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

# The position table starts at std 1.0 (the digits fixtures' setting, tests/conftest.py): from
# timm's 0.02 the first epochs are chaotic enough that DDP's other summation order moves the
# loss by 3e-4 in 176 steps, beyond the float tolerance the DDP test holds the runs to.
RECIPE = ["vit-n/2", "digits", "--epochs", "4", "--batch-size", "32", "--warmup-epochs", "1", "--seed", "3",
          "--model-kw", "pos_embed_std=1.0", "--quiet"]


def tear_the_kth_write(k: int, marker: Path) -> None:
    import torch

    import localitylab.train.checkpoint as checkpoint

    real_save, calls = torch.save, []

    def torn_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) < k:
            return real_save(obj, path, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
        marker.touch()
        time.sleep(600)

    checkpoint.torch.save = torn_save  # the module's reference: only checkpoint writes tear


def signal_at(epoch: int, batch: int, sig: signal.Signals) -> None:
    """Send `sig` to this process when the progress reporter hears of batch `batch` of `epoch`."""
    from localitylab.train.progress import PlainReporter

    real_step = PlainReporter.step

    def step(self, at_epoch, at_batch, loss):
        real_step(self, at_epoch, at_batch, loss)
        if (at_epoch, at_batch) == (epoch, batch):
            os.kill(os.getpid(), sig)

    PlainReporter.step = step  # --quiet: the CLI reports through PlainReporter


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)  # bit-identity across processes needs the same reduction order
    out = Path(argv[0])
    arguments = ["train", *RECIPE, "--out", str(out)]
    if "--resume" in argv:
        arguments.append("--resume")
    if "--nproc" in argv:
        arguments += ["--nproc", argv[argv.index("--nproc") + 1]]
    if "--torn-write-at" in argv:
        tear_the_kth_write(int(argv[argv.index("--torn-write-at") + 1]), out.with_suffix(".torn"))
    if "--signal-at" in argv:
        epoch, batch, name = argv[argv.index("--signal-at") + 1].split(":")
        signal_at(int(epoch), int(batch), signal.Signals[f"SIG{name}"])
    from cli.main import main as cli_main

    print("started", flush=True)
    return cli_main(arguments)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
