"""Rectified flow: the Euler sampling step, its inverse, and whole-trajectory inversion.

SD3 and FLUX are trained on the straight path x_σ = (1 − σ)·x0 + σ·ε and predict the
velocity v = ε − x0; sampling integrates dx/dσ = v from σ = 1 down to 0. The arithmetic
mirrors ``diffusers.FlowMatchEulerDiscreteScheduler.step`` operation for operation
(float32 latents, ``dt = σ_next − σ``, ``x + dt · v``), so a HAM student with every
modulation off reproduces the stock pipeline's loop exactly.

Inversion integrates the same ODE upwards with the same timesteps (Euler inversion, as
RF-Inversion and RF-Solver start from), in the two conventions of the DDIM inversion
(docs/method.md, "Inversion conventions"):

* ``"target"`` – v evaluated at the timestep the step moves *to*;
* ``"source"`` – v evaluated at the latent's own timestep (plain explicit Euler upwards),
  exactly the call a re-anchored teacher makes at the sampling step that starts from
  that latent, so teachers can be recorded during the inversion.

A :class:`FlowSchedule` has the interface the engine drives a
:class:`~ham_engine.inversion.DdimSchedule` through (``timesteps``, ``steps``,
``timestep_tensor``, ``step``, ``invert``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ham_engine.inversion import INVERSIONS, ModelFn

FLOW_PREDICTION = "flow"  # what a flow-matching model predicts: the velocity ε − x0


def calculate_shift(
    image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float
) -> float:
    """FLUX's resolution-dependent shift ``mu`` (as ``diffusers.pipelines.flux.pipeline_flux.calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@dataclass(frozen=True)
class FlowSchedule:
    """The timesteps and sigmas of an ``N``-step flow-matching Euler run.

    ``timesteps`` (σ · num_train_timesteps, float32, on the model device) are in sampling
    order; ``sigmas`` has ``N + 1`` entries, the last 0 (the clean latent). Sampling step
    ``k`` moves a latent from ``sigmas[k]`` to ``sigmas[k + 1]``.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    prediction_type: str = FLOW_PREDICTION

    @classmethod
    def from_scheduler(
        cls,
        scheduler: FlowMatchEulerDiscreteScheduler,
        steps: int,
        device: torch.device | str,
        image_seq_len: int | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> FlowSchedule:
        """The schedule the stock pipeline would use for ``steps`` steps (``scheduler`` is not modified).

        ``image_seq_len`` (image tokens after patching) sets the shift of a scheduler with
        ``use_dynamic_shifting`` (FLUX), as its pipeline computes it; ``sigmas`` are the
        unshifted sigmas a pipeline passes (FLUX: ``linspace(1, 1/N, N)``), None for the
        scheduler's own.
        """
        own = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        kwargs = {}
        if own.config.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise ValueError("a dynamically shifted flow schedule needs the image's token count")
            kwargs["mu"] = calculate_shift(
                image_seq_len,
                own.config.get("base_image_seq_len", 256),
                own.config.get("max_image_seq_len", 4096),
                own.config.get("base_shift", 0.5),
                own.config.get("max_shift", 1.15),
            )
        if sigmas is not None:
            kwargs["sigmas"] = list(sigmas)
        own.set_timesteps(steps, device=device, **kwargs)
        return cls(timesteps=own.timesteps, sigmas=own.sigmas)

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def timestep_tensor(self, k: int) -> torch.Tensor:
        """The timestep of schedule index ``k``; ``k == steps`` is the clean latent's level, 0."""
        if k < self.steps:
            return self.timesteps[k]
        return torch.zeros_like(self.timesteps[-1])

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, k: int) -> torch.Tensor:
        """Sampling step ``k``: ``x + (σ_{k+1} − σ_k) · v`` in float32 (as ``FlowMatchEulerDiscreteScheduler.step``)."""
        sample = sample.to(torch.float32)
        dt = self.sigmas[k + 1] - self.sigmas[k]
        return sample + dt * model_output

    def inverse_step(self, model_output: torch.Tensor, sample: torch.Tensor, k: int) -> torch.Tensor:
        """Sampling step ``k`` backwards: from ``σ_{k+1}`` up to ``σ_k`` with a velocity held fixed."""
        sample = sample.to(torch.float32)
        dt = self.sigmas[k] - self.sigmas[k + 1]
        return sample + dt * model_output

    def invert(
        self,
        model: ModelFn,
        latents: torch.Tensor,
        before_step: Callable[[int], None] | None = None,
        convention: str = "target",
    ) -> list[torch.Tensor]:
        """Invert clean ``latents``: ``steps`` model calls; the trajectory in sampling order (entry 0: z_T).

        As :func:`~ham_engine.inversion.ddim_invert`: "target" calls
        ``model(x, k, timesteps[k])`` on the latent below entry ``k``; "source" calls
        ``model(entry[k+1], k + 1, timestep_tensor(k + 1))``, the first call on the clean
        latent at timestep 0, every later one sampling step ``k + 1``'s teacher call.
        """
        if convention not in INVERSIONS:
            raise ValueError(f"inversion: must be one of {INVERSIONS}, got {convention!r}")
        sample = latents.float()
        trajectory: list[torch.Tensor] = [sample] * self.steps
        for i in range(self.steps):
            if before_step is not None:
                before_step(i)
            k = self.steps - 1 - i
            if convention == "target":
                output = model(sample, k, self.timesteps[k])
            else:
                output = model(sample, k + 1, self.timestep_tensor(k + 1))
            sample = self.inverse_step(output, sample, k)
            trajectory[k] = sample
        return trajectory
