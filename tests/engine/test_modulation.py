"""The paper's formulas: SINI, AdaIN, the GAR blend and the LAT query blend."""

from __future__ import annotations

import pytest
import torch

from ham_engine.modulation import adain, channel_stats, gar_blend, lat_query, sini


def _latents(seed: int, mean: float, std: float, shape: tuple[int, ...] = (1, 4, 8, 8)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    channel_means = torch.linspace(-1, 1, shape[1]).view(1, -1, 1, 1) + mean
    return torch.randn(shape, generator=generator) * std + channel_means


def _stats(x: torch.Tensor, dim) -> tuple[torch.Tensor, torch.Tensor]:
    # Written out by hand so the tests do not lean on channel_stats.
    mean = x.mean(dim=dim, keepdim=True)
    std = ((x - mean) ** 2).mean(dim=dim, keepdim=True).sqrt()
    return mean, std


def test_channel_stats_are_per_sample_per_channel_population_statistics() -> None:
    x = _latents(0, 0.5, 2.0, (2, 4, 8, 8))
    mean, std = channel_stats(x, dim=(2, 3))
    want_mean, want_std = _stats(x, (2, 3))
    assert mean.shape == (2, 4, 1, 1)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(std, want_std)


def test_channel_stats_stay_accurate_for_features_far_from_zero() -> None:
    # In float32, E[x²] − E[x]² is off by several percent for features offset by 1e3;
    # averaging squared deviations from the mean is not.
    x = _latents(11, 1e3, 1.0, (1, 4, 32, 32))
    mean, std = channel_stats(x, dim=(2, 3))
    want = x.double().std(dim=(2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(std.double(), want, atol=0, rtol=1e-4)
    torch.testing.assert_close(mean.double(), x.double().mean(dim=(2, 3), keepdim=True), atol=1e-4, rtol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 0.9])
def test_sini_output_statistics_are_gamma_interpolated(gamma: float) -> None:
    content = _latents(1, 0.2, 0.7)
    style = _latents(2, -1.5, 2.5)
    style_mean, style_std = _stats(style, (2, 3))
    out = sini(content, style_mean, style_std, gamma)
    content_mean, content_std = _stats(content, (2, 3))
    out_mean, out_std = _stats(out, (2, 3))
    torch.testing.assert_close(out_mean, gamma * content_mean + (1 - gamma) * style_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_std, gamma * content_std + (1 - gamma) * style_std, atol=1e-5, rtol=1e-5)


def test_sini_gamma_one_returns_the_content_latent_exactly() -> None:
    content = _latents(3, 0.0, 1.0)
    style_mean, style_std = _stats(_latents(4, 3.0, 0.1), (2, 3))
    assert torch.equal(sini(content, style_mean, style_std, 1.0), content)


def test_sini_gamma_zero_is_adain_of_content_to_style() -> None:
    content = _latents(5, 0.0, 1.0)
    style = _latents(6, 2.0, 3.0)
    style_mean, style_std = _stats(style, (2, 3))
    content_mean, content_std = _stats(content, (2, 3))
    want = style_std * (content - content_mean) / content_std + style_mean
    torch.testing.assert_close(sini(content, style_mean, style_std, 0.0), want)


def test_adain_over_tokens_gives_the_style_statistics_per_sample() -> None:
    generator = torch.Generator().manual_seed(7)
    content = torch.randn(2, 16, 8, generator=generator)
    style = torch.randn(2, 16, 8, generator=generator) * torch.tensor([[[3.0]], [[0.5]]]) + 4.0
    style_mean, style_std = _stats(style, 1)
    out = adain(content, style_mean, style_std, dim=1)
    out_mean, out_std = _stats(out, 1)
    torch.testing.assert_close(out_mean, style_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_std, style_std, atol=1e-5, rtol=1e-5)


def test_adain_of_a_constant_channel_is_finite() -> None:
    content = torch.ones(1, 8, 4)
    out = adain(content, torch.zeros(1, 1, 4), torch.ones(1, 1, 4), dim=1)
    assert torch.isfinite(out).all()


def test_gar_blend_is_alpha_own_plus_one_minus_alpha_adain() -> None:
    generator = torch.Generator().manual_seed(8)
    own, content, style = (torch.randn(1, 16, 8, generator=generator) for _ in range(3))
    style_mean, style_std = _stats(style, 1)
    content_mean, content_std = _stats(content, 1)
    cs = style_std * (content - content_mean) / content_std + style_mean
    out = gar_blend(own, content, style_mean, style_std, 0.75)
    torch.testing.assert_close(out, 0.75 * own + 0.25 * cs)


def test_gar_blend_alpha_one_returns_own_exactly_and_keeps_dtype() -> None:
    generator = torch.Generator().manual_seed(9)
    own, content = (torch.randn(1, 16, 8, generator=generator).to(torch.bfloat16) for _ in range(2))
    out = gar_blend(own, content, torch.zeros(1, 1, 8), torch.ones(1, 1, 8), 1.0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, own)


def test_lat_query_blends_student_and_content_queries() -> None:
    generator = torch.Generator().manual_seed(10)
    own, content = (torch.randn(2, 16, 8, generator=generator) for _ in range(2))
    torch.testing.assert_close(lat_query(own, content, 0.25), 0.25 * own + 0.75 * content)
    assert torch.equal(lat_query(own, content, 1.0), own)
    assert torch.equal(lat_query(own, content, 0.0), content)
