"""What makes a CPU training step of the nano models faster? One step as the loop takes it,
against variants of it, measured in the same process.

    .venv/bin/python -m benchmarks.cpu_step_variants MODEL [--variants a,b,...] [--rounds R] [--steps K]

The baseline is the loop's step on digits (batch 128, no augmentation on digits): gather
a batch of uint8 images by index, normalise, forward, label-smoothed cross-entropy,
zero_grad(set_to_none), backward, clip at norm 1, timm's AdamW (on CPU: torch's
single-tensor AdamW, since foreach defaults on only for CUDA), a timm cosine schedule
step. Each variant changes one thing. Variants are measured in interleaved rounds (every
variant once per round, K timed steps each after warm-up), so a busy machine's drift hits
them alike; the figure is the median step time over all rounds, and the speed-up is the
baseline's median over the variant's.

A variant's images/s at a larger batch (batch256, batch512) is compared per image.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class Variant:
    name: str
    what: str
    amp: bool = False
    compile: str | None = None  # None, or a torch.compile mode ("default", "max-autotune-no-cudagraphs")
    compile_step: bool = False  # compile forward + loss (not just the model)
    channels_last: bool = False
    fused_attn: bool | None = None
    optimizer: dict = field(default_factory=dict)  # extra AdamW arguments
    batch_size: int = 128
    threads: int | None = None
    mkldnn: bool = True
    fp32_precision: str | None = None  # torch.backends.mkldnn.matmul.fp32_precision
    zero_grad: str = "set_to_none"  # or "zeros", or "before-forward"
    clip: bool = True


VARIANTS = {v.name: v for v in [
    Variant("base", "the loop's step as it is"),
    Variant("threads1", "torch.set_num_threads(1)", threads=1),
    Variant("threads2", "torch.set_num_threads(2)", threads=2),
    Variant("amp-bf16", "bf16 autocast on the CPU (TrainConfig amp='on')", amp=True),
    Variant("compile", "torch.compile(model), inductor C++ (TrainConfig compile='on')", compile="default"),
    Variant("foreach", "AdamW(foreach=True)", optimizer={"foreach": True}),
    Variant("fused-adamw", "AdamW(fused=True)", optimizer={"fused": True}),
    Variant("channels-last", "model and input channels_last", channels_last=True),
    Variant("attn-unfused", "timm attention without F.scaled_dot_product_attention", fused_attn=False),
    Variant("mkldnn-off", "torch.backends.mkldnn.enabled = False", mkldnn=False),
    Variant("matmul-bf16", "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'", fp32_precision="bf16"),
    Variant("zero-grad-zeros", "zero_grad(set_to_none=False)", zero_grad="zeros"),
    Variant("zero-grad-first", "zero_grad before the forward", zero_grad="before-forward"),
    Variant("no-clip", "no gradient clipping (to see its cost)", clip=False),
    Variant("batch256", "batch 256 (per-image figure)", batch_size=256),
    Variant("batch512", "batch 512 (per-image figure)", batch_size=512),
    Variant("compile-autotune", "torch.compile(mode='max-autotune-no-cudagraphs')",
            compile="max-autotune-no-cudagraphs"),
]}


def variant(name: str) -> Variant:
    """A named variant, or several joined by '+': each one's changes applied together."""
    if name in VARIANTS:
        return VARIANTS[name]
    parts = [VARIANTS[part] for part in name.split("+")]
    default = Variant("", "")
    merged = Variant(name, " + ".join(p.what for p in parts))
    for part in parts:
        for key, value in vars(part).items():
            if key not in ("name", "what") and value != getattr(default, key):
                setattr(merged, key, value)
    return merged


