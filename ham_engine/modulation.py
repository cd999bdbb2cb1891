"""The paper's formulas (docs/method.md §2–§4), each written once.

Statistics are taken in float32 whatever the model dtype, and results are cast back to
the input's dtype. Standard deviations are population ones (``correction=0``); AdaIN only
needs them to be consistent, and with them SINI's moment identity holds exactly.
"""

from __future__ import annotations

import torch

# Below this a channel is treated as constant; keeps AdaIN finite on flat inputs.
MIN_STD = 1e-6


def channel_stats(x: torch.Tensor, dim: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of ``x`` over ``dim``, in float32, dims kept.

    For latents ``[B, C, H, W]`` use ``dim=(2, 3)`` (over space); for attention features
    ``[B, L, C]`` use ``dim=1`` (over tokens). Statistics are per sample.
    """
    x = x.float()
    if x.device.type == "cpu":
        # torch's CPU std_mean (Welford) takes 5.7 ms on a [1, 1024, 960] tensor, two passes
        # 0.3 ms, and are as stable (squared deviations from the mean, not E[x²] − E[x]²).
        # On a GPU std_mean is one kernel launch where two passes would be five.
        mean = x.mean(dim=dim, keepdim=True)
        return mean, (x - mean).square_().mean(dim=dim, keepdim=True).sqrt_()
    std, mean = torch.std_mean(x, dim=dim, correction=0, keepdim=True)
    return mean, std


def adain_affine(
    content_mean: torch.Tensor, content_std: torch.Tensor, style_mean: torch.Tensor, style_std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive instance normalisation as the per-channel affine map it is:

        AdaIN(x, y) = σ(y) · (x − μ(x)) / σ(x) + μ(y) = a · x + b,
        a = σ(y) / σ(x),   b = μ(y) − a · μ(x)

    Returns ``(a, b)`` from the statistics of ``x`` (content) and ``y`` (style); applying
    them is one fused multiply-add over the features instead of four passes.
    """
    scale = style_std / content_std.clamp_min(MIN_STD)
    return scale, style_mean - scale * content_mean


def adain(
    content: torch.Tensor,
    style_mean: torch.Tensor,
    style_std: torch.Tensor,
    dim: int | tuple[int, ...],
) -> torch.Tensor:
    """Adaptive instance normalisation :func:`adain_affine` of ``content``, in float32.

    The style side is given by its statistics (``style_mean``, ``style_std`` from
    :func:`channel_stats` over the same ``dim``), so cached style statistics serve as
    well as a live style tensor.
    """
    content = content.float()
    scale, shift = adain_affine(*channel_stats(content, dim), style_mean, style_std)
    return torch.addcmul(shift, content, scale)


def sini(
    content_latent: torch.Tensor,
    style_mean: torch.Tensor,
    style_std: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """Style-injected noise initialisation (docs/method.md §2), on latents ``[B, C, H, W]``.

        A     = AdaIN(z_T^c, z_T^s)
        z_T^m = γ · (z_T^c − A) + A          (= γ·z_T^c + (1−γ)·A)

    ``style_mean``/``style_std`` are the per-channel statistics of z_T^s over space. The
    result has per-channel mean γμ_c + (1−γ)μ_s and std γσ_c + (1−γ)σ_s; γ = 1 returns
    the content latent, γ = 0 StyleID's AdaIN latent. Returned in float32.
    """
    content = content_latent.float()
    a = adain(content, style_mean, style_std, dim=(2, 3))
    # The expanded form makes γ = 1 return the content latent bit for bit.
    return gamma * content + (1.0 - gamma) * a


def gar_blend(
    own: torch.Tensor,
    content: torch.Tensor,
    style_mean: torch.Tensor,
    style_std: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Global attention regulation of one projection (docs/method.md §3), features ``[B, L, C]``.

        X^cs = AdaIN(X^c, X^s)               (per channel over tokens, per sample)
        X̂^m  = α · X^m + (1 − α) · X^cs      for X in {Q, K, V}

    ``own`` is the student's X^m, ``content`` the content teacher's X^c, and the style
    teacher enters through the statistics of X^s. Computed in float32, returned in
    ``own``'s dtype.
    """
    content = content.float()
    scale, shift = adain_affine(*channel_stats(content, dim=1), style_mean, style_std)
    # (1 − α)·AdaIN folded into one affine map: the features are read twice, not six times
    # (this runs on every selected layer at every step). α = 1 still returns X^m exactly.
    blended = torch.addcmul((1.0 - alpha) * shift, content, (1.0 - alpha) * scale)
    return blended.add_(own.float(), alpha=alpha).to(own.dtype)


def lat_query(own: torch.Tensor, content: torch.Tensor, beta: float) -> torch.Tensor:
    """Query protection of local attention transplantation (docs/method.md §4).

        Q̂^m = β · Q^m + (1 − β) · Q^c

    (the keys and values are the style teacher's, K^m, V^m ← K^s, V^s). Computed in
    float32, returned in ``own``'s dtype.
    """
    # lerp(c, m, β) = c + β·(m − c): one kernel, and exact at β = 0 and β = 1.
    return torch.lerp(content.float(), own.float(), beta).to(own.dtype)
