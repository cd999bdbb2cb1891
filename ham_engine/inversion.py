"""Deterministic DDIM (η = 0): the sampling step, its inverse, and whole-trajectory inversion.

The arithmetic mirrors ``diffusers.DDIMScheduler.step`` operation for operation (same
float32 tensor scalars, same order), so a HAM student with all modulation off reproduces
a stock diffusers DDIM loop exactly. Model outputs of "epsilon", "v_prediction" and
"sample" models are converted to (x̂0, ε̂) first; inversion holds ε̂ fixed and moves the
latent one step up the schedule (the usual DDIM inversion approximation).

Two inversion conventions differ in where that ε̂ is evaluated (docs/method.md):

* ``"target"`` – at the timestep the step moves to, as diffusers' ``DDIMInverseScheduler``;
* ``"source"`` – at the latent's own timestep: the DDIM update run upwards, and exactly the
  call a re-anchored teacher makes at the sampling step that starts from that latent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
INVERSIONS = ("target", "source")

# (latents [B, C, H, W] float32, timestep index k, timestep) -> model output, float32. The
# index is that of ``timestep`` in ``DdimSchedule.timesteps``; ``steps`` stands for the clean
# latent's own level below the schedule (the first "source" inversion call).
ModelFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DdimSchedule:
    """The timesteps of an ``N``-step DDIM run and the cumulative alphas around them.

    ``timesteps`` are in sampling order (noisy → clean). Sampling step ``k`` moves a
    latent from ``timesteps[k]`` to ``timesteps[k] - stride`` (as ``DDIMScheduler.step``);
    inversion walks the same pairs backwards.
    """

    timesteps: torch.Tensor  # int64, on the model device (what the UNet is called with)
    timestep_values: tuple[int, ...]  # the same as Python ints (no device sync to read them)
    alphas_cumprod: torch.Tensor  # float32, CPU (0-dim entries act as scalars on any device)
    final_alpha_cumprod: torch.Tensor
    stride: int
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler, steps: int, device: torch.device | str) -> DdimSchedule:
        """The schedule ``scheduler`` would use for ``steps`` steps (the scheduler is not modified)."""
        prediction_type = str(scheduler.config.prediction_type)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        own = DDIMScheduler.from_config(scheduler.config)
        own.set_timesteps(steps)
        return cls(
            timesteps=own.timesteps.to(device),
            timestep_values=tuple(int(t) for t in own.timesteps),
            alphas_cumprod=own.alphas_cumprod,
            final_alpha_cumprod=own.final_alpha_cumprod,
            stride=own.config.num_train_timesteps // steps,
            prediction_type=prediction_type,
        )

    @property
    def steps(self) -> int:
        return len(self.timestep_values)

    def alpha(self, timestep: int) -> torch.Tensor:
        """ᾱ at ``timestep``; below 0 the schedule's final ᾱ (as ``DDIMScheduler``)."""
        return self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha_cumprod

    def timestep_tensor(self, k: int) -> torch.Tensor:
        """The timestep of schedule index ``k``; ``k == steps`` is the clean latent's level,
        ``timesteps[-1] - stride`` clamped to 0 (a UNet has no negative timestep)."""
        if k < self.steps:
            return self.timesteps[k]
        return torch.full_like(self.timesteps[-1], max(self.timestep_values[-1] - self.stride, 0))

    def alphas_of_step(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ at step ``k``'s timestep, ᾱ where sampling step ``k`` lands)."""
        t = self.timestep_values[k]
        return self.alpha(t), self.alpha(t - self.stride)

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, k: int) -> torch.Tensor:
        """Sampling step ``k`` (:func:`ddim_step` with this schedule's alphas and prediction type)."""
        return ddim_step(model_output, sample, *self.alphas_of_step(k), self.prediction_type)

    def invert(
        self,
        model: ModelFn,
        latents: torch.Tensor,
        before_step: Callable[[int], None] | None = None,
        convention: str = "target",
    ) -> list[torch.Tensor]:
        """:func:`ddim_invert` along this schedule (the interface a flow schedule shares)."""
        return ddim_invert(model, latents, self, before_step=before_step, convention=convention)