class Runner:
    def __init__(self, model_name: str, variant: Variant, data):
        import timm.optim
        from timm.scheduler import CosineLRScheduler

        from localitylab.models.registry import build_model, model_kind
        from localitylab.train import TrainConfig
        from localitylab.train.loop import model_spec_for

        self.variant, self.data = variant, data
        self.info = data.info
        torch.manual_seed(0)
        model = build_model(model_spec_for(TrainConfig(model_name, "digits"), self.info))
        if variant.fused_attn is not None:
            for block in getattr(model, "blocks", []):
                block.attn.fused_attn = variant.fused_attn
        if variant.channels_last:
            if model_kind(model_name) != "convnet":
                raise SystemExit(f"channels-last is for ConvNets, not {model_name}")
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        self.optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05,
                                                        **variant.optimizer)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=10_000, lr_min=1e-5, warmup_t=0,
                                           t_in_epochs=False)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.forward = torch.compile(model, mode=variant.compile) if variant.compile else model
        self.generator = torch.Generator().manual_seed(0)
        self.steps = 0

    @contextlib.contextmanager
    def settings(self):
        v = self.variant
        threads = torch.get_num_threads()
        mkldnn = torch.backends.mkldnn.enabled
        precision = torch.backends.mkldnn.matmul.fp32_precision
        if v.threads:
            torch.set_num_threads(v.threads)
        torch.backends.mkldnn.enabled = v.mkldnn
        if v.fp32_precision:
            torch.backends.mkldnn.matmul.fp32_precision = v.fp32_precision
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.backends.mkldnn.enabled = mkldnn
            torch.backends.mkldnn.matmul.fp32_precision = precision

    def step(self) -> None:
        v = self.variant
        index = torch.randint(0, len(self.data.train_images), (v.batch_size,), generator=self.generator)
        images, labels = self.data.train_images[index], self.data.train_labels[index]
        inputs = self.info.normalise(images)
        if v.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if v.zero_grad == "before-forward":
            self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v.amp):
            logits = self.forward(inputs)
            loss = self.criterion(logits.float(), labels)
        if v.zero_grad != "before-forward":
            self.optimizer.zero_grad(set_to_none=v.zero_grad == "set_to_none")
        loss.backward()
        if v.clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.steps += 1
        self.scheduler.step_update(self.steps)

    def time_steps(self, count: int) -> float:
        """Seconds per image over `count` steps."""
        with self.settings():
            started = time.perf_counter()
            for _ in range(count):
                self.step()
            return (time.perf_counter() - started) / count / self.variant.batch_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_step_variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="pit-n, vit-n/2 or resnet-n")
    parser.add_argument("--variants", default="base,foreach,fused-adamw,amp-bf16,compile",
                        help=f"comma-separated, from: {', '.join(VARIANTS)}; join several with '+'")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    parser.add_argument("--threads", type=int, help="torch threads for every variant but threads1/threads2")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from localitylab.data.registry import load_dataset

    data = load_dataset("digits")
    names = args.variants.split(",")
    if "base" not in names:
        names.insert(0, "base")
    runners, setup_s = {}, {}
    for name in names:
        started = time.perf_counter()
        runner = Runner(args.model, variant(name), data)
        with runner.settings():
            for _ in range(args.warmup):
                runner.step()
        runners[name] = runner
        setup_s[name] = time.perf_counter() - started  # includes compilation
    per_image = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            per_image[name].append(runners[name].time_steps(args.steps))
    base = statistics.median(per_image["base"])
    print(f"{args.model}: {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"median of {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up")
    print(f"{'variant':<16} {'ms/step@128':>11} {'images/s':>9} {'speed-up':>8} {'spread':>6} {'setup s':>7}  what")
    result = {"model": args.model, "threads": torch.get_num_threads(), "rounds": args.rounds, "steps": args.steps,
              "load": os.getloadavg()[0], "variants": {}}
    for name in names:
        median = statistics.median(per_image[name])
        spread = max(per_image[name]) / min(per_image[name])
        print(f"{name:<16} {median * 128 * 1000:>11.1f} {1 / median:>9.0f} {base / median:>8.2f} {spread:>6.2f} "
              f"{setup_s[name]:>7.1f}  {runners[name].variant.what}")
        result["variants"][name] = {"s_per_image": median, "speedup": base / median, "runs": per_image[name],
                                    "setup_s": setup_s[name]}
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
