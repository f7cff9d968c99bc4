"""python -m benchmarks.probe_costs: what each probe of `probe all` spends against the forward
and backward passes its definition needs (docs/probes.md), in one process.

Passes per image, by definition (F forward, B backward to the input):

- attention-distance, attention-maps: 1 F (one read of every layer's attention);
- pe-similarity: none (it reads the position-embedding table);
- permutation: 1 F clean + 1 F per shuffle setting and draw (settings read from its table);
- receptive-field: ERF 1 F + 1 B per layer (each only as deep as its layer: counted as a
  whole B, an upper bound), Saliency 1 F + 1 B, IntegratedGradients `ig_steps` F + B.

A forward (no gradient) and a forward + backward to the input of the same images are timed
in the same run, before each probe, so a change in what else the machine runs falls on
both; `needed s` = F x forward + B x (forward+backward - forward), `ratio` = spent / needed.

    .venv/bin/python -m benchmarks.probe_costs [--model vit_small_patch16_224] [--images 4] [--quick]
    .venv/bin/python -m benchmarks.probe_costs --end-to-end --images 16   # probe("all") in one call
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _seconds(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def passes(name: str, table, options: dict) -> tuple[int, int]:
    """(forwards, backwards) per image that probe `name` needs by its definition."""
    if name in ("attention-distance", "attention-maps"):
        return 1, 0
    if name == "permutation":
        from localitylab.probes.permutation import PermutationOptions

        draws = options.get("draws", PermutationOptions().draws)
        settings = table.loc[(table.metric == "accuracy") & (table.setting != "clean"), "setting"].nunique()
        return 1 + settings * draws, 0
    if name == "receptive-field":
        from localitylab.probes.receptive_field import DEFAULT_IG_STEPS

        steps = options.get("ig_steps", DEFAULT_IG_STEPS)
        layers = int(table.loc[table.metric == "erf_r50_px", "layer"].max()) + 1
        return 1 + 1 + steps, layers + 1 + steps
    return 0, 0


def _case(model_name: str, images: int, side: int):
    """An untrained timm model, its uint8 images and labels, and a forward and a forward +
    backward of those images (warmed up once), the passes a probe's cost is priced in."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name, img_size=side).eval() if side != 224 else timm.create_model(model_name).eval()
    pixels = torch.randint(0, 256, (images, 3, side, side), dtype=torch.uint8)
    labels = torch.randint(0, model.num_classes, (images,))
    x = torch.randn(images, 3, side, side)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        inputs = x.clone().requires_grad_(True)
        torch.autograd.grad(model(inputs).sum(), inputs)

    forward(), forward_backward()  # warm-up
    return model, pixels, labels, x, forward, forward_backward


def run(model_name: str = "vit_small_patch16_224", images: int = 4, side: int = 224,
        probes: list[str] | None = None, options: dict[str, dict] | None = None) -> list[dict]:
    from localitylab.probes.api import probe
    from localitylab.probes.registry import probe_names

    model, pixels, labels, x, forward, forward_backward = _case(model_name, images, side)
    options = options or {}
    rows = []
    for name in probes or probe_names():
        f_s, fb_s = _seconds(forward), _seconds(forward_backward)
        table = None

        def measure() -> None:
            nonlocal table
            if side == 224:  # timm's own resize and normalisation, as `probe all` on a timm model
                table = probe(name, model, pixels, labels, preprocessing="timm", options=options.get(name))
            else:  # a small smoke-test model: the random images are its input already
                table = probe(name, model, x, labels, preprocessing="prepared", options=options.get(name))

        spent = _seconds(measure)
        if table is None or table.empty or table["value"].isna().all():
            continue  # not applicable to this model (e.g. mae-reconstruction)
        n_f, n_b = passes(name, table, options.get(name) or {})
        needed = n_f * f_s + n_b * max(fb_s - f_s, 0.0)
        rows.append(dict(probe=name, images=images, spent_s=spent, forward_s=f_s, forward_backward_s=fb_s,
                         forwards=n_f, backwards=n_b, needed_s=needed,
                         ratio=spent / needed if needed > 0 else float("nan"),
                         per_forward=spent / f_s))
    return rows


