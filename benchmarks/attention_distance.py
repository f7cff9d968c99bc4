"""attention-distance against a plain forward pass, and against fully materialised maps:
time, the ratio probe / forward, and peak memory.

Each case runs in a fresh Python process, so its peak resident memory (VmHWM) is its own:
`baseline_mb` is the peak after the model and image exist, `peak_mb` the peak after the
method ran, and `probe_mb` their difference, the memory the method needed.

- streamed: the attention-distance probe, whose reader computes each block of attention
  once inside the model's own forward (localitylab's way); the same process first times a
  plain forward of the same model on the same image (`forward_seconds`, same threads and
  dtype), so `ratio` = seconds / forward_seconds is measured under the same conditions;
- materialised: the usual way, timm's `AttentionExtract` holding every layer's full
  softmax map (fused attention off), then the metrics from those maps.

Models, untrained, one random 3-channel image per case at 32, 64, 128 and 224 pixels
(1,025 / 4,097 / 16,385 / 50,177 tokens): pit-n (4 blocks, 4 heads, width 64) and PiT-T
(`timm:vit_tiny_patch16_224` with patch_size=1: 12 blocks, 3 heads, width 192). The
materialised method needs N^2 x heads x layers x 4 bytes for the maps alone (17 GB for pit-n
at 128 pixels), so it runs for pit-n where that fits in 60% of the available memory.

Time is the median of several runs after an uncounted warm-up run where a run is cheap
(<= 64 pixels: 1 + 3), two runs at 128 pixels and one at 224 (each takes minutes on a
CPU); the model's forward is always run once before the baseline. --quick: pit-n at 32
pixels only.

    .venv/bin/python -m benchmarks.attention_distance [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (32, 64, 128, 224)
MODELS = ("pit-n", "pit-t")
MODEL = "pit-n"  # the one the materialised method runs on
LAYERS, HEADS = 4, 4  # pit-n


def _peak_mb() -> float:
    """Peak resident memory of this program (VmHWM). Not getrusage's ru_maxrss: Linux hands a
    child its parent's peak at fork and keeps it across exec, so a case started by a large
    benchmark process would report the parent's memory as its own."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def _available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def materialised_map_bytes(img_size: int) -> int:
    tokens = img_size * img_size + 1
    return tokens * tokens * HEADS * LAYERS * 4


