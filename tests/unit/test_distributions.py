"""Statistical checks of the action distributions: densities integrate to one, histograms of
samples match the densities, entropies match Monte-Carlo estimates, gradients flow."""

from __future__ import annotations

import pytest
import torch

from models.distributions import (
    ACTION_HIGH,
    ACTION_LOW,
    LOG_STD_MAX,
    ActionDistribution,
    ScaledBeta,
    SquashedGaussian,
    action_bounds,
    make_distribution,
)

GRID = 100  # midpoints per dimension for numerical integration over the action box
CELLS = 4  # histogram cells per dimension (GRID must be a multiple)
N_SAMPLES = 200_000


def _gaussian(loc: list[float], log_std: list[float]) -> SquashedGaussian:
    return SquashedGaussian(torch.tensor([loc]), torch.tensor([log_std]))


def _beta(alpha: list[float], beta: list[float]) -> ScaledBeta:
    return ScaledBeta(torch.tensor([alpha]), torch.tensor([beta]))


# One batch row each; moderate parameters so the densities are smooth enough for a 100^3 grid.
CASES = {
    "squashed_gaussian": lambda: _gaussian([0.3, -0.5, 1.0], [-0.5, 0.2, -1.0]),
    "beta": lambda: _beta([2.0, 1.5, 3.0], [3.0, 1.5, 1.2]),
}


def _grid_density() -> tuple[torch.Tensor, float]:
    """Midpoints of a GRID^3 partition of the action box (float64) and the cell volume."""
    low, high = action_bounds(dtype=torch.float64)
    t = (torch.arange(GRID, dtype=torch.float64) + 0.5) / GRID
    axes = [low[i] + (high[i] - low[i]) * t for i in range(3)]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    return points, float(((high - low) / GRID).prod())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list(CASES))
def test_density_integrates_to_one(name: str) -> None:
    dist = CASES[name]()
    points, volume = _grid_density()
    mass = dist.log_prob(points.float()).double().exp().sum() * volume
    # Includes the tanh and affine Jacobians: dropping either moves the mass far from 1.
    assert mass.item() == pytest.approx(1.0, abs=5e-3)


@pytest.mark.parametrize("name", list(CASES))
def test_sample_histogram_matches_density(name: str) -> None:
    """Chi-square test of a 4x4x4 histogram of samples against the integrated density."""
    dist = CASES[name]()
    points, volume = _grid_density()
    density = dist.log_prob(points.float()).double().exp().reshape(GRID, GRID, GRID)
    k = GRID // CELLS
    expected = density.reshape(CELLS, k, CELLS, k, CELLS, k).sum((1, 3, 5)) * volume * N_SAMPLES

    actions = _repeat_sample(dist)
    low, high = action_bounds()
    cell = ((actions - low) / (high - low) * CELLS).long().clamp(0, CELLS - 1)
    flat = cell[:, 0] * CELLS * CELLS + cell[:, 1] * CELLS + cell[:, 2]
    observed = torch.bincount(flat, minlength=CELLS**3).double().reshape(CELLS, CELLS, CELLS)

    keep = expected > 5  # chi-square needs reasonably populated cells
    chi2 = ((observed - expected)[keep] ** 2 / expected[keep]).sum().item()
    dof = int(keep.sum()) - 1
    # df + 5 * sqrt(2 df) is far in the tail (p << 1e-4) yet a wrong Jacobian gives chi2 >> 1e3.
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, f"chi2={chi2:.1f} with {dof} dof"


def _repeat_sample(dist: ActionDistribution) -> torch.Tensor:
    """N_SAMPLES draws from a one-row distribution, drawn in a single batched call."""
    if isinstance(dist, SquashedGaussian):
        big = SquashedGaussian(dist.loc.expand(N_SAMPLES, 3), dist.log_std.expand(N_SAMPLES, 3))
    else:
        big = ScaledBeta(dist.alpha.expand(N_SAMPLES, 3), dist.beta.expand(N_SAMPLES, 3))
    return big.sample()


