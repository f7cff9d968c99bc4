"""The diffusion objective, the samplers and the sample-quality metrics, each against a
computation with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from localitylab.diffusion.objective import DiffusionObjective, drop_labels, to_diffusion_scale, to_uint8
from localitylab.diffusion.feature_metrics import frechet_distance, frechet_distance_gaussians, precision_recall
from localitylab.diffusion.sampling import SAMPLERS, balanced_labels, denoise, generate, initial_noise
from localitylab.models import ModelSpec, build_model


# --- the objective ----------------------------------------------------------------------------
def alphas_cumprod_by_hand() -> torch.Tensor:
    """DDPM's linear schedule: beta from 1e-4 to 0.02 over 1,000 steps, abar_t = prod (1 - beta_s)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def test_noising_follows_ddpms_linear_schedule():
    objective = DiffusionObjective()
    abar = alphas_cumprod_by_hand()
    assert float(abar[-1]) == pytest.approx(4.04e-5, rel=0.01)  # DDPM's signal left at t = 999
    clean = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn(4, 1, 8, 8)
    timesteps = torch.tensor([0, 10, 500, 999])
    expected = abar[timesteps].sqrt().view(-1, 1, 1, 1) * clean + (1 - abar[timesteps]).sqrt().view(-1, 1, 1, 1) * noise
    # diffusers works in float32: 1 - abar_0 = 1e-4 loses 3 of float32's 7 digits, so a few 1e-6.
    assert torch.allclose(objective.add_noise(clean, noise, timesteps).double(), expected, atol=1e-5)


class Oracle(nn.Module):
    """Knows the clean image, so its noise prediction is exact: (x_t - sqrt(abar) x_0) / sqrt(1 - abar)."""

    def __init__(self, clean: torch.Tensor) -> None:
        super().__init__()
        self.clean = clean
        self.abar = alphas_cumprod_by_hand()

    def forward(self, noisy, timesteps, labels):
        abar = self.abar[timesteps.cpu()].view(-1, 1, 1, 1)
        return ((noisy.double() - abar.sqrt() * self.clean.double()) / (1 - abar).sqrt()).float()


class Zero(nn.Module):
    def forward(self, noisy, timesteps, labels):
        return torch.zeros_like(noisy)


def test_the_loss_is_the_noise_prediction_error():
    objective = DiffusionObjective()
    clean = to_diffusion_scale(torch.randint(0, 256, (256, 1, 8, 8), dtype=torch.uint8))
    labels = torch.zeros(256, dtype=torch.long)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    # An exact predictor has no error (to float rounding, worst at t near 0 where 1 - abar is small) ...
    assert float(objective.loss(Oracle(clean), clean, labels, generator(), null_class=1)) < 1e-6
    # ... predicting no noise costs E[eps^2] = 1: 16,384 standard normal draws, so 1 +- 0.04.
    assert float(objective.loss(Zero(), clean, labels, generator(), null_class=1)) == pytest.approx(1.0, abs=0.04)


def test_the_loss_is_a_function_of_its_generator():
    objective = DiffusionObjective()
    model = build_model(ModelSpec("dit-n/4", 8, 1, 10, "learn"))
    nn.init.normal_(model.transformer.proj_out_2.weight)  # a non-zero prediction
    clean = torch.rand(16, 1, 8, 8) * 2 - 1
    labels = torch.arange(16) % 10
    first = objective.loss(model, clean, labels, torch.Generator().manual_seed(7), model.null_class)
    again = objective.loss(model, clean, labels, torch.Generator().manual_seed(7), model.null_class)
    other = objective.loss(model, clean, labels, torch.Generator().manual_seed(8), model.null_class)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_label_dropout_is_one_draw_per_image_at_the_asked_rate():
    labels = torch.arange(20000) % 10
    dropped = drop_labels(labels, 0.1, null_class=10, generator=torch.Generator().manual_seed(0))
    is_null = dropped == 10
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert float(is_null.float().mean()) == pytest.approx(0.1, abs=0.006)  # 3 standard errors
    assert torch.equal(drop_labels(labels, 0.0, 10, torch.Generator()), labels)


