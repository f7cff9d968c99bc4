"""MAE pre-training (localitylab/models/mae.py) and the mae-reconstruction probe: exact mask
counts, independent masks per image and per seed, an encoder that sees only the visible
tokens, patchify round trips, a loss that falls on digits, checkpoint round trips, and the
probe's rows, figure and report section."""

from __future__ import annotations

import html
import json
import math
import time

import pytest
import torch

from localitylab.data.registry import DataOptions, load_dataset
from localitylab.errors import UserError
from localitylab.models.mae import (MaskedAutoencoder, build_mae, mae_from_checkpoint, patchify, random_masking,
                                    unpatchify)
from localitylab.models.pos_embed import sincos_2d
from localitylab.models.registry import ModelSpec, build_model
from localitylab.probes import ProbeRequest, read_table, run_probes
from localitylab.train.checkpoint import read_checkpoint, save_checkpoint

# (name, pos_embed): a PiT with a learned table, a ViT with the frozen sin-cos table, a PiT with none.
VARIANTS = [("pit-n", "learn"), ("vit-n/2", "sincos"), ("pit-n", "none")]


def spec_for(name: str, pos_embed: str = "learn", img_size: int = 8, in_chans: int = 1) -> ModelSpec:
    return ModelSpec(name, img_size, in_chans, 10, pos_embed)


def small_mae(name: str = "pit-n", pos_embed: str = "learn", seed: int = 0, **options) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return build_mae(spec_for(name, pos_embed), **options).eval()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", DataOptions())


# --- masking ------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens", [10, 16, 64, 1024])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_exactly_round_ratio_tokens_are_masked_in_every_image(num_tokens, ratio):
    keep_idx, mask = random_masking(6, num_tokens, ratio, torch.Generator().manual_seed(1))
    masked = round(ratio * num_tokens)
    assert mask.dtype == torch.bool and mask.shape == (6, num_tokens)
    assert mask.sum(dim=1).tolist() == [masked] * 6
    assert keep_idx.shape == (6, num_tokens - masked)
    # keep_idx lists exactly the unmasked tokens, each once, in increasing order
    assert not mask.gather(1, keep_idx).any()
    assert (keep_idx.diff(dim=1) > 0).all()