def predicted_x0_and_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from a model output at noise level ᾱ_t, by prediction type (as ``DDIMScheduler``)."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    return pred_original_sample, pred_epsilon


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """One deterministic DDIM sampling step, ᾱ_t → ᾱ_prev:

    x_prev = √ᾱ_prev · x̂0 + √(1 − ᾱ_prev) · ε̂
    """
    pred_original_sample, pred_epsilon = predicted_x0_and_eps(model_output, sample, alpha_prod_t, prediction_type)
    pred_sample_direction = (1 - alpha_prod_t_prev) ** (0.5) * pred_epsilon
    return alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction


def ddim_inverse_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_from: torch.Tensor,
    alpha_prod_to: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """One DDIM inversion step, from noise level ᾱ_from up to ᾱ_to.

    The model was evaluated at the *target* timestep (its output is read at ᾱ_to, where
    sampling will evaluate it); ε̂ is then held fixed and x̂0 taken at the latent's own level:
    x_to = √ᾱ_to · (x − √(1 − ᾱ_from) · ε̂) / √ᾱ_from + √(1 − ᾱ_to) · ε̂
    """
    _, pred_epsilon = predicted_x0_and_eps(model_output, sample, alpha_prod_to, prediction_type)
    pred_original_sample = (sample - (1 - alpha_prod_from) ** (0.5) * pred_epsilon) / alpha_prod_from ** (0.5)
    return alpha_prod_to ** (0.5) * pred_original_sample + (1 - alpha_prod_to) ** (0.5) * pred_epsilon


def ddim_source_inverse_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_from: torch.Tensor,
    alpha_prod_to: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """One DDIM inversion step, ᾱ_from → ᾱ_to, the model evaluated at the *source* timestep.

    The sampling update itself run upwards, (x̂0, ε̂) read at the latent's own level:
    x_to = √ᾱ_to · x̂0 + √(1 − ᾱ_to) · ε̂,   x̂0 = (x − √(1 − ᾱ_from) · ε̂) / √ᾱ_from
    """
    return ddim_step(model_output, sample, alpha_prod_from, alpha_prod_to, prediction_type)


def ddim_invert(
    model: ModelFn,
    latents: torch.Tensor,
    schedule: DdimSchedule,
    before_step: Callable[[int], None] | None = None,
    convention: str = "target",
) -> list[torch.Tensor]:
    """Invert clean ``latents`` along ``schedule``: ``schedule.steps`` model calls.

    Returns the trajectory in sampling order: entry ``k`` is the latent at
    ``schedule.timesteps[k]`` (entry 0 is z_T), i.e. exactly what sampling step ``k``
    starts from. ``before_step(i)`` runs before inversion step ``i`` (0-based; for
    progress and cancellation). Latents are float32.

    ``convention`` "target" calls ``model(x, k, timesteps[k])`` on the latent below entry
    ``k`` to produce entry ``k``; "source" calls ``model(entry[k+1], k + 1, timesteps[k+1])``
    (the first call, on the clean latent, at index ``steps``): every call after the first
    is then sampling step ``k + 1``'s teacher call on its re-anchored latent.
    """
    if convention not in INVERSIONS:
        raise ValueError(f"inversion: must be one of {INVERSIONS}, got {convention!r}")
    sample = latents.float()
    trajectory: list[torch.Tensor] = [sample] * schedule.steps
    for i in range(schedule.steps):
        if before_step is not None:
            before_step(i)
        k = schedule.steps - 1 - i
        alpha_to, alpha_from = schedule.alphas_of_step(k)
        if convention == "target":
            output = model(sample, k, schedule.timesteps[k])
            sample = ddim_inverse_step(output, sample, alpha_from, alpha_to, schedule.prediction_type)
        else:
            output = model(sample, k + 1, schedule.timestep_tensor(k + 1))
            sample = ddim_source_inverse_step(output, sample, alpha_from, alpha_to, schedule.prediction_type)
        trajectory[k] = sample
    return trajectory