def _target(model_name: str, img_size: int):
    import torch

    from localitylab.data.registry import DataInfo
    from localitylab.models.describe import describe_model
    from localitylab.models.registry import ModelSpec, build_model
    from localitylab.probes.target import ProbeTarget

    torch.manual_seed(0)
    if model_name == "pit-t":  # PiT-T through timm, as a user would name it
        spec = ModelSpec("timm:vit_tiny_patch16_224", img_size, 3, 10, None, {"patch_size": 1})
    else:
        spec = ModelSpec(model_name, img_size, 3, 10, "learn")
    model = build_model(spec).eval()
    data = DataInfo("random", img_size, 3, [str(i) for i in range(10)], [0.5] * 3, [0.25] * 3)
    target = ProbeTarget(model, spec, data, describe_model(model), f"{model_name} (untrained)", model_name,
                         torch.device("cpu"))
    images = torch.randint(0, 256, (1, 3, img_size, img_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return target, images


def _materialised_distances(target, images) -> list[float]:
    """Mean distance per (layer, head) from every layer's full attention map, kept at once."""
    import torch
    from timm.utils import AttentionExtract

    from localitylab.attention import attention_layers

    for layer in attention_layers(target.model):
        layer.module.fused_attn = False
    geometry = target.geometry
    prefix = geometry.num_prefix_tokens
    with torch.no_grad():
        maps = AttentionExtract(target.model, method="hook")(target.prepare(images))
        centres = geometry.centres()
        distance = torch.cdist(centres, centres, compute_mode="donot_use_mm_for_euclid_dist")
        result = []
        for attn in maps.values():
            grid = attn[:, :, prefix:, prefix:]
            grid = grid / grid.sum(dim=-1, keepdim=True)
            result += (grid * distance).sum(dim=-1).mean(dim=(0, 2)).tolist()
    return result


def run_case(mode: str, img_size: int, warmup: int = 0, repeats: int = 1, model_name: str = MODEL) -> dict:
    """One measurement, in this process (call it in a fresh one): `warmup` uncounted runs of
    the method, then the median time of `repeats`; the peak is the largest of them all. The
    streamed method first times a plain forward the same way."""
    import statistics

    import torch

    from localitylab.probes.registry import get_probe

    target, images = _target(model_name, img_size)
    inputs = target.prepare(images)
    with torch.no_grad():
        target.model(inputs)  # warm up allocator and kernels before the baseline
    baseline = _peak_mb()

    def timed(function) -> list[float]:
        for _ in range(warmup):
            function()
        seconds = []
        for _ in range(max(1, repeats)):
            started = time.perf_counter()
            function()
            seconds.append(time.perf_counter() - started)
        return seconds

    forward_seconds = None
    if mode == "streamed":
        with torch.no_grad():
            forward_seconds = statistics.median(timed(lambda: target.model(inputs)))
    result: dict = {}

    def once() -> None:
        if mode == "streamed":
            table = get_probe("attention-distance").run(target, images, torch.zeros(1, dtype=torch.long), batch_size=1).table
            rows = table[(table["metric"] == "mean_distance_px") & table["head"].notna()]
            result["distances"] = rows["value"].tolist()
        else:
            result["distances"] = _materialised_distances(target, images)

    seconds = timed(once)
    peak = _peak_mb()
    median = statistics.median(seconds)
    return {"model": model_name, "img_size": img_size, "tokens": img_size * img_size + 1, "method": mode,
            "seconds": median, "seconds_runs": seconds, "runs": len(seconds), "warmup_runs": warmup,
            "forward_seconds": forward_seconds, "ratio": median / forward_seconds if forward_seconds else None,
            "baseline_mb": baseline, "peak_mb": peak, "probe_mb": peak - baseline,
            "threads": torch.get_num_threads(), "mean_distance_px": result["distances"], "note": ""}


def runs_for(img_size: int) -> tuple[int, int]:
    """(warm-up, timed) runs: several where a run is cheap, fewer where one takes minutes."""
    if img_size <= 64:
        return 1, 3
    if img_size <= 128:
        return 0, 2
    return 0, 1


def _in_subprocess(mode: str, img_size: int, model_name: str = MODEL) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    warmup, repeats = runs_for(img_size)
    result = subprocess.run([sys.executable, "-m", "benchmarks.attention_distance", "--case", mode, str(img_size),
                             "--model", model_name, "--runs", str(warmup), str(repeats)],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{model_name} {mode} at {img_size}px failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _skipped(mode: str, img_size: int, why: str, model_name: str = MODEL) -> dict:
    return {"model": model_name, "img_size": img_size, "tokens": img_size * img_size + 1, "method": mode,
            "seconds": None, "seconds_runs": [], "runs": 0, "warmup_runs": 0, "forward_seconds": None, "ratio": None,
            "baseline_mb": None, "peak_mb": None, "probe_mb": None, "threads": None, "mean_distance_px": None,
            "note": why}


def run(quick: bool = False) -> list[dict]:
    """Every case, each in its own process; quick: pit-n at 32 pixels only."""
    rows = []
    for model_name in MODELS[:1] if quick else MODELS:
        for img_size in SIZES[:1] if quick else SIZES:
            streamed = _in_subprocess("streamed", img_size, model_name)
            rows.append(streamed)
            if model_name != MODEL:
                continue
            need = materialised_map_bytes(img_size)
            if need > 0.6 * _available_bytes():
                rows.append(_skipped("materialised", img_size,
                                     f"skipped: the maps alone need {need / 2**30:.1f} GiB "
                                     f"({img_size * img_size + 1}^2 x {HEADS} heads x {LAYERS} layers x 4 B); "
                                     f"{_available_bytes() / 2**30:.1f} GiB available"))
                continue
            materialised = _in_subprocess("materialised", img_size)
            difference = max(abs(a - b) for a, b in zip(streamed["mean_distance_px"],
                                                        materialised["mean_distance_px"]))
            materialised["note"] = f"max |difference| from streamed {difference:.1e} px"
            rows.append(materialised)
    return rows


def print_table(rows: list[dict]) -> None:
    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    print(f"{'model':<6} {'pixels':>6} {'tokens':>7} {'method':<13} {'runs':>4} {'seconds':>8} {'forward':>8} "
          f"{'ratio':>6} {'peak MB':>8} {'probe MB':>9}  note")
    for row in rows:
        print(f"{row['model']:<6} {row['img_size']:>6} {row['tokens']:>7} {row['method']:<13} {row['runs']:>4} "
              f"{fmt(row['seconds'], '8.2f')} {fmt(row.get('forward_seconds'), '8.2f')} {fmt(row.get('ratio'), '6.2f')} "
              f"{fmt(row['peak_mb'], '8.0f')} {fmt(row['probe_mb'], '9.0f')}  {row['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention_distance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 pixels only")
    parser.add_argument("--case", nargs=2, metavar=("METHOD", "PIXELS"), help=argparse.SUPPRESS)
    parser.add_argument("--runs", nargs=2, type=int, default=(0, 1), metavar=("WARMUP", "TIMED"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--model", default=MODEL, choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), *args.runs, model_name=args.model)))
        return 0
    print_table(run(quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
