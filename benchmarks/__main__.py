"""python -m benchmarks [--quick] [--json PATH]: print training throughput, ours against the
usual way in the same run, and write the figures as JSON."""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import datetime, timezone

from benchmarks import train_throughput, usual_way


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer epochs (for smoke tests)")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write the figures")
    args = parser.parse_args(argv)

    rows = train_throughput.run(quick=args.quick)
    print(f"{'model':<10} {'data':<7} {'batch':>5} {'device':<6} {'threads':>7} {'images/s':>10}")
    for row in rows:
        print(f"{row['model']:<10} {row['data']:<7} {row['batch_size']:>5} {row['device']:<6} {row['threads']:>7} "
              f"{row['images_per_s']:>10.0f}")
    comparison = usual_way.run(quick=args.quick)
    print(f"\n{'model':<10} {'ours img/s':>11} {'usual img/s':>12} {'ours/usual':>11}   (same run, same batch)")
    for row in comparison:
        print(f"{row['model']:<10} {row['ours_images_per_s']:>11.0f} {row['usual_images_per_s']:>12.0f} {row['ratio']:>11.2f}")
    from localitylab.io import write_json

    write_json(args.json, {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "machine": platform.platform(), "processor": platform.processor(),
                           "python": sys.version.split()[0], "train_throughput": rows,
                           "ours_vs_usual": comparison})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