def test_the_diffusion_scale_round_trips_every_byte():
    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert to_diffusion_scale(every).min() == -1 and to_diffusion_scale(every).max() == 1
    assert torch.equal(to_uint8(to_diffusion_scale(every)), every)


# --- sampling -----------------------------------------------------------------------------------
class TwoPoints(nn.Module):
    """The exact noise predictor for data that is one image per condition: `conditional` for
    every real label, `unconditional` for the null label."""

    def __init__(self, conditional: torch.Tensor, unconditional: torch.Tensor, null_class: int) -> None:
        super().__init__()
        self.conditional, self.unconditional, self.null_class = conditional, unconditional, null_class
        self.abar = alphas_cumprod_by_hand()
        self.calls = 0

    def forward(self, noisy, timesteps, labels):
        self.calls += 1
        target = torch.where((labels == self.null_class).view(-1, 1, 1, 1), self.unconditional, self.conditional)
        abar = self.abar[timesteps.cpu()].view(-1, 1, 1, 1)
        return ((noisy.double() - abar.sqrt() * target.double()) / (1 - abar).sqrt()).float()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_an_exact_denoiser_samples_its_data_and_guidance_extrapolates(sampler, guidance):
    """If the data is one image, the exact noise predictor makes any deterministic sampler land
    on it from any noise, in any number of steps. With guidance g the combined prediction is
    the exact one for the image u + g (c - u), which the sampler must then reach."""
    generator = torch.Generator().manual_seed(0)
    conditional = torch.rand(1, 1, 8, 8, generator=generator) * 0.6 - 0.3
    unconditional = torch.rand(1, 1, 8, 8, generator=generator) * 0.6 - 0.3
    model = TwoPoints(conditional, unconditional, null_class=3)
    noise = torch.randn(5, 1, 8, 8, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1])
    schedule = DiffusionObjective().schedule
    for steps in (5, 20):
        images = denoise(model, noise, labels, schedule, sampler, steps, guidance, null_class=3)
        expected = (unconditional + guidance * (conditional - unconditional)).expand_as(images)
        assert torch.allclose(images, expected, atol=1e-4)


def test_guidance_one_is_a_single_conditional_pass_per_step():
    model = TwoPoints(torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8), null_class=3)
    denoise(model, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), DiffusionObjective().schedule, "ddim", 7, 1.0, 3)
    assert model.calls == 7