PARAM_SETS = [
    # (loc, log_std) for the squashed Gaussian: centred, skewed, saturating and very wide.
    ("squashed_gaussian", [0.0, 0.0, 0.0], [-0.5, -0.5, -0.5]),
    ("squashed_gaussian", [0.8, -1.5, -2.0], [-1.0, 0.5, -3.0]),
    ("squashed_gaussian", [3.0, 0.0, -0.3], [LOG_STD_MAX, 1.0, 0.0]),
    # (alpha, beta) for the Beta.
    ("beta", [1.7, 1.7, 1.7], [1.7, 1.7, 1.7]),
    ("beta", [5.0, 1.1, 20.0], [2.0, 1.3, 1.5]),
]


def _batched(
    policy: str, first: list[float], second: list[float], n: int
) -> tuple[ActionDistribution, tuple[torch.Tensor, torch.Tensor]]:
    """An n-row distribution and its two parameter leaves (for gradient checks)."""
    a = torch.tensor([first]).expand(n, 3).clone().requires_grad_(True)
    b = torch.tensor([second]).expand(n, 3).clone().requires_grad_(True)
    return make_distribution(policy, (a, b)), (a, b)


@pytest.mark.parametrize(("policy", "first", "second"), PARAM_SETS)
def test_entropy_matches_monte_carlo(policy: str, first: list[float], second: list[float]) -> None:
    dist, _ = _batched(policy, first, second, N_SAMPLES)
    with torch.no_grad():
        log_p = dist.log_prob(dist.sample()).double()
    mc, stderr = -log_p.mean().item(), log_p.std().item() / N_SAMPLES**0.5
    entropy = _batched(policy, first, second, 2)[0].entropy()
    assert entropy.shape == (2,) and entropy.requires_grad
    assert entropy[0].item() == pytest.approx(mc, abs=5 * stderr + 1e-2)


@pytest.mark.parametrize(("policy", "first", "second"), PARAM_SETS)
def test_samples_in_box_finite_log_prob_and_gradients(
    policy: str, first: list[float], second: list[float]
) -> None:
    dist, params = _batched(policy, first, second, 4096)
    action, log_p = dist.rsample_with_log_prob()
    low, high = action_bounds()
    assert ((action >= low) & (action <= high)).all()
    assert torch.isfinite(log_p).all()
    interior = ((action > low + 1e-3) & (action < high - 1e-3)).all(-1)
    # The log-prob returned with the sample equals log_prob() of the (inverted) action.
    recomputed = dist.log_prob(action.detach().clone())
    assert torch.allclose(log_p[interior], recomputed[interior], atol=1e-3)

    (action.sum() + dist.entropy().sum()).backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("policy", ["squashed_gaussian", "beta"])
def test_log_prob_finite_on_bounds_and_extreme_parameters(policy: str) -> None:
    if policy == "squashed_gaussian":
        dist = _gaussian([-15.0, 15.0, 0.0], [-5.0, -5.0, 2.0])
    else:
        dist = _beta([1.0, 200.0, 1.0], [200.0, 1.0, 1.0])
    corners = torch.tensor([ACTION_LOW, ACTION_HIGH, [0.5, 0.0, 0.5]])
    assert torch.isfinite(dist.log_prob(corners)).all()
    action, log_p = dist.rsample_with_log_prob()
    assert torch.isfinite(log_p).all()
    # For the Gaussian the cached pre-tanh value keeps log_prob(sample) exact even when tanh saturates.
    assert torch.isfinite(dist.log_prob(action)).all()
    assert torch.isfinite(dist.entropy()).all()


def test_mode_values() -> None:
    gaussian = _gaussian([0.0, 0.0, 100.0], [0.0, 0.0, 0.0])
    assert torch.allclose(gaussian.mode(), torch.tensor([[0.5, 0.0, 1.0]]))
    beta = _beta([2.0, 3.0, 1.0], [2.0, 1.0, 1.0])  # modes 0.5, 1 (at the bound), uniform -> 0.5
    assert torch.allclose(beta.mode(), torch.tensor([[0.5, 1.0, 0.5]]))


def test_make_distribution_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_distribution("gaussian", (torch.zeros(1, 3), torch.zeros(1, 3)))
