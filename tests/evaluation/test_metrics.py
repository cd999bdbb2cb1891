"""The metrics' arithmetic, against closed forms and the identities each metric must satisfy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ham_engine.evaluation import metrics
from ham_engine.evaluation.networks import LpipsAlex
from ham_engine.evaluation.paper import PAPER_ROWS, implied_fid


def test_fid_of_a_set_with_itself_is_zero() -> None:
    features = np.random.default_rng(0).normal(size=(64, 16))
    assert metrics.fid(features, features) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_a_rank_deficient_set_with_itself_is_zero() -> None:
    # Fewer samples than dimensions, as with a small benchmark and 2048-d pool3 features.
    features = np.random.default_rng(1).normal(size=(5, 40))
    assert metrics.fid(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form() -> None:
    # Commuting covariances: FD = |μ1 − μ2|² + Σ (σ1 − σ2)² over the standard deviations.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 0.0])
    std1, std2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 1.5])
    expected = float(((mu1 - mu2) ** 2).sum() + ((std1 - std2) ** 2).sum())
    assert metrics.frechet_distance(mu1, np.diag(std1**2), mu2, np.diag(std2**2)) == pytest.approx(expected)


def test_frechet_distance_of_non_commuting_2d_gaussians_matches_the_closed_form() -> None:
    # For 2×2 M = Σ1Σ2 with positive eigenvalues, tr √M = √(tr M + 2√det M).
    sigma1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    sigma2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    product = sigma1 @ sigma2
    trace_sqrt = math.sqrt(np.trace(product) + 2.0 * math.sqrt(np.linalg.det(product)))
    mu1, mu2 = np.array([1.0, 2.0]), np.array([-1.0, 0.5])
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)


def test_fid_against_a_shifted_gaussian_is_the_squared_shift() -> None:
    rng = np.random.default_rng(2)
    shift = np.array([3.0, -4.0, 0.0, 0.0])  # |shift|² = 25
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) + shift
    assert metrics.fid(a, b) == pytest.approx(25.0, rel=0.02)
    assert metrics.fid(a, a + shift) == pytest.approx(25.0, rel=1e-9)  # same covariance exactly


@pytest.mark.parametrize(("n", "m", "dims"), [(6, 9, 40), (30, 25, 8), (12, 12, 12)])
def test_fid_from_samples_equals_the_frechet_distance_of_their_statistics(n: int, m: int, dims: int) -> None:
    # fid() works in sample space when there are fewer samples than dimensions; it must agree.
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, dims)) @ rng.normal(size=(dims, dims))
    b = rng.normal(size=(m, dims)) * 2.0 + 1.0
    expected = metrics.frechet_distance(*metrics.gaussian_stats(a), *metrics.gaussian_stats(b))
    assert metrics.fid(a, b) == pytest.approx(expected, rel=1e-7)  # eigh round-off on rank-deficient Σ


def test_fid_needs_two_samples_and_matching_shapes() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.fid(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        metrics.fid(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_lpips_distance_matches_a_hand_computation() -> None:
    # One layer, one position, two channels: unit vectors (1, 0) and (0, 1), heads (0.5, 2).
    a = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    b = torch.tensor([0.0, 3.0]).reshape(1, 2, 1, 1)
    value = metrics.lpips_distance([a], [b], [torch.tensor([0.5, 2.0])])
    assert value.item() == pytest.approx(0.5 * 1.0 + 2.0 * 1.0)


@pytest.fixture(scope="module")
def lpips_network() -> LpipsAlex:
    torch.manual_seed(0)
    network = LpipsAlex().eval()
    for head in network.heads:
        head.data.copy_(torch.rand_like(head))
    return network


def _lpips(network: LpipsAlex, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return metrics.lpips_distance(network.features(x), network.features(y), list(network.heads))


def test_lpips_of_an_image_with_itself_is_zero_and_it_is_symmetric(lpips_network: LpipsAlex) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    y = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    assert torch.equal(_lpips(lpips_network, x, x), torch.zeros(2))
    forward, backward = _lpips(lpips_network, x, y), _lpips(lpips_network, y, x)
    assert torch.allclose(forward, backward, rtol=1e-6)
    assert (forward > 0).all()


def test_cosine_is_bounded_and_one_for_identical_inputs() -> None:
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(32, 8, generator=generator), torch.randn(32, 8, generator=generator)
    values = metrics.cosine(a, b)
    assert ((values >= -1) & (values <= 1)).all()
    assert torch.allclose(metrics.cosine(a, a), torch.ones(32, dtype=torch.float64))
    assert torch.allclose(metrics.cosine(a, -a), -torch.ones(32, dtype=torch.float64))
    assert torch.allclose(metrics.cosine(a, 5 * a), torch.ones(32, dtype=torch.float64))


def test_cfsd_is_zero_for_the_same_structure_and_positive_otherwise() -> None:
    generator = torch.Generator().manual_seed(5)
    content = torch.randn(1, 8, 6, 6, generator=generator, dtype=torch.float64)
    # Scaling each position's features keeps the structure: channels are normalised per position.
    scaled = content * torch.rand(1, 1, 6, 6, generator=generator, dtype=torch.float64).add(0.5)
    assert metrics.cfsd(content, content).item() == pytest.approx(0.0, abs=1e-12)
    assert metrics.cfsd(content, scaled).item() == pytest.approx(0.0, abs=1e-12)
    other = torch.randn(1, 8, 6, 6, generator=generator, dtype=torch.float64)
    assert metrics.cfsd(content, other).item() > 1e-3
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.cfsd(content, other[..., :5])


def test_self_similarity_rows_are_distributions() -> None:
    features = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    rows = metrics.self_similarity(features)
    assert rows.shape == (2, 15, 15)
    assert torch.allclose(rows.sum(dim=-1), torch.ones(2, 15, dtype=torch.float64))


def test_art_fid_composes_fid_and_lpips() -> None:
    assert metrics.art_fid(0.0, 0.0) == 1.0
    assert metrics.art_fid(9.0, 0.5) == pytest.approx(15.0)
    assert metrics.art_fid(implied_fid(15.151, 0.479), 0.479) == pytest.approx(15.151)


@pytest.mark.parametrize("method", list(PAPER_ROWS))
def test_composite_scores_reproduce_the_papers_dc_and_cc(method: str) -> None:
    row = PAPER_ROWS[method]
    # The paper rounds to three decimals; its DC and CC follow from its own DINO, CLIP-I, CLIP-T.
    assert metrics.dino_clip_score(row["dino"], row["clip_t"]) == pytest.approx(row["dc"], abs=1.5e-3)
    assert metrics.clip_clip_score(row["clip_i"], row["clip_t"]) == pytest.approx(row["cc"], abs=1.5e-3)
