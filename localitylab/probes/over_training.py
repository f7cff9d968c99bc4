"""A probe over a run's history: the same probe on every snapshot of a run trained with
`snapshots`, on the same images, so that differences between moments are paired.

The long table is the single-model table of each snapshot with two more columns, `step`
(optimizer steps) and `epoch`, stacked in step order; it is written to
`<out>/over-training/<probe>.csv` (`<out>` is `<run>/probes` by default). Each snapshot's
table is kept in `<out>/over-training/<probe>/step-XXXXXX.csv`: a second call probes only the
snapshots it does not find there, as long as the settings that decide the numbers (images,
seed, batch size, the probe's options) are the same; `settings.json` there records them, and
other settings start the folder afresh.

Python: `run_probes(["attention-distance"], ProbeRequest("runs/x", over_training=True))[0].table`
is the long table (`localitylab.probe_over_training(name, run, ...)` says the same in one call).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from localitylab.errors import UserError
from localitylab.io import make_folder, write_json
from localitylab.probes.output import ProbeOutput, read_table, record_meta, write_table

FOLDER = "over-training"
MOMENT_COLUMNS = ("step", "epoch")


def snapshots_of(source: str) -> tuple[Path, list[dict[str, Any]]]:
    """(run folder, its snapshots by step); a UserError when the source is no run with snapshots."""
    from localitylab.probes.sources import is_checkpoint_source
    from localitylab.train.snapshots import read_index

    path = Path(source).expanduser()
    if not is_checkpoint_source(source) or not (path.is_dir() or path.name == "ckpt.pt"):
        raise UserError(f"over_training probes a run's snapshots: {source} is not a run folder", setting="over_training")
    run_dir = path if path.is_dir() else path.parent
    entries = read_index(run_dir)
    if not entries:
        raise UserError(f"{run_dir} keeps no snapshot: train it with snapshots=8 (or every:K, or a list of epochs) "
                        "to probe it with over_training", settings=("snapshots", "over_training"))
    return run_dir, entries


def cache_key(run, parsed, count: int) -> dict[str, Any]:
    """What decides a snapshot's numbers besides its weights."""
    return {"n_images": count, "seed": run.settings.seed, "batch_size": run.settings.batch_size,
            "timesteps": run.settings.timesteps, "options": json.loads(parsed.model_dump_json())}


def probe_snapshots(probe, parsed, count: int, run_dir: Path, entries: list[dict[str, Any]], images: torch.Tensor,
                    labels: torch.Tensor, run, device: torch.device, out_dir: Path) -> tuple[pd.DataFrame, int]:
    """The long table of `probe` over `entries` and how many snapshots were probed now (the
    others were read from the cache)."""
    from localitylab.probes.sources import loaded_target
    from localitylab.train.checkpoint import load

    folder = out_dir / FOLDER / probe.name
    key = cache_key(run, parsed, count)
    key_path = folder / "settings.json"
    if folder.is_dir() and (not key_path.is_file() or json.loads(key_path.read_text()) != key):
        shutil.rmtree(folder)  # other settings: those tables are not this probe's
    make_folder(folder)
    write_json(key_path, key)
    tables, probed = [], 0
    for entry in entries:
        path = folder / f"step-{entry['step']:06d}.csv"
        if path.is_file():
            tables.append(read_table(path))
            continue
        model = load(run_dir, device, step=entry["step"])
        target = loaded_target(model, device)
        table = probe.run(target, images[:count], labels[:count], parsed, settings=run.settings).table.copy()
        table["step"], table["epoch"] = int(entry["step"]), float(entry["epoch"])
        write_table(table, path)
        tables.append(read_table(path))
        probed += 1
    long = pd.concat(tables, ignore_index=True)
    long["step"] = long["step"].astype("Int64")
    return long, probed


def run_over_training(probes: list, request, run) -> list:
    """`run_probes` with over_training: every probe on every snapshot of the run."""
    from localitylab.data.registry import DataOptions
    from localitylab.probes.sources import load_target, select_images

    settings = run.settings
    run_dir, entries = snapshots_of(request.source)
    data_options = DataOptions(data_dir=Path(request.data_dir) if request.data_dir else None,
                               img_size=request.img_size, seed=settings.seed)
    target, dataset = load_target(str(run_dir), settings.device, request.data, data_options, request.model_kw,
                                  request.weights, request.pos_embed, settings.seed, request.pretrained)
    counts = [settings.n_images if settings.n_images is not None else probe.images_for(len(dataset.test_images))
              for probe in probes]
    images, labels = select_images(dataset, max(counts), settings.seed)  # one set for every moment
    images = target.model_images(images)
    for probe, parsed in zip(probes, run.options):
        if probe.not_applicable(target) is None:
            probe.check(target, parsed)
    out_dir = make_folder(Path(request.out) if request.out is not None else target.default_out_dir())
    outputs = []
    for probe, parsed, count in zip(probes, run.options, counts):
        started = time.perf_counter()
        table, probed = probe_snapshots(probe, parsed, count, run_dir, entries, images, labels, run, target.device,
                                        out_dir)
        csv_path = write_table(table, out_dir / FOLDER / f"{probe.name}.csv")
        seconds = time.perf_counter() - started
        record_meta(out_dir / FOLDER, probe.name, target, dataset.name, run, min(count, len(images)), seconds)
        outputs.append(ProbeOutput(probe.name, table, csv_path, [], seconds, probed=probed))
    return outputs
