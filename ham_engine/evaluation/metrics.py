"""The paper's metrics as arithmetic on features: no network, no file, no weights.

Each formula appears once, here, with its definition (docs/evaluation.md gives the
sources). The networks that produce the features are in :mod:`.networks` and
:mod:`.inception`; :mod:`.suite` feeds them images and calls these functions.

- FID: Fréchet distance of two Gaussians fitted to Inception pool3 features,
  ``‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2·tr((Σ₁Σ₂)^½)``.
- LPIPS: per layer, unit-normalise the channels, square the difference, weight the
  channels (the linear heads), average over space; sum over layers.
- CFSD: KL divergence between the spatial self-similarity distributions of content and
  output features.
- ArtFID = (1 + LPIPS)·(1 + FID); DC = (1 + DINO)·(1 + CLIP-T); CC = (1 + CLIP-I)·(1 + CLIP-T).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N − 1) covariance of ``features`` [N, D], as FID fits them (float64)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: need an [N, D] array with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2·tr((Σ₁Σ₂)^½)``, the Fréchet distance of two Gaussians.

    ``tr((Σ₁Σ₂)^½)`` is computed as ``Σ √λᵢ`` over the eigenvalues of the symmetric PSD
    matrix ``Σ₁^½ Σ₂ Σ₁^½`` (similar to ``Σ₁Σ₂``, so the same eigenvalues): what
    pytorch-fid's ``scipy.linalg.sqrtm`` trace gives, without its complex round-off on the
    rank-deficient covariances of a small set.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes differ: μ {mu1.shape}/{mu2.shape}, Σ {sigma1.shape}/{sigma2.shape}")
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_covmean = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)
    return max(distance, 0.0)  # round-off can dip a hair below zero for identical sets


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets [N, D] and [M, D]: the Fréchet distance of their fitted Gaussians.

    With fewer samples than dimensions (800 pairs, 2048-d pool3) the covariances are
    ``Σ = AᵀA / (N − 1)`` of the centred samples ``A``, and ``tr((Σ₁Σ₂)^½)`` equals the
    nuclear norm of ``A₁A₂ᵀ / √((N − 1)(M − 1))`` (the non-zero eigenvalues of Σ₁Σ₂ are
    those of the N×N matrix ``A₁A₂ᵀA₂A₁ᵀ``, scaled): the same number as
    :func:`frechet_distance` of :func:`gaussian_stats`, from an N×M matrix instead of
    three D×D decompositions.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    for name, x in (("features_a", a), ("features_b", b)):
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"{name}: need an [N, D] array with N >= 2, got shape {x.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fid: feature sizes differ, {a.shape[1]} vs {b.shape[1]}")
    n, m, dims = a.shape[0], b.shape[0], a.shape[1]
    if min(n, m) >= dims:
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    centred_a, centred_b = a - a.mean(axis=0), b - b.mean(axis=0)
    trace_a = float((centred_a**2).sum()) / (n - 1)
    trace_b = float((centred_b**2).sum()) / (m - 1)
    trace_covmean = float(np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum()) / np.sqrt((n - 1) * (m - 1))
    diff = a.mean(axis=0) - b.mean(axis=0)
    return max(float(diff @ diff + trace_a + trace_b - 2.0 * trace_covmean), 0.0)


def unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each spatial position's channel vector by its L2 norm (LPIPS's ``normalize_tensor``)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def lpips_distance(
    features_a: Sequence[torch.Tensor], features_b: Sequence[torch.Tensor], heads: Sequence[torch.Tensor]
) -> torch.Tensor:
    """LPIPS per image [B] from per-layer trunk features [B, C_l, H_l, W_l] and linear heads [C_l].

    ``d = Σ_l mean_hw( Σ_c w_lc · (ĥa_lchw − ĥb_lchw)² )`` with ``ĥ`` the unit-normalised
    features (Zhang et al. 2018, eq. 1).
    """
    if not len(features_a) == len(features_b) == len(heads):
        raise ValueError("lpips_distance: need one head per layer and the same layers for both images")
    total = None
    for a, b, w in zip(features_a, features_b, heads, strict=True):
        squared = (unit_normalize(a) - unit_normalize(b)).pow(2)
        layer = (squared * w.reshape(1, -1, 1, 1)).sum(dim=1).mean(dim=(1, 2))
        total = layer if total is None else total + layer
    return total


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of embeddings [B, D] (in [−1, 1]; 1 for identical rows)."""
    a, b = a.double(), b.double()
    value = (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    return value.clamp(-1.0, 1.0)


def self_similarity(features: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of the spatial self-similarity ``FᵀF`` of features [B, C, H, W] → [B, HW, HW].

    Channels are unit-normalised at each position first, so the logits are cosines in
    [−1, 1] and the distribution depends on structure, not on feature magnitude.
    """
    flat = unit_normalize(features).flatten(2)  # [B, C, N], in the features' dtype
    return torch.softmax(flat.transpose(1, 2) @ flat, dim=-1)


def cfsd(content_features: torch.Tensor, output_features: torch.Tensor) -> torch.Tensor:
    """Content Feature Structural Distance per image [B]: ``mean_i KL(P_c[i] ‖ P_o[i])``.

    ``P[i]`` is position ``i``'s softmax distribution of similarity to every position
    (:func:`self_similarity`); 0 when the output keeps the content's structure exactly.
    """
    if content_features.shape != output_features.shape:
        shapes = f"{tuple(content_features.shape)} vs {tuple(output_features.shape)}"
        raise ValueError(f"cfsd: feature shapes differ, {shapes}")
    p, q = self_similarity(content_features), self_similarity(output_features)
    tiny = torch.finfo(p.dtype).tiny
    kl = (p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())).sum(dim=-1)
    return kl.mean(dim=-1)


def art_fid(fid_value: float, lpips_value: float) -> float:
    """ArtFID = (1 + LPIPS)·(1 + FID) (Wright & Ommer 2022); lower is better."""
    return (1.0 + lpips_value) * (1.0 + fid_value)


def dino_clip_score(dino: float, clip_t: float) -> float:
    """DC = (1 + DINO)·(1 + CLIP-T) (the paper's definition, docs/evaluation.md); higher is better."""
    return (1.0 + dino) * (1.0 + clip_t)


def clip_clip_score(clip_i: float, clip_t: float) -> float:
    """CC = (1 + CLIP-I)·(1 + CLIP-T) (the paper's definition, docs/evaluation.md); higher is better."""
    return (1.0 + clip_i) * (1.0 + clip_t)
