"""One training run for the fault tests, started as its own process so that it can be killed.

    python tests/fault_runner.py OUT [--resume] [--nproc N] [--torn-write-at K]

--torn-write-at K: the K-th checkpoint write of this process stops half-way (half the
bytes in the temporary file), touches OUT.torn and hangs, waiting to be killed.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

RECIPE = ["vit-n/2", "digits", "--epochs", "4", "--batch-size", "32", "--warmup-epochs", "1", "--seed", "3",
          "--quiet"]


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
    from cli.main import main as cli_main

    print("started", flush=True)
    return cli_main(arguments)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
