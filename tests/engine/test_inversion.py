"""DDIM: the step mirrors diffusers, inversion mirrors diffusers' inverse scheduler, and it converges."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ham_engine.engine import HamEngine
from ham_engine.inversion import DdimSchedule, ddim_inverse_step, ddim_invert, ddim_source_inverse_step, ddim_step
from ham_engine.tiny import sd_scheduler


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_is_bitwise_diffusers_ddim_scheduler_step(prediction_type: str) -> None:
    scheduler = sd_scheduler(prediction_type)
    schedule = DdimSchedule.from_scheduler(scheduler, 10, "cpu")
    scheduler.set_timesteps(10)
    sample, output = _latents(1), _latents(2)
    for k, t in enumerate(scheduler.timesteps):
        want = scheduler.step(output, t, sample).prev_sample
        got = ddim_step(output, sample, *schedule.alphas_of_step(k), prediction_type)
        assert torch.equal(got, want)


def test_inverse_step_undoes_the_sampling_step_for_a_fixed_noise_prediction() -> None:
    schedule = DdimSchedule.from_scheduler(sd_scheduler("epsilon"), 10, "cpu")
    sample, eps = _latents(3), _latents(4)
    for k in range(schedule.steps):
        alpha_t, alpha_prev = schedule.alphas_of_step(k)
        up = ddim_inverse_step(eps, sample, alpha_prev, alpha_t, "epsilon")
        torch.testing.assert_close(ddim_step(eps, up, alpha_t, alpha_prev, "epsilon"), sample, atol=1e-5, rtol=1e-5)


def _damped_unet_fn(engine: HamEngine, scale: float):
    """The tiny UNet with its output scaled down: nearly the identity denoiser, so nearly invertible.

    Always float32 on the CPU, whatever HAM_TEST_DTYPE / HAM_TEST_DEVICE say: these tests
    pin the DDIM arithmetic.
    """
    unet = copy.deepcopy(engine.model.unet).float().cpu()
    unet.conv_out.weight.mul_(scale)
    unet.conv_out.bias.mul_(scale)
    empty = engine.model.encode_prompt([""])
    text = type(empty)(empty.hidden_states.float().cpu(), {k: v.float().cpu() for k, v in empty.added.items()})

    def model(latents: torch.Tensor, _: int, timestep: torch.Tensor) -> torch.Tensor:
        return unet(latents, timestep, **text.unet_kwargs()).sample

    return model


def _reconstruction_error(model, clean: torch.Tensor, scheduler: DDIMScheduler, steps: int) -> float:
    schedule = DdimSchedule.from_scheduler(scheduler, steps, "cpu")
    latents = ddim_invert(model, clean, schedule)[0]
    for k in range(steps):
        output = model(latents, k, schedule.timesteps[k])
        latents = ddim_step(output, latents, *schedule.alphas_of_step(k), schedule.prediction_type)
    return float((latents - clean).abs().mean())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inversion_reconstruction_error_falls_as_steps_rise(tiny_engine: HamEngine, prediction_type: str) -> None:
    model = _damped_unet_fn(tiny_engine, 0.1)
    scheduler = DDIMScheduler.from_config(tiny_engine.model.scheduler.config, prediction_type=prediction_type)
    clean = _latents(5)
    with torch.inference_mode():
        errors = [_reconstruction_error(model, clean, scheduler, steps) for steps in (5, 10, 20)]
    # A trend, not a threshold: the random UNet is only nearly invertible.
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.75 * errors[0], errors


def test_inversion_trajectory_is_in_sampling_order_and_matches_diffusers_inverse_scheduler(
    tiny_engine: HamEngine,
) -> None:
    model = _damped_unet_fn(tiny_engine, 1.0)
    schedule = DdimSchedule.from_scheduler(tiny_engine.model.scheduler, 6, "cpu")
    inverse = DDIMInverseScheduler.from_config(tiny_engine.model.scheduler.config)
    inverse.set_timesteps(6)
    clean = _latents(6)
    with torch.inference_mode():
        trajectory = ddim_invert(model, clean, schedule)
        latents, want = clean, []
        for t in inverse.timesteps:
            latents = inverse.step(model(latents, 0, t), t, latents).prev_sample
            want.append(latents)
    assert list(inverse.timesteps.flip(0)) == list(schedule.timesteps)
    for got, expected in zip(trajectory, reversed(want), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_inversion_calls_before_step_once_per_step_and_can_stop() -> None:
    schedule = DdimSchedule.from_scheduler(sd_scheduler(), 5, "cpu")
    seen: list[int] = []

    def before_step(i: int) -> None:
        seen.append(i)
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ddim_invert(lambda x, k, t: torch.zeros_like(x), _latents(), schedule, before_step=before_step)
    assert seen == [0, 1, 2]


def test_v_prediction_inversion_reads_v_at_the_timestep_the_model_was_called_with(tiny_v_engine: HamEngine) -> None:
    # The model is called at the target timestep, so its v converts to ε̂ at that noise level,
    # as sampling will convert it. diffusers' DDIMInverseScheduler converts at the latent's
    # own level instead; on the damped tiny-v UNet that reconstructs ~10x worse.
    model = _damped_unet_fn(tiny_v_engine, 0.1)
    config = tiny_v_engine.model.scheduler.config
    steps, clean = 10, _latents(5)
    schedule = DdimSchedule.from_scheduler(tiny_v_engine.model.scheduler, steps, "cpu")
    inverse = DDIMInverseScheduler.from_config(config)
    inverse.set_timesteps(steps)
    with torch.inference_mode():
        ours = _reconstruction_error(model, clean, DDIMScheduler.from_config(config), steps)
        latents = clean
        for t in inverse.timesteps:
            latents = inverse.step(model(latents, 0, t), t, latents).prev_sample
        for k in range(steps):
            output = model(latents, k, schedule.timesteps[k])
            latents = ddim_step(output, latents, *schedule.alphas_of_step(k), "v_prediction")
        theirs = float((latents - clean).abs().mean())
    assert ours < 0.25 * theirs, (ours, theirs)


def test_source_inversion_calls_the_model_on_each_latent_at_its_own_timestep() -> None:
    schedule = DdimSchedule.from_scheduler(sd_scheduler(), 5, "cpu")
    calls: list[tuple[int, int, torch.Tensor]] = []

    def model(latents: torch.Tensor, index: int, timestep: torch.Tensor) -> torch.Tensor:
        calls.append((index, int(timestep), latents))
        return 0.1 * latents

    clean = _latents(7)
    trajectory = ddim_invert(model, clean, schedule, convention="source")
    # The first call is on the clean latent, at the level below the schedule (clamped to 0)...
    assert (calls[0][0], calls[0][1]) == (5, max(schedule.timestep_values[-1] - schedule.stride, 0))
    assert torch.equal(calls[0][2], clean)
    # ... every other one on trajectory entry k at timesteps[k]: sampling step k's teacher call.
    assert [(i, t) for i, t, _ in calls[1:]] == [(k, schedule.timestep_values[k]) for k in range(4, 0, -1)]
    for index, _, latents in calls[1:]:
        assert torch.equal(latents, trajectory[index])


def test_source_inverse_step_is_the_sampling_step_run_upwards() -> None:
    schedule = DdimSchedule.from_scheduler(sd_scheduler("v_prediction"), 10, "cpu")
    sample, output = _latents(8), _latents(9)
    for k in range(schedule.steps):
        alpha_t, alpha_prev = schedule.alphas_of_step(k)
        up = ddim_source_inverse_step(output, sample, alpha_prev, alpha_t, "v_prediction")
        assert torch.equal(up, ddim_step(output, sample, alpha_prev, alpha_t, "v_prediction"))


def _reconstruction_errors(engine: HamEngine, convention: str, steps: tuple[int, ...]) -> list[float]:
    model = _damped_unet_fn(engine, 0.1)
    schedule_of = {n: DdimSchedule.from_scheduler(engine.model.scheduler, n, "cpu") for n in steps}
    clean, errors = _latents(5), []
    with torch.inference_mode():
        for n in steps:
            schedule = schedule_of[n]
            latents = ddim_invert(model, clean, schedule, convention=convention)[0]
            for k in range(n):
                output = model(latents, k, schedule.timesteps[k])
                latents = ddim_step(output, latents, *schedule.alphas_of_step(k), schedule.prediction_type)
            errors.append(float((latents - clean).abs().mean()))
    return errors


@pytest.mark.parametrize("which", ["tiny_engine", "tiny_v_engine"])
def test_source_inversion_reconstruction_error_falls_as_steps_rise(which: str, request: pytest.FixtureRequest) -> None:
    errors = _reconstruction_errors(request.getfixturevalue(which), "source", (5, 10, 20))
    # A trend, not a threshold (docs/method.md quotes the measured values).
    assert errors[0] > errors[1] > errors[2], errors


def test_unknown_inversion_convention_is_a_value_error() -> None:
    schedule = DdimSchedule.from_scheduler(sd_scheduler(), 2, "cpu")
    with pytest.raises(ValueError, match="inversion"):
        ddim_invert(lambda x, k, t: x, _latents(), schedule, convention="sideways")