def nano_dit():
    model = build_model(ModelSpec("dit-n/4", 8, 1, 10, "learn"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an untrained DiT predicts zero noise; give it something to say
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def test_sampling_is_reproducible_from_its_seed_at_any_batch_size():
    model = nano_dit()
    labels = balanced_labels(6, 10)
    options = dict(in_chans=1, img_size=8, steps=4, guidance=2.0, null_class=model.null_class)
    schedule = DiffusionObjective().schedule
    first = generate(model, labels, schedule, seed=3, batch_size=6, **options)
    assert first.dtype == torch.uint8 and first.shape == (6, 1, 8, 8)
    assert torch.equal(generate(model, labels, schedule, seed=3, batch_size=6, **options), first)
    # Every image's starting noise is its own: the same in any batch ...
    assert torch.equal(initial_noise((1, 8, 8), 3, range(2, 5)), initial_noise((1, 8, 8), 3, range(6))[2:5])
    # ... so only float rounding of batched matrix products can move a pixel, by one level at most.
    rebatched = generate(model, labels, schedule, seed=3, batch_size=4, **options)
    assert (rebatched.int() - first.int()).abs().max() <= 1
    assert not torch.equal(generate(model, labels, schedule, seed=4, batch_size=6, **options), first)


def test_balanced_labels():
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


# --- Fréchet distance ---------------------------------------------------------------------------
def frechet_by_scipy(mean_a, cov_a, mean_b, cov_b):
    """The textbook formula, with scipy's general matrix square root of the product."""
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def random_covariance(dim, rng):
    factor = rng.standard_normal((dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_of_gaussians_with_known_answers():
    # Commuting (diagonal) covariances: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2.
    mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert frechet_distance_gaussians(mean_a, np.diag(var_a), mean_b, np.diag(var_b)) == pytest.approx(expected)
    # General covariances: the textbook formula.
    rng = np.random.default_rng(0)
    cov_a, cov_b = random_covariance(6, rng), random_covariance(6, rng)
    mean_a, mean_b = rng.standard_normal(6), rng.standard_normal(6)
    assert frechet_distance_gaussians(mean_a, cov_a, mean_b, cov_b) == pytest.approx(
        frechet_by_scipy(mean_a, cov_a, mean_b, cov_b), rel=1e-9)
    assert frechet_distance_gaussians(mean_a, cov_a, mean_a, cov_a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_samples_estimates_the_gaussians_distance():
    rng = np.random.default_rng(1)
    cov_a, cov_b = random_covariance(4, rng), random_covariance(4, rng)
    mean_a, mean_b = np.zeros(4), np.full(4, 0.5)
    n = 200_000
    a = rng.multivariate_normal(mean_a, cov_a, size=n)
    b = rng.multivariate_normal(mean_b, cov_b, size=n)
    population = frechet_by_scipy(mean_a, cov_a, mean_b, cov_b)
    assert frechet_distance(a, b) == pytest.approx(population, rel=0.02)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(
        frechet_distance(a, b), rel=1e-4)  # tensors accepted, computed in float64


def test_frechet_distance_of_few_vectors_in_many_dimensions_equals_the_covariance_way():
    """Fewer vectors than dimensions (a few samples in Inception's 2,048) take the n_a x n_b
    factor way; it must give the number of the d x d covariances', scipy's and ours."""
    rng = np.random.default_rng(2)
    for n_a, n_b, dim in ((2, 2, 40), (5, 9, 60), (30, 12, 200)):
        a, b = rng.standard_normal((n_a, dim)), rng.standard_normal((n_b, dim)) + 0.3
        (mean_a, cov_a), (mean_b, cov_b) = (a.mean(0), np.cov(a, rowvar=False)), (b.mean(0), np.cov(b, rowvar=False))
        assert frechet_distance(a, b) == pytest.approx(frechet_distance_gaussians(mean_a, cov_a, mean_b, cov_b), rel=1e-7)
        assert frechet_distance(a, b) == pytest.approx(frechet_by_scipy(mean_a, cov_a, mean_b, cov_b), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


# --- precision and recall -----------------------------------------------------------------------
def precision_recall_by_loops(real, generated, k):
    """Kynkäänniemi et al.'s definition, one point at a time."""
    def radii(points):
        return [sorted(np.linalg.norm(points - p, axis=1))[k] for p in points]  # [0] is the point itself

    def inside(queries, centres, centre_radii):
        return np.mean([any(np.linalg.norm(q - c) <= r for c, r in zip(centres, centre_radii)) for q in queries])

    return inside(generated, real, radii(real)), inside(real, generated, radii(generated))


def test_precision_recall_matches_the_definition():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((60, 3))
    generated = rng.standard_normal((45, 3)) * 1.5 + 0.7
    for k in (1, 3, 5):
        got = precision_recall(real, generated, k=k, block=16)  # several blocks
        assert got == pytest.approx(precision_recall_by_loops(real, generated, k))


def test_precision_recall_with_known_answers():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((200, 5))
    assert precision_recall(real, real) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # The generated set is every real point plus as many far away: half of it is real, so
    # precision is exactly 1/2; every real point is a generated one, so recall is exactly 1.
    assert precision_recall(real, np.concatenate([real, far])) == (0.5, 1.0)