def test_masks_differ_per_image_and_per_seed_and_repeat_per_seed():
    def draw(seed):
        return random_masking(16, 64, 0.75, torch.Generator().manual_seed(seed))[1]

    first, again, other = draw(0), draw(0), draw(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len({tuple(row.tolist()) for row in first}) == 16  # a different set for every image
    # no token is favoured: over many images every position is masked about 75% of the time
    many = random_masking(4000, 16, 0.75, torch.Generator().manual_seed(2))[1].float().mean(dim=0)
    assert torch.allclose(many, torch.full_like(many, 0.75), atol=0.03)


def test_a_pit_masks_pixels():
    mae = small_mae("pit-n")
    output = mae(torch.randn(5, 1, 8, 8), torch.Generator().manual_seed(0))
    assert mae.num_tokens == 64 and output.mask.shape == (5, 64)
    assert output.mask.sum(dim=1).tolist() == [48] * 5
    assert output.pred.shape == (5, 64, 1)


@pytest.mark.parametrize("ratio, num_tokens", [(0.0, 16), (1.0, 16), (-0.2, 16), (1.5, 16), (float("nan"), 16),
                                               (0.99, 16), (0.01, 16), ("0.5", 16), (True, 16)])
def test_impossible_ratios_are_one_line_user_errors(ratio, num_tokens):
    with pytest.raises(UserError) as caught:
        random_masking(2, num_tokens, ratio, torch.Generator().manual_seed(0))
    message = str(caught.value)
    assert "\n" not in message and "mask ratio" in message


def test_model_options_are_validated():
    with pytest.raises(UserError, match="mask ratio"):
        small_mae(mask_ratio=1.0)
    with pytest.raises(UserError, match="norm_pix_loss"):  # a grey pixel token has one value: nothing to normalise
        small_mae("pit-n", norm_pix_loss=True)
    with pytest.raises(UserError, match="divisible"):
        small_mae(decoder_dim=64, decoder_heads=3)
    with pytest.raises(UserError, match="needs a transformer"):
        build_mae(spec_for("resnet-n", None))
    with pytest.raises(UserError, match="needs a transformer"):
        MaskedAutoencoder(build_model(spec_for("resnet-n", None)))


def test_norm_pix_loss_defaults_to_on_for_patches_and_off_for_pixels():
    assert small_mae("vit-n/2").norm_pix_loss and small_mae("vit-n/2").options()["norm_pix_loss"] is True
    assert not small_mae("pit-n").norm_pix_loss
    assert not build_mae(ModelSpec("pit-n", 8, 3, 10, "learn")).norm_pix_loss  # RGB pixels too
    assert build_mae(ModelSpec("pit-n", 8, 3, 10, "learn"), norm_pix_loss=True).norm_pix_loss  # allowed if asked
    assert not small_mae("vit-n/2", norm_pix_loss=False).norm_pix_loss


def test_default_decoder_sizes():
    from localitylab.models.mae import default_decoder_dim, default_decoder_heads
    from localitylab.models.vit import WIDTHS

    mae = small_mae("vit-n/2")
    assert (mae.decoder_dim, mae.decoder_depth, mae.decoder_heads) == (64, 2, 2)  # nano width 64
    assert not mae.decoder_pos_embed.requires_grad  # fixed sin-cos by default
    assert torch.equal(mae.decoder_pos_embed[0, 0], torch.zeros(64))  # the [cls] row is zero
    assert torch.equal(mae.decoder_pos_embed[0, 1:], sincos_2d(64, 4, 4))
    unset = MaskedAutoencoder(build_model(spec_for("vit-n/2")), decoder_dim=None, decoder_depth=None,
                              decoder_heads=None, norm_pix_loss=None)
    assert unset.options() == mae.options()  # None passes through as the default
    # t, s, b: capped at 128 wide, 4 heads of 32 channels
    for size in "tsb":
        dim = default_decoder_dim(WIDTHS[size]["embed_dim"])
        assert (dim, default_decoder_heads(dim)) == (128, 4)


# --- the encoder sees only the visible tokens -----------------------------------------------------

@pytest.mark.parametrize("name, pos_embed", VARIANTS)
def test_first_block_gets_cls_plus_the_visible_tokens_only(name, pos_embed):
    mae = small_mae(name, pos_embed)
    shapes = []
    handle = mae.encoder.blocks[0].register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    mae(torch.randn(3, 1, 8, 8), torch.Generator().manual_seed(0))
    handle.remove()
    visible = mae.num_tokens - round(0.75 * mae.num_tokens)
    assert shapes == [(3, 1 + visible, mae.encoder.embed_dim)]


@pytest.mark.parametrize("name, pos_embed", VARIANTS)
def test_predictions_do_not_depend_on_masked_pixels(name, pos_embed):
    mae = small_mae(name, pos_embed)
    images = torch.randn(4, 1, 8, 8)
    output = mae(images, torch.Generator().manual_seed(3))
    pixel_mask = mae.unpatchify(output.mask.unsqueeze(-1).expand(-1, -1, mae.token_values).float()).bool()
    altered = torch.where(pixel_mask, torch.randn_like(images) * 5, images)
    assert not torch.equal(altered, images)
    again = mae(altered, torch.Generator().manual_seed(3))
    assert torch.equal(again.mask, output.mask)
    assert torch.allclose(again.pred, output.pred, atol=1e-5)
    assert not torch.isclose(again.loss, output.loss)  # the targets on masked tokens did change
    # ... while changing one visible pixel changes the prediction (so the check above can fail)
    visible = torch.nonzero(~pixel_mask[0, 0])[0]
    nudged = images.clone()
    nudged[0, 0, visible[0], visible[1]] += 3.0
    assert not torch.allclose(mae(nudged, torch.Generator().manual_seed(3)).pred[0], output.pred[0], atol=1e-4)


def test_encoder_pass_matches_timm_forward_features_when_every_token_is_kept():
    mae = small_mae("vit-n/2", "sincos")
    images = torch.randn(2, 1, 8, 8)
    everything = torch.arange(mae.num_tokens).expand(2, -1)
    assert torch.allclose(mae.forward_encoder(images, everything), mae.encoder.forward_features(images), atol=1e-5)


# --- patchify ----------------------------------------------------------------------------------

@pytest.mark.parametrize("patch, chans", [(1, 1), (1, 3), (2, 3), (4, 1)])
def test_patchify_round_trip_and_layout(patch, chans):
    images = torch.randn(2, chans, 8, 12)
    tokens = patchify(images, patch)
    rows, cols = 8 // patch, 12 // patch
    assert tokens.shape == (2, rows * cols, patch * patch * chans)
    assert torch.equal(unpatchify(tokens, patch, (rows, cols), chans), images)
    # token (i, j) in row-major order holds its patch's values as (row, column, channel)
    i, j = rows - 1, cols // 2
    expected = images[1, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].permute(1, 2, 0).reshape(-1)
    assert torch.equal(tokens[1, i * cols + j], expected)


def test_norm_pix_loss_targets_are_normalised_per_token():
    mae = build_mae(ModelSpec("vit-n/2", 8, 3, 10, "learn"), norm_pix_loss=True)
    target = mae.target(torch.randn(2, 3, 8, 8) * 4 + 1)
    assert torch.allclose(target.mean(dim=-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(target.var(dim=-1), torch.ones(2, 16), atol=1e-3)


# --- training -----------------------------------------------------------------------------------

def test_a_short_adamw_loop_makes_the_masked_loss_fall_on_digits(digits):
    # One thread: on a busy 2-core machine, two threads per process spin against each other.
    torch.set_num_threads(1)
    train = digits.info.normalise(digits.train_images)
    held_out = digits.info.normalise(digits.test_images[:256])
    mae = small_mae("pit-n", seed=0).train()
    optimizer = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.05)

    @torch.no_grad()
    def held_out_loss():
        return mae(held_out, torch.Generator().manual_seed(123)).loss.item()

    mean_colour = held_out.pow(2).mean().item()  # the loss of predicting 0, the data set's mean
    initial = held_out_loss()
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(150):
        batch = train[torch.randint(len(train), (32,), generator=generator)]
        loss = mae(batch, generator).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = held_out_loss()
    print(f"pit-n MAE on digits: held-out masked MSE {initial:.3f} -> {final:.3f} after 150 steps "
          f"({time.perf_counter() - started:.1f} s); mean colour {mean_colour:.3f}")
    assert final < 0.6 * initial
    assert final < 0.8 * mean_colour


# --- checkpoints ----------------------------------------------------------------------------------

def mae_checkpoint(path, mae: MaskedAutoencoder, spec: ModelSpec, data_info) -> dict:
    payload = {
        "model_spec": spec.to_dict(), "model_state": mae.encoder.state_dict(), "data": data_info.to_dict(),
        "mae_options": mae.options(), "mae_state": mae.decoder_state_dict(),
        "config": {"epochs": 1, "seed": 0}, "metrics": {}, "epoch": 1,
    }
    save_checkpoint(path, payload)
    return read_checkpoint(path)


def perturbed_mae(name="pit-n", pos_embed="learn", **options) -> MaskedAutoencoder:
    """An MAE whose every trainable weight is off its initial value, as after training."""
    mae = small_mae(name, pos_embed, **options)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in mae.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return mae


@pytest.mark.parametrize("name, pos_embed", VARIANTS)
def test_checkpoint_round_trip_gives_the_same_loss_and_a_loadable_encoder(name, pos_embed, digits, tmp_path):
    spec = spec_for(name, pos_embed)
    mae = perturbed_mae(name, pos_embed, mask_ratio=0.6, decoder_dim=32, decoder_depth=1, decoder_pos_embed="learn")
    data = mae_checkpoint(tmp_path / "ckpt.pt", mae, spec, digits.info)
    assert json.loads(json.dumps(data["mae_options"])) == data["mae_options"]  # a plain dict
    assert not any(k.startswith("encoder.") for k in data["mae_state"])
    rebuilt = mae_from_checkpoint(data).eval()
    assert rebuilt.options() == mae.options()
    images = digits.info.normalise(digits.test_images[:16])
    expected = mae(images, torch.Generator().manual_seed(9))
    got = rebuilt(images, torch.Generator().manual_seed(9))
    assert torch.equal(got.mask, expected.mask)
    assert torch.equal(got.loss, expected.loss)
    # the encoder is the registry's model: its weights load strictly into a fresh one
    fresh = build_model(spec).eval()
    fresh.load_state_dict(data["model_state"], strict=True)
    assert torch.equal(fresh(images), mae.encoder(images))


def test_mae_from_checkpoint_refuses_what_it_cannot_rebuild(digits, tmp_path):
    mae = small_mae()
    data = mae_checkpoint(tmp_path / "ckpt.pt", mae, spec_for("pit-n"), digits.info)
    with pytest.raises(UserError, match="not an MAE checkpoint: no 'mae_state'"):
        mae_from_checkpoint({k: v for k, v in data.items() if k != "mae_state"})
    with pytest.raises(UserError, match="unknown MAE option 'decoder_width'"):
        mae_from_checkpoint({**data, "mae_options": {**data["mae_options"], "decoder_width": 3}})
    with pytest.raises(UserError, match="does not fit"):
        mae_from_checkpoint({**data, "mae_options": {**data["mae_options"], "decoder_depth": 3}})
    with pytest.raises(UserError, match="needs a transformer"):
        mae_from_checkpoint({**data, "model_spec": spec_for("resnet-n", None).to_dict()})


# --- the probe ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mae_run(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mae") / "pit-n-mae"
    mae = perturbed_mae("pit-n")
    data = mae_checkpoint(folder / "ckpt.pt", mae, spec_for("pit-n"), digits.info)
    return folder, data


def test_probe_writes_rows_that_match_the_model_and_a_figure(mae_run, digits):
    folder, data = mae_run
    outputs = run_probes(["mae-reconstruction"], ProbeRequest(source=str(folder / "ckpt.pt"), n_images=12,
                                                              batch_size=5, device="cpu",
                                                              options={"mask_draws": 2, "figure_images": 4}))
    table = read_table(folder / "probes" / "mae-reconstruction.csv")
    assert set(table["setting"]) == {"ratio-0.75-seed-0", "ratio-0.75-seed-1", "ratio-0.75"}
    assert set(table["metric"]) == {"masked_mse", "mean_baseline_mse", "relative_mse"}
    assert table["value"].notna().all() and (table["n_images"] == 12).all()

    # an independent computation: the rebuilt MAE on the same images, one batch per probe batch
    from localitylab.probes.sources import select_images

    images, _ = select_images(digits, 12, 0)
    mae = mae_from_checkpoint(data).eval()
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            losses = [mae(digits.info.normalise(images[s:s + 5]), generator) for s in range(0, 12, 5)]
        # every image has the same number of masked tokens: weight each batch by its size
        expected = sum(o.loss.item() * len(o.mask) for o in losses) / 12
        row = table[(table.metric == "masked_mse") & (table.setting == f"ratio-0.75-seed-{seed}")]
        assert row["value"].iloc[0] == pytest.approx(expected, rel=1e-5)
    per_seed = table[(table.metric == "masked_mse") & table.setting.str.contains("seed")]["value"]
    mean_row = table[(table.metric == "masked_mse") & (table.setting == "ratio-0.75")]["value"].iloc[0]
    assert mean_row == pytest.approx(per_seed.mean())

    figure = folder / "probes" / "mae-reconstruction.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure in outputs[0].figures
    meta = json.loads((folder / "probes" / "meta.json").read_text())
    assert meta["probes"]["mae-reconstruction"]["artifacts"] == ["mae-reconstruction.png"]


def test_the_report_shows_the_figure_in_the_probe_section(mae_run, tmp_path):
    from localitylab.report import build_report

    folder, _ = mae_run
    if not (folder / "probes" / "mae-reconstruction.png").is_file():
        run_probes(["mae-reconstruction"], ProbeRequest(source=str(folder / "ckpt.pt"), n_images=8, batch_size=8,
                                                        device="cpu"))
    page = build_report([folder / "probes"], tmp_path / "report", formats=("html",))["html"].read_text()
    section = page[page.index('<section id="probe-mae-reconstruction"'):]
    section = section[:section.index("</section>")]
    assert section.count("data:image/png;base64,") >= 2  # the per-model figure and the relative-MSE bars
    assert "reconstruction with the visible pixels pasted back, and the original</figcaption>" in html.unescape(section)


def test_probe_takes_another_mask_ratio_and_rejects_bad_options(mae_run, tmp_path):
    folder, _ = mae_run
    request = dict(source=str(folder / "ckpt.pt"), n_images=6, batch_size=6, device="cpu")
    run_probes(["mae-reconstruction"], ProbeRequest(**request, out=tmp_path / "half",
                                                    options={"mask_ratio": 0.5, "mask_draws": 1}))
    table = read_table(tmp_path / "half" / "mae-reconstruction.csv")
    assert set(table["setting"]) == {"ratio-0.5-seed-0", "ratio-0.5"}
    assert "32 of 64 tokens masked" in table["note"].iloc[0]
    for options, message in (({"mask_ratio": 1.0}, "mask ratio"), ({"mask_draws": 0}, "mask_draws"),
                             ({"figure_images": "x"}, "figure_images")):
        with pytest.raises(UserError, match=message):
            run_probes(["mae-reconstruction"], ProbeRequest(**request, out=tmp_path / "bad", options=options))


def test_probe_figure_un_permutes_a_model_trained_on_permuted_pixels(digits, tmp_path):
    from dataclasses import replace

    from localitylab.data.permutation import random_permutation

    info = replace(digits.info, permutation=random_permutation(64, 3), permute_seed=3)
    mae_checkpoint(tmp_path / "perm" / "ckpt.pt", perturbed_mae(), spec_for("pit-n"), info)
    outputs = run_probes(["mae-reconstruction"], ProbeRequest(source=str(tmp_path / "perm" / "ckpt.pt"), n_images=4,
                                                              batch_size=4, device="cpu", options={"mask_draws": 1}))
    assert "permuted pixels" in outputs[0].table["note"].iloc[0]
    assert (tmp_path / "perm" / "probes" / "mae-reconstruction.png").is_file()


@pytest.mark.parametrize("kind", ["classifier-checkpoint", "untrained-registry-model", "convnet"])
def test_probe_does_not_apply_to_models_that_are_not_mae(kind, digits, tmp_path):
    if kind == "classifier-checkpoint":
        torch.manual_seed(0)
        spec = spec_for("pit-n")
        save_checkpoint(tmp_path / "run" / "ckpt.pt", {"model_spec": spec.to_dict(),
                                                       "model_state": build_model(spec).state_dict(),
                                                       "data": digits.info.to_dict()})
        source = str(tmp_path / "run" / "ckpt.pt")
    else:
        source = "pit-n" if kind == "untrained-registry-model" else "resnet-n"
    out = tmp_path / "probes"
    outputs = run_probes(["mae-reconstruction"], ProbeRequest(source=source, n_images=4, device="cpu", out=out))
    table = outputs[0].table
    assert len(table) == 1 and table["value"].isna().all()
    assert "does not apply" in table["note"].iloc[0]
    assert not (out / "mae-reconstruction.png").exists() and outputs[0].figures == []


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruct_pastes_the_visible_pixels_and_masks_the_rest(norm_pix_loss):
    mae = perturbed_mae("vit-n/2", "sincos", norm_pix_loss=norm_pix_loss)
    images = torch.randn(3, 1, 8, 8)
    result = mae.reconstruct(images, torch.Generator().manual_seed(4))
    masked_input, reconstruction, original = result
    visible = ~result.pixel_mask
    assert result.pixel_mask.float().mean().item() == pytest.approx(12 / 16)  # 12 of 16 2x2 patches
    assert torch.equal(original, images)
    assert torch.equal(reconstruction[visible], images[visible])
    assert torch.equal(masked_input[visible], images[visible]) and (masked_input[~visible] == 0).all()
    output = mae(images, torch.Generator().manual_seed(4))
    expected = output.pred
    if norm_pix_loss:  # mapped back with each token's own mean and spread, as in MAE's figures
        tokens = mae.patchify(images)
        expected = expected * (tokens.var(dim=-1, keepdim=True) + 1e-6).sqrt() + tokens.mean(dim=-1, keepdim=True)
    assert torch.allclose(mae.patchify(reconstruction)[output.mask], expected[output.mask], atol=1e-6)
    assert math.isfinite(output.loss.item())
