"""The SD3 family (tiny-sd3): joint attention, flow-matching Euler sampling and inversion, HAM end to end."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from PIL import Image

from ham_engine import TransferParams, tiny
from ham_engine.attention import (
    CROSS_ATTENTION,
    SELF_ATTENTION,
    AttentionEvent,
    BranchLayout,
    ModulationContext,
    attention_layers,
)
from ham_engine.dit import FlowDiffusionModel
from ham_engine.engine import HamEngine, Style
from ham_engine.families import UnsupportedModel
from ham_engine.feature_store import DirectoryFeatureStore
from ham_engine.flow import FlowSchedule
from ham_engine.joint_attention import HookedJointProcessor
from ham_engine.loading import load_model
from ham_engine.params import ParamError
from tests.engine.conftest import DATA, FULL_PRECISION, _load_engine, tolerance

STEPS = 3
SMALL = TransferParams(steps=STEPS, size=64)
OFF = TransferParams(steps=STEPS, size=64, sini=False, gar=False, lat=False)
PIXEL_BOUND = 2  # as tests/engine/test_batch.py: a student batched with K styles vs alone


@pytest.fixture(scope="session")
def tiny_sd3_engine(tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    return _load_engine("tiny-sd3", tmp_path_factory)


@pytest.fixture
def sd3(tiny_sd3_engine: HamEngine) -> HamEngine:
    """The shared tiny-sd3 model behind a fresh engine (empty caches)."""
    return HamEngine(tiny_sd3_engine.model)


def _image(name: str) -> Image.Image:
    with Image.open(DATA / name) as image:
        return image.convert("RGB")


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


# -- the model and its text ----------------------------------------------------------------


def test_tiny_sd3_is_an_sd3_pipeline_with_two_clips_no_t5_and_a_flow_scheduler(tiny_sd3_engine: HamEngine) -> None:
    model = tiny_sd3_engine.model
    assert isinstance(model, FlowDiffusionModel)
    assert (model.family.name, model.family.default_size, model.prediction_type) == ("sd3", 1024, "flow")
    assert type(model.transformer).__name__ == "SD3Transformer2DModel"
    assert isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler)
    assert model.family.t5 is None
    assert model.vae.config.latent_channels == 16 and model.vae.config.shift_factor == pytest.approx(0.0609)
    # The later half of the joint blocks by default; every attention is stock joint attention.
    assert model.family.default_layers == ("transformer_blocks.2.attn", "transformer_blocks.3.attn")
    assert {type(p) for p in model.transformer.attn_processors.values()} == {JointAttnProcessor2_0}


def test_sd3_prompts_are_clip_states_padded_to_the_joint_width_then_t5_zeros(tiny_sd3_engine: HamEngine) -> None:
    model = tiny_sd3_engine.model
    text = model.encode_prompt(["", "an oil painting", "an ink engraving"], size=(64, 64))
    clip_width = sum(e.config.hidden_size for e in model.family.text_encoders)  # 16 + 32
    assert text.shape == (3, 77 + 256, 64)
    assert text.added["pooled_projections"].shape == (3, clip_width)
    assert not text.hidden_states[:, :77, clip_width:].any()  # padding to the T5 width
    assert not text.hidden_states[:, 77:].any()  # no T5: zeros, as diffusers does
    assert text.hidden_states[0, :77].any()  # the empty prompt is encoded, not zeros (SD3's own uncond)
    assert not torch.equal(text.hidden_states[1], text.hidden_states[2])


# -- stock mechanics ---------------------------------------------------------------------


class _Identity(HookedJointProcessor):
    def hook(self, attn, hidden_states, image, text):
        return image, text


def _transformer_call(model: FlowDiffusionModel, rows: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    text = model.encode_prompt(["", "a", "b"][:rows], size=(64, 64))
    return {
        "sample": torch.randn((rows, 16, 8, 8), generator=generator).to(model.device, model.dtype),
        "timestep": torch.tensor(700.0, device=model.device),
        **text.unet_kwargs(),
    }


def test_the_hooked_joint_processor_is_bitwise_the_stock_one_on_every_block(tiny_sd3_engine: HamEngine) -> None:
    model = tiny_sd3_engine.model
    inputs = _transformer_call(model)
    with torch.inference_mode():
        stock = model.unet(**inputs)[0]
        transformer = model.transformer
        transformer.set_attn_processor(_Identity())  # includes SD3.5's attn2 and the context_pre_only block
        try:
            hooked = model.unet(**inputs)[0]
        finally:
            transformer.set_attn_processor(JointAttnProcessor2_0())
    assert torch.equal(hooked, stock)


def test_an_unmodulated_ham_processor_is_bitwise_stock_and_a_modulated_one_changes_only_the_student(
    tiny_sd3_engine: HamEngine,
) -> None:
    model = tiny_sd3_engine.model
    inputs = _transformer_call(model)
    layers = ("transformer_blocks.2.attn", "transformer_blocks.3.attn")
    context = ModulationContext(alpha=0.5, beta=0.5, gar_layers=layers, lat_layers=layers)
    layout = BranchLayout(("content_teacher", "style_teacher", "student"))
    with torch.inference_mode():
        stock = model.unet(**inputs)[0]
        with model.unet.ham_modulated_attention(context):
            context.begin_step(0, layout, modulating=False)
            off = model.unet(**inputs)[0]
            context.begin_step(0, layout, modulating=True)
            on = model.unet(**inputs)[0]
    assert torch.equal(off, stock)
    assert torch.equal(on[:2], stock[:2]) and not torch.allclose(on[2], stock[2])
    assert {type(p) for p in model.transformer.attn_processors.values()} == {JointAttnProcessor2_0}


def test_all_modulation_off_is_bitwise_the_stock_sd3_pipeline_from_the_same_inverted_latent(
    sd3: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    result = sd3.transfer_latents(content_image, style=style_image, params=OFF)
    model = sd3.model
    first, second = model.family.text_encoders
    pipe = StableDiffusion3Pipeline(
        transformer=model.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config),
        vae=model.vae,
        text_encoder=first,
        tokenizer=model.family.tokenizers[0],
        text_encoder_2=second,
        tokenizer_2=model.family.tokenizers[1],
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    empty = model.encode_prompt([""], size=(64, 64))
    with torch.inference_mode():
        stock = pipe(
            prompt_embeds=empty.hidden_states,
            pooled_prompt_embeds=empty.added["pooled_projections"],
            latents=result.content_terminal.to(model.dtype),
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            height=64,
            width=64,
            output_type="latent",
        ).images
    if FULL_PRECISION:
        assert torch.equal(result.student, stock)
    else:  # the stock scheduler rounds its latents to the model dtype each step, the engine keeps float32
        torch.testing.assert_close(result.student, stock.float(), atol=0.1, rtol=0.05)


# -- flow matching -----------------------------------------------------------------------


def test_the_flow_step_is_bitwise_diffusers_flow_match_euler_step(tiny_sd3_engine: HamEngine) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_sd3_engine.model.scheduler.config)
    scheduler.set_timesteps(5)
    schedule = FlowSchedule.from_scheduler(tiny_sd3_engine.model.scheduler, 5, "cpu")
    assert torch.equal(schedule.timesteps, scheduler.timesteps) and torch.equal(schedule.sigmas, scheduler.sigmas)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn((1, 16, 4, 4), generator=generator)
    for k, t in enumerate(scheduler.timesteps):
        velocity = torch.randn((1, 16, 4, 4), generator=generator)
        expected = scheduler.step(velocity, t, sample, return_dict=False)[0]
        sample_next = schedule.step(velocity, sample, k)
        assert torch.equal(sample_next, expected)
        # The inverse step with the same velocity undoes it (up to rounding).
        torch.testing.assert_close(schedule.inverse_step(velocity, sample_next, k), sample, atol=1e-6, rtol=1e-6)
        sample = sample_next
    assert schedule.sigmas[0] == 1.0 and schedule.sigmas[-1] == 0.0


def _reconstruction_errors(model: FlowDiffusionModel, convention: str, scale: float, steps: tuple[int, ...]):
    """Invert a fixed latent, sample it back: mean |ẑ0 − z0| per step count (float32 on the CPU)."""
    denoiser = copy.deepcopy(model.unet).float().cpu()
    denoiser.transformer.proj_out.weight.mul_(scale)
    denoiser.transformer.proj_out.bias.mul_(scale)
    empty = model.encode_prompt([""], size=(64, 64))
    kwargs = {
        "encoder_hidden_states": empty.hidden_states.float().cpu(),
        "added_cond_kwargs": {k: v.float().cpu() for k, v in empty.added.items()},
    }

    def velocity(latents: torch.Tensor, _: int, timestep: torch.Tensor) -> torch.Tensor:
        return denoiser(latents, timestep.cpu(), **kwargs)[0]

    clean = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(5))
    errors = []
    with torch.inference_mode():
        for n in steps:
            schedule = FlowSchedule.from_scheduler(model.scheduler, n, "cpu")
            latents = schedule.invert(velocity, clean, convention=convention)[0]
            for k in range(n):
                latents = schedule.step(velocity(latents, k, schedule.timesteps[k]), latents, k)
            errors.append(float((latents - clean).abs().mean()))
    return errors


@pytest.mark.parametrize("convention", ["target", "source"])
@pytest.mark.parametrize("scale", [1.0, 0.1], ids=["as-built", "damped"])
def test_flow_inversion_reconstructs_with_an_error_falling_as_one_over_n(
    tiny_sd3_engine: HamEngine, convention: str, scale: float
) -> None:
    errors = _reconstruction_errors(tiny_sd3_engine.model, convention, scale, (5, 10, 20))
    # docs/method.md quotes the measured values (mean |z0| = 0.75): first order, halving with each doubling.
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.6 * errors[1] < 0.36 * errors[0], errors
    assert errors[0] < (0.06 if scale == 1.0 else 0.003), errors


def test_source_flow_inversion_calls_each_latent_at_its_own_timestep() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = FlowSchedule.from_scheduler(scheduler, 4, "cpu")
    calls: list[tuple[int, float]] = []

    def velocity(latents: torch.Tensor, k: int, timestep: torch.Tensor) -> torch.Tensor:
        calls.append((k, float(timestep)))
        return torch.ones_like(latents)

    trajectory = schedule.invert(velocity, torch.zeros((1, 1, 2, 2)), convention="source")
    assert calls == [(4, 0.0)] + [(k, float(schedule.timesteps[k])) for k in (3, 2, 1)]
    # A constant velocity: each entry is σ_k (the straight path from 0 to the noise).
    assert [round(float(z[0, 0, 0, 0]), 6) for z in trajectory] == [round(float(s), 6) for s in schedule.sigmas[:4]]


# -- HAM on the joint attention --------------------------------------------------------------


def test_joint_attention_layers_gar_on_every_image_attention_lat_on_the_joint_ones(
    tiny_sd3_engine: HamEngine,
) -> None:
    denoiser = tiny_sd3_engine.model.unet
    joint = [f"transformer_blocks.{i}.attn" for i in range(4)]
    assert attention_layers(denoiser, CROSS_ATTENTION) == joint
    assert attention_layers(denoiser, SELF_ATTENTION) == [
        "transformer_blocks.0.attn",
        "transformer_blocks.0.attn2",
        *joint[1:],
    ]


def test_a_lat_pattern_matching_only_an_image_attention_is_a_param_error(
    sd3: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    with pytest.raises(ParamError, match="lat_layers"):
        sd3.transfer(content_image, style=style_image, params=TransferParams(steps=2, size=64, lat_layers=("*.attn2",)))
    # The same pattern selects SD3.5's image-only attention for GAR.
    result = sd3.transfer_latents(
        content_image, style=style_image, params=TransferParams(steps=2, size=64, gar_layers=("*.attn2",), lat=False)
    )
    assert result.stats.unet_rows == 5 * 2


def test_gar_regulates_the_students_image_qkv_and_lat_transplants_the_text_stream(
    sd3: HamEngine, content_image: Image.Image
) -> None:
    events: list[AttentionEvent] = []
    params = TransferParams(steps=STEPS, size=64, alpha=0.75, beta=0.25)
    sd3.transfer_latents(content_image, style_prompt="an ink engraving", params=params, recorder=events.append)
    assert {(e.module, e.layer) for e in events} == {
        (m, f"transformer_blocks.{i}.attn") for m in ("gar", "lat") for i in (2, 3)
    }
    for event in events:
        layout = event.layout
        before, after = event.before, event.after
        teachers = [layout.row(b, h) for b in ("content_teacher", "style_teacher") for h in range(layout.halves)]
        for x, y in zip(before, after, strict=True):
            for row in teachers:  # the teachers' rows are never touched
                assert torch.equal(x[row], y[row])
        if event.module == "gar":
            assert before[0].shape[1] == 16  # the 4 x 4 image tokens
            assert not torch.equal(after[0][layout.row("student", 0)], before[0][layout.row("student", 0)])
        else:
            (q, k, v), (q_after, k_after, v_after) = before, after
            assert k.shape[1] == 77 + 256  # the text stream's keys
            for half in range(layout.halves):
                student, style = layout.row("student", half), layout.row("style_teacher", half)
                content = layout.row("content_teacher", half)
                assert torch.equal(k_after[student], k[style]) and torch.equal(v_after[student], v[style])
                expected = torch.lerp(q[content].float(), q[student].float(), 0.25).to(q.dtype)
                assert torch.equal(q_after[student], expected)


def _rows(result) -> tuple[int, int]:
    phases = result.stats.unet_rows_by_phase
    return phases["invert"], phases["sample"]


def test_image_text_and_captioned_image_styles_run_the_rows_the_docs_state(
    sd3: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    n = STEPS
    cold = sd3.transfer(content_image, style=style_image, params=SMALL)
    assert _rows(cold) == (2 * n, 3 * n) and cold.stats.family == "sd3" and cold.stats.mode == "image"
    warm = sd3.transfer(content_image, style=style_image, params=SMALL)
    assert _rows(warm) == (0, 2 * n) and warm.stats.style_cache_tier == "memory"
    assert _max_diff(cold.image, warm.image) <= 1  # warm == cold within 1/255
    text = sd3.transfer(content_image, style_prompt="an ink engraving", params=SMALL)
    assert _rows(text) == (0, 5 * n) and text.stats.cfg and text.stats.mode == "text"
    captioned = sd3.transfer(content_image, style=_image("style1.png"), style_prompt="an oil painting", params=SMALL)
    assert _rows(captioned) == (n, 3 * n) and captioned.stats.mode == "image+text"
    fresh = HamEngine(sd3.model).transfer(content_image, style_prompt="an ink engraving", params=SMALL)
    assert _rows(fresh) == (n, 5 * n)
    assert _max_diff(fresh.image, text.image) <= 1
    images = [cold.image, text.image, captioned.image]
    assert all(image.size == (64, 64) for image in images)
    assert min(_max_diff(a, b) for i, a in enumerate(images) for b in images[i + 1 :]) > 4


def test_a_k_style_batch_equals_k_single_transfers(sd3: HamEngine, content_image: Image.Image) -> None:
    styles = [_image("style0.png"), "a watercolour", Style(image=_image("style2.png"), prompt="an oil painting")]
    batch = sd3.transfer_batch(content_image, styles, params=SMALL)
    # Content teacher once; the image style 2 rows, the CFG text style 4, the captioned style 2 (as the UNet families).
    assert batch.stats.unet_rows_by_phase == {"invert": 3 * STEPS, "sample": 9 * STEPS}
    singles = [
        HamEngine(sd3.model).transfer(content_image, style=styles[0], params=SMALL),
        HamEngine(sd3.model).transfer(content_image, style_prompt="a watercolour", params=SMALL),
        HamEngine(sd3.model).transfer(
            content_image, style=styles[2].image, style_prompt="an oil painting", params=SMALL
        ),
    ]
    for image, single in zip(batch.images, singles, strict=True):
        assert _max_diff(image, single.image) <= PIXEL_BOUND


def test_teachers_recorded_during_a_source_inversion_give_the_live_latents_in_3n_plus_2_rows(
    sd3: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    live_params = TransferParams(steps=4, size=64, inversion="source", teachers="live")
    live = HamEngine(sd3.model).transfer_latents(content_image, style=style_image, params=live_params)
    recorded = HamEngine(sd3.model).transfer_latents(
        content_image, style=style_image, params=TransferParams(steps=4, size=64, inversion="source")
    )
    assert live.stats.unet_rows == 5 * 4 and recorded.stats.unet_rows == 3 * 4 + 2
    assert recorded.stats.teachers == {"content_teacher": "recorded", "style_teacher": "recorded"}
    assert recorded.stats.record_bytes > 0
    close = tolerance({"atol": 1e-4, "rtol": 0.0}, {"atol": 0.1, "rtol": 0.05})
    torch.testing.assert_close(recorded.student, live.student, **close)


def test_a_fresh_engine_on_the_same_feature_store_is_warm_for_sd3(
    tiny_sd3_engine: HamEngine, content_image: Image.Image, style_image: Image.Image, tmp_path: Path
) -> None:
    store = DirectoryFeatureStore(tmp_path / "store")
    cold = HamEngine(tiny_sd3_engine.model, feature_store=store).transfer(
        content_image, style=style_image, params=SMALL
    )
    warm = HamEngine(tiny_sd3_engine.model, feature_store=store).transfer(
        content_image, style=style_image, params=SMALL
    )
    assert (warm.stats.style_cache_tier, warm.stats.content_cache_tier) == ("store", "store")
    assert warm.stats.unet_rows == 2 * STEPS
    assert _max_diff(warm.image, cold.image) <= 1


def test_a_pipeline_folder_with_another_transformer_is_refused_by_name(
    tiny_sd3_engine: HamEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HAM_TINY_DIR", str(tmp_path / "tiny"))
    folder = tmp_path / "odd"
    shutil.copytree(tiny.ensure_preset("tiny-sd3"), folder)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "SD3ControlNetModel"
    config_path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="SD3ControlNetModel"):
        load_model(str(folder), device="cpu")
