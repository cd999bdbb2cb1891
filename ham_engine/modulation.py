"""The paper's formulas (PAPER.md §1–§3), each written once.

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
    std, mean = torch.std_mean(x.float(), dim=dim, correction=0, keepdim=True)
    return mean, std


def adain(
    content: torch.Tensor,
    style_mean: torch.Tensor,
    style_std: torch.Tensor,
    dim: int | tuple[int, ...],
) -> torch.Tensor:
    """Adaptive instance normalisation, in float32.

        AdaIN(x, y) = σ(y) · (x − μ(x)) / σ(x) + μ(y)

    ``x`` is ``content``; the style side is given by its statistics (``style_mean``,
    ``style_std`` from :func:`channel_stats` over the same ``dim``), so cached style
    statistics serve as well as a live style tensor.
    """
    content = content.float()
    mean, std = channel_stats(content, dim)
    return style_std * (content - mean) / std.clamp_min(MIN_STD) + style_mean


def sini(
    content_latent: torch.Tensor,
    style_mean: torch.Tensor,
    style_std: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """Style-injected noise initialisation (PAPER.md §1), on latents ``[B, C, H, W]``.

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
    """Global attention regulation of one projection (PAPER.md §2), features ``[B, L, C]``.

        X^cs = AdaIN(X^c, X^s)               (per channel over tokens, per sample)
        X̂^m  = α · X^m + (1 − α) · X^cs      for X in {Q, K, V}

    ``own`` is the student's X^m, ``content`` the content teacher's X^c, and the style
    teacher enters through the statistics of X^s. Returned in ``own``'s dtype.
    """
    blended = alpha * own.float() + (1.0 - alpha) * adain(content, style_mean, style_std, dim=1)
    return blended.to(own.dtype)


def lat_query(own: torch.Tensor, content: torch.Tensor, beta: float) -> torch.Tensor:
    """Query protection of local attention transplantation (PAPER.md §3).

        Q̂^m = β · Q^m + (1 − β) · Q^c

    (the keys and values are the style teacher's, K^m, V^m ← K^s, V^s). Computed in
    float32, returned in ``own``'s dtype.
    """
    return (beta * own.float() + (1.0 - beta) * content.float()).to(own.dtype)
