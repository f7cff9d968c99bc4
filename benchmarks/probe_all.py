"""python -m benchmarks.probe_all: time and peak memory of `localitylab probe all` on a trained pit-n.

Trains pit-n on digits with the suite's recipe (unless --checkpoint is given), then runs
`python -m cli.main probe all CKPT` in a subprocess and prints its wall time and peak
resident memory, read from that one child's rusage (os.wait4). Linux starts a child's
ru_maxrss at its parent's size at fork, so the training runs in a subprocess too and this
process never imports torch before the measurement: what it hands on is a bare Python.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_pit(out: Path, epochs: int) -> Path:
    command = [sys.executable, "-m", "cli.main", "train", "pit-n", "digits", "--out", str(out), "--epochs", str(epochs),
               "--batch-size", "32", "--warmup-epochs", "1", "--device", "cpu"]
    subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True, capture_output=True)
    return out / "ckpt.pt"


def measure_probe_all(checkpoint: Path, out: Path, images: int, device: str) -> dict:
    command = [sys.executable, "-m", "cli.main", "probe", "all", str(checkpoint), "--images", str(images),
               "--out", str(out), "--device", device]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # Output to files, not pipes: nobody reads a pipe while wait4 blocks, so a full one would hang.
    with tempfile.TemporaryFile() as stdout_file, tempfile.TemporaryFile() as stderr_file:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout_file, stderr=stderr_file)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout_file.seek(0)
        stderr_file.seek(0)
        stdout, stderr = stdout_file.read().decode(), stderr_file.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"probe all failed ({process.returncode}):\n{stderr}")
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak_mib = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return {"command": " ".join(["localitylab", *command[3:]]), "seconds": seconds, "peak_rss_mib": peak_mib,
            "output": stdout.strip()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe_all", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained ckpt.pt (default: train pit-n on digits first)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs when no checkpoint is given")
    parser.add_argument("--images", type=int, default=128, help="--images passed to probe all")
    parser.add_argument("--device", default="cpu", help="--device passed to probe all")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or train_pit(Path(tmp) / "pit-n", args.epochs)
        result = measure_probe_all(checkpoint, Path(tmp) / "probes", args.images, args.device)
    import torch

    print(result["output"])
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"command: {result['command']}")
    print(f"probe all on pit-n (digits, {args.images} images, {args.device}): {result['seconds']:.1f} s, "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