def end_to_end(model_name: str = "vit_small_patch16_224", images: int = 16, side: int = 224,
               options: dict[str, dict] | None = None) -> tuple[list[dict], float]:
    """`probe("all", ...)` in one call, as a notebook runs it, each probe's seconds taken from
    its `Probe.run`; a forward and a forward + backward of the same images are timed before
    and after (their means are the passes' prices). Returns the rows and the total seconds."""
    from localitylab.probes.api import probe
    from localitylab.probes.base import Probe

    model, pixels, labels, x, forward, forward_backward = _case(model_name, images, side)
    before = _seconds(forward), _seconds(forward_backward)
    spent, original = {}, Probe.run

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[self.name] = time.perf_counter() - started

    flat = {key: value for each in (options or {}).values() for key, value in each.items()}  # 'all' takes them flat
    Probe.run = timed
    try:
        started = time.perf_counter()
        if side == 224:
            table = probe("all", model, pixels, labels, preprocessing="timm", progress=False, options=flat)
        else:
            table = probe("all", model, x, labels, preprocessing="prepared", progress=False, options=flat)
        total = time.perf_counter() - started
    finally:
        Probe.run = original
    after = _seconds(forward), _seconds(forward_backward)
    f_s, fb_s = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    rows = []
    for name, seconds in spent.items():
        part = table[table["probe"] == name]
        if part.empty or part["value"].isna().all():
            continue
        n_f, n_b = passes(name, part, (options or {}).get(name) or {})
        needed = n_f * f_s + n_b * max(fb_s - f_s, 0.0)
        rows.append(dict(probe=name, images=images, spent_s=seconds, forward_s=f_s, forward_backward_s=fb_s,
                         forwards=n_f, backwards=n_b, needed_s=needed,
                         ratio=seconds / needed if needed > 0 else float("nan"), per_forward=seconds / f_s,
                         forward_before_after=(before[0], after[0])))
    return rows, total


def print_table(rows: list[dict], when: str = "before the first probe") -> None:
    print(f"{'probe':<20} {'spent s':>8} {'F':>4} {'B':>4} {'needed s':>9} {'ratio':>6} {'x forward':>9}")
    for r in rows:
        print(f"{r['probe']:<20} {r['spent_s']:8.2f} {r['forwards']:>4} {r['backwards']:>4} {r['needed_s']:9.2f} "
              f"{r['ratio']:6.2f} {r['per_forward']:9.2f}")
    total = sum(r["spent_s"] for r in rows)
    print(f"total {total:.1f} s; forward {rows[0]['forward_s']:.3f} s, forward+backward "
          f"{rows[0]['forward_backward_s']:.3f} s of {rows[0]['images']} images ({when})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe_costs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224", help="a timm model name (untrained)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a tiny ViT at 32 px on 2 images (smoke test)")
    parser.add_argument("--probe", action="append", help="only this probe (repeatable)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="probe('all') in one call (a forward and forward+backward timed before and after)")
    args = parser.parse_args(argv)
    if args.end_to_end:
        quick = {"receptive-field": {"ig_steps": 2}, "permutation": {"draws": 1}} if args.quick else None
        rows, total = (end_to_end("vit_tiny_patch16_224", 2, 32, quick) if args.quick
                       else end_to_end(args.model, args.images))
        print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}, torch threads {torch.get_num_threads()}")
        print_table(rows, "the means of before and after")
        forwards = rows[0]["forward_before_after"] if rows else (float("nan"),) * 2
        print(f"probe all end to end: {total:.1f} s = {total / rows[0]['forward_s']:.1f} forwards of the "
              f"{rows[0]['images']} images (forward {forwards[0]:.3f} s before, {forwards[1]:.3f} s after)")
        return 0
    if args.quick:
        rows = run("vit_tiny_patch16_224", 2, 32, args.probe, {"receptive-field": {"ig_steps": 2}, "permutation": {"draws": 1}})
    else:
        rows = run(args.model, args.images, 224, args.probe)
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}, torch threads {torch.get_num_threads()}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
