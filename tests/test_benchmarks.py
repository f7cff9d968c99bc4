"""The benchmark command: quick mode end to end, and the pieces its figures rest on."""

import json
import math

import pytest
import torch

from tests.cli_helpers import run_command


def vit_train_flops(patch: int, side: int = 8, chans: int = 1, dim: int = 64, depth: int = 4, classes: int = 10) -> int:
    """Training FLOPs per image of a timm ViT (cls token, MLP ratio 4), counted by hand the way
    torch.utils.flop_counter counts: 2 per multiply-add; backward twice each matmul, except the
    patch embedding's input gradient (the image needs none). Attention is counted as Q K^T and
    A V (no fused kernel's recomputation), so it too costs twice its forward backward."""
    grid = (side // patch) ** 2
    tokens = grid + 1
    embed = 2 * grid * chans * patch * patch * dim
    linear = depth * 2 * tokens * dim * dim * (3 + 1 + 4 + 4)  # qkv, proj, fc1, fc2
    attention = depth * 2 * (2 * tokens * tokens * dim)  # Q K^T and A V, all heads
    head = 2 * dim * classes
    forward = embed + linear + attention + head
    return 3 * forward - embed


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # --quick runs on one thread: on a shared 2-core machine two OpenMP threads spin against
    # other processes and a step can take 10x longer.
    result = run_command("--quick", "--json", out, module="benchmarks", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_mode_writes_every_section_and_prints_tables(quick):
    figures, stdout = quick
    for key in ("environment", "device_peak", "train_throughput", "ours_vs_usual", "cost_growth",
                "attention_distance", "probe_throughput"):
        assert figures[key], key
    env = figures["environment"]
    assert env["device"] in ("cpu", "cuda") and env["torch_threads"] == 1 and env["date"]
    assert figures["quick"] is True and figures["command"].startswith("python -m benchmarks --quick")
    for heading in ("images/s", "MFU", "ours/usual", "peak MB", "probe", env["date"]):
        assert heading in stdout
    from localitylab.attention import fused

    if fused.load():  # the kernel-threads section, at the quick mode's one thread
        rows = figures["kernel_threads"]
        assert {(r["kind"], r["threads"]) for r in rows} == {("kernel", 1), ("probe", 1)}
    assert "probe_costs" not in figures  # minutes on 2 cores: never in --quick


def test_training_figures_are_real_measurements_ordered_by_cost(quick):
    figures, _ = quick
    rows = {r["model"]: r for r in figures["train_throughput"]}
    assert list(rows) == ["pit-n", "vit-n/2", "resnet-n", "resnet-18"]
    peak = figures["device_peak"]
    assert positive(peak["flops"]) and peak["flops"] == max(peak["before"], peak["after"])
    for row in rows.values():
        assert row["runs"] >= 2 and row["warmup_runs"] >= 1
        assert len(row["images_per_s_runs"]) == row["runs"] == len(row["usual_images_per_s_runs"])
        assert all(positive(v) for v in row["images_per_s_runs"] + row["usual_images_per_s_runs"])
        assert positive(row["images_per_s"]) and positive(row["usual_images_per_s"]) and positive(row["ratio"])
        assert row["peak_flops"] == peak["flops"] and 0 < row["mfu"] and 0 < row["usual_mfu"]
        if row["model"].startswith(("pit", "vit")):  # matmuls alone: not above the matmul peak
            assert row["mfu"] <= 1 and row["usual_mfu"] <= 1
        # (A ConvNet can: oneDNN computes convolutions with fewer multiplications than the
        # direct convolution's FLOPs that MFU counts; resnet-18 reached 1.2 here.)
    # What the clock measured follows what the models cost: a pixel per token is 4.3x the FLOPs
    # of 2x2 patches, and a ResNet-18 on 32x32x3 images hundreds of times a resnet-n on 8x8.
    assert rows["pit-n"]["flops_per_image"] > 4 * rows["vit-n/2"]["flops_per_image"]
    assert rows["pit-n"]["images_per_s"] < rows["vit-n/2"]["images_per_s"]
    assert rows["resnet-18"]["flops_per_image"] > 100 * rows["resnet-n"]["flops_per_image"]
    assert rows["resnet-18"]["images_per_s"] < rows["resnet-n"]["images_per_s"]
    # The comparison table shows the same measurements, model for model.
    comparison = figures["ours_vs_usual"]
    assert [c["model"] for c in comparison] == list(rows)
    for pair in comparison:
        row = rows[pair["model"]]
        assert (pair["ours_images_per_s"], pair["usual_images_per_s"]) == (row["images_per_s"], row["usual_images_per_s"])


def test_flops_per_image_equal_an_independent_count(quick):
    from localitylab.models.describe import count_flops
    from localitylab.models.registry import ModelSpec, build_model

    flops = {r["model"]: r["flops_per_image"] for r in quick[0]["train_throughput"]}
    assert flops["pit-n"] == vit_train_flops(patch=1) == 89_676_544
    assert flops["vit-n/2"] == vit_train_flops(patch=2) == 20_962_048
    # A ConvNet: backward is twice the forward, less the stem's input gradient (3x3, 1 -> 16, 8x8).
    resnet = build_model(ModelSpec("resnet-n", 8, 1, 10))
    assert flops["resnet-n"] == 3 * count_flops(resnet, 1, 8) - 2 * 64 * 9 * 1 * 16
    resnet18 = build_model(ModelSpec("resnet-18", 32, 3, 100))
    assert flops["resnet-18"] == 3 * count_flops(resnet18, 3, 32) - 2 * 32 * 32 * 9 * 3 * 64


def test_cost_growth_attention_and_probe_sections(quick):
    figures, _ = quick
    growth = figures["cost_growth"]
    assert [(r["img_size"], r["tokens"]) for r in growth] == [(16, 257), (32, 1025)]
    for row in growth:
        assert positive(row["step_s"]) and positive(row["peak_mb"]) and row["runs"] >= 2
        assert all(positive(v) for v in row["step_s_runs"])
    # 4x the tokens: more than 4x the FLOPs (attention grows with their square), more memory, a slower step.
    assert growth[1]["flops_per_image"] > 4 * growth[0]["flops_per_image"]
    assert growth[1]["peak_mb"] > growth[0]["peak_mb"] and growth[1]["step_s"] > growth[0]["step_s"]

    attention = figures["attention_distance"]
    assert {(r["img_size"], r["method"]) for r in attention} == {(32, "streamed"), (32, "materialised")}
    for row in attention:
        assert positive(row["seconds"]) and row["runs"] >= 2 and row["peak_mb"] >= row["baseline_mb"] > 0
    streamed, materialised = (next(r for r in attention if r["method"] == m) for m in ("streamed", "materialised"))
    assert max(abs(a - b) for a, b in zip(streamed["mean_distance_px"], materialised["mean_distance_px"])) < 1e-3

    from localitylab.probes.registry import probe_names

    probes = figures["probe_throughput"]
    assert [r["probe"] for r in probes] == probe_names()
    timed = [r for r in probes if r["seconds"] is not None]
    assert {"attention-distance", "permutation", "receptive-field"} <= {r["probe"] for r in timed}
    for row in probes:
        if row["seconds"] is None:  # a probe that does not apply to pit-n says why, with no figure
            assert row["note"] and row["images_per_s"] is None and row["runs"] == 0
        else:
            assert positive(row["images_per_s"]) and positive(row["seconds"]) and row["runs"] >= 1
            assert row["images"] >= 1 and all(positive(v) for v in row["seconds_runs"])


def test_only_runs_the_named_section(tmp_path, monkeypatch):
    from benchmarks.__main__ import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # main sets it for its children; restored after the test
    out = tmp_path / "only.json"
    assert main(["--quick", "--only", "cost-growth", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["sections"] == ["cost-growth"] and figures["cost_growth"]
    assert "train_throughput" not in figures and "probe_throughput" not in figures


def test_peak_tensor_memory_counts_what_is_alive_at_once():
    from benchmarks.common import PeakTensorMemory

    before = torch.zeros(10_000)  # allocated before: not counted
    with PeakTensorMemory("cpu") as memory:
        a = torch.zeros(1000)  # 4,000 B
        b = torch.zeros(2000)  # 8,000 B: 12,000 alive
        view = b[:10]  # a view allocates nothing
        del a
        c = before + 1  # 40,000 B: 48,000 alive
        c += 1  # in place: nothing new
        del c
        d = torch.zeros(3000)  # 12,000 B: 20,000 alive
    assert memory.peak_bytes == 48_000
    assert view.numel() == 10 and d.numel() == 3000


def test_peak_tensor_memory_sees_autograd_saved_tensors_and_gradients():
    from benchmarks.common import PeakTensorMemory

    weight = torch.randn(256, 256, requires_grad=True)
    inputs = torch.randn(64, 256)
    with PeakTensorMemory("cpu") as memory:
        torch.tanh(inputs @ weight).sum().backward()
    # During backward: the weight's gradient (256 KiB) and the gradient of tanh's input (64 KiB).
    assert 256 * 1024 + 64 * 1024 <= memory.peak_bytes <= 256 * 1024 + 3 * 64 * 1024 + 64


def test_bench_data_sets_have_the_shapes_they_stand_in_for():
    from benchmarks.common import cifar_shaped, digits_subset, register_bench_datasets
    from localitylab.data.registry import load_dataset

    register_bench_datasets()
    register_bench_datasets()  # idempotent
    cifar = load_dataset(cifar_shaped(8, 4))
    assert cifar.train_images.shape == (8, 3, 32, 32) and cifar.test_images.shape == (4, 3, 32, 32)
    assert cifar.train_images.dtype == torch.uint8 and cifar.info.num_classes == 100
    assert cifar.info.hflip and cifar.info.crop_padding == 4
    digits, subset = load_dataset("digits"), load_dataset(digits_subset(128, 16))
    assert torch.equal(subset.train_images, digits.train_images[:128]) and len(subset.test_images) == 16
    assert subset.info.mean == digits.info.mean and subset.info.crop_padding == digits.info.crop_padding


def test_attention_parts_splits_a_layer_against_sdpa_timed_in_the_same_run(tmp_path):
    """benchmarks.attention_parts checks the reader's layer output against SDPA's before it
    times anything; its figures are real times and its floor is the two matmuls' share."""
    from localitylab.attention import fused
    from localitylab.attention.reader import default_query_block

    out = tmp_path / "parts.json"
    result = run_command("--tokens", "65", "257", "--models", "pit-n", "--runs", "0", "1", "--json", out,
                         module="benchmarks.attention_parts", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["tokens"]) for r in rows] == [("pit-n", 65), ("pit-n", 257)]
    for row in rows:
        seconds = row["seconds"]
        kernel = {"fused"} if fused.load() else set()  # where the fused kernel builds, it is timed too
        assert set(seconds) == {"sdpa", "logits", "weights @ v", "pieces", "distance", "attend"} | kernel
        assert all(positive(s) for s in seconds.values())
        assert row["floor"] == pytest.approx((seconds["logits"] + seconds["weights @ v"]) / seconds["sdpa"])
        assert row["query_block"] == default_query_block(1, 4, row["tokens"])
        assert row["blocks"] == math.ceil((row["tokens"] - 1) / row["query_block"])
    assert "pit-n" in result.stdout and "floor" in result.stdout
    bad = run_command("--tokens", "100", module="benchmarks.attention_parts")
    assert bad.returncode == 2 and "1 + a square" in bad.stderr


def test_kernel_threads_quick_mode_times_the_kernel_and_the_probe_at_one_and_two_threads():
    """benchmarks.kernel_threads --quick: the fused kernel against SDPA and the whole probe
    against a forward, at 1 and 2 threads in one process (outputs checked before timing). On
    a machine with two free cores the kernel's 20 independent (head, query tile) items split
    between two threads, so its fastest run at 2 threads beats its fastest at 1."""
    import os

    from benchmarks import kernel_threads
    from localitylab.attention import fused

    if not fused.load():
        pytest.skip("the fused kernel did not build on this machine")
    rows = kernel_threads.run(quick=True, counts=[1, 2])
    assert [(r["kind"], r["tokens"], r["threads"]) for r in rows] == [
        ("kernel", 1025, 1), ("kernel", 1025, 2), ("probe", 1025, 1), ("probe", 1025, 2)]
    for row in rows:
        assert row["runs"] >= 1 and all(positive(s) for s in row["seconds_runs"] + row["baseline_seconds_runs"])
        assert row["ratio"] == pytest.approx(row["seconds"] / row["baseline_seconds"])
        assert row["baseline"] == ("sdpa" if row["kind"] == "kernel" else "forward")
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip(f"{cores} core: no second thread to be faster with")
    load = os.getloadavg()[0]
    if load >= cores:
        pytest.skip(f"load average {load:.1f} on {cores} cores: other work holds the cores, so a thread "
                    "speedup would measure that work")
    one, two = rows[0], rows[1]
    assert two["best"] < one["best"], (one["seconds_runs"], two["seconds_runs"])


def test_probe_costs_counts_the_passes_receptive_field_needs_by_its_definition():
    """benchmarks.probe_costs on a tiny timm ViT (12 blocks) at 32 px, 2 images, 2
    IntegratedGradients steps: receptive-field needs ERF 1 F + 12 B, Saliency 1 F + 1 B and
    IG 2 F + 2 B, and the row's ratio is spent over what those passes cost in the same run."""
    from benchmarks import probe_costs

    rows = probe_costs.run("vit_tiny_patch16_224", 2, 32, ["receptive-field"], {"receptive-field": {"ig_steps": 2}})
    (row,) = rows
    assert (row["probe"], row["forwards"], row["backwards"]) == ("receptive-field", 4, 15)
    assert positive(row["spent_s"]) and positive(row["forward_s"]) and positive(row["needed_s"])
    assert row["needed_s"] == pytest.approx(4 * row["forward_s"] + 15 * max(row["forward_backward_s"] - row["forward_s"], 0))
    assert row["ratio"] == pytest.approx(row["spent_s"] / row["needed_s"])


def test_usual_way_script_saves_weights_that_ours_evaluates_to_the_same_accuracy(tmp_path):
    """The referee of benchmarks/whole_process.py, in this process (no workers): its saved
    weights load into the registry's model, and localitylab's own evaluation (uint8 images,
    `DataInfo.prepare`) finds the test accuracy it reported through torchvision's transforms."""
    from benchmarks.usual_way import train_usual_way
    from localitylab.data.registry import load_dataset
    from localitylab.models.registry import build_model
    from localitylab.train import TrainConfig
    from localitylab.train.loop import model_spec_for
    from localitylab.train.tasks import classification_sums, sums_to_means

    result = train_usual_way("resnet-n", "digits", epochs=1, workers=0, device="cpu", out=str(tmp_path))
    assert result["epoch"] == 1 and result["batch_size"] == 32 and result["workers"] == 0
    assert math.isfinite(result["train_loss"]) and 0 <= result["test_acc"] <= 1
    data = load_dataset("digits")
    model = build_model(model_spec_for(TrainConfig("resnet-n", "digits"), data.info))
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    ours = sums_to_means(classification_sums(model, data.info, data.test_images, data.test_labels))
    assert abs(ours["accuracy"] - result["test_acc"]) <= 1 / len(data.test_labels)
    assert ours["loss"] == pytest.approx(result["test_loss"], rel=1e-4)
