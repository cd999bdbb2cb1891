"""The FLUX.1 family (tiny-flux): double- and single-stream attention, packed latents, HAM end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from PIL import Image

from ham_engine import TransferParams
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
from ham_engine.families.flux import pack, unpack
from ham_engine.feature_store import DirectoryFeatureStore
from ham_engine.flow import FlowSchedule
from ham_engine.flux_attention import HookedFluxProcessor
from tests.engine.conftest import DATA, FULL_PRECISION, _load_engine, tolerance

STEPS = 3
SMALL = TransferParams(steps=STEPS, size=64)
OFF = TransferParams(steps=STEPS, size=64, sini=False, gar=False, lat=False)
PIXEL_BOUND = 2  # as tests/engine/test_batch.py: a student batched with K styles vs alone
DOUBLE = [f"transformer_blocks.{i}.attn" for i in range(2)]
SINGLE = [f"single_transformer_blocks.{i}.attn" for i in range(4)]


@pytest.fixture(scope="session")
def tiny_flux_engine(tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    return _load_engine("tiny-flux", tmp_path_factory)


@pytest.fixture
def flux(tiny_flux_engine: HamEngine) -> HamEngine:
    """The shared tiny-flux model behind a fresh engine (empty caches)."""
    return HamEngine(tiny_flux_engine.model)


def _image(name: str) -> Image.Image:
    with Image.open(DATA / name) as image:
        return image.convert("RGB")


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_tiny_flux_is_a_flux_pipeline_with_clip_pooled_t5_tokens_and_guidance(tiny_flux_engine: HamEngine) -> None:
    model = tiny_flux_engine.model
    assert isinstance(model, FlowDiffusionModel)
    assert (model.family.name, model.prediction_type, model.family.classifier_free_guidance) == ("flux", "flow", False)
    assert type(model.transformer).__name__ == "FluxTransformer2DModel" and model.transformer.config.guidance_embeds
    assert (model.transformer.config.in_channels, model.unet.config.in_channels) == (64, 16)  # packed 2 x 2
    assert model.family.default_layers == ("single_transformer_blocks.2.attn", "single_transformer_blocks.3.attn")
    text = model.encode_prompt(["", "an oil painting"], size=(64, 64))
    assert text.shape == (2, 512, 32) and text.added["pooled_projections"].shape == (2, 16)
    assert not torch.equal(text.hidden_states[0], text.hidden_states[1])
    assert (
        attention_layers(model.unet, SELF_ATTENTION)
        == attention_layers(model.unet, CROSS_ATTENTION)
        == [
            *DOUBLE,
            *SINGLE,
        ]
    )


def test_packing_is_the_pipelines_and_round_trips() -> None:
    latents = torch.randn((2, 16, 8, 6), generator=torch.Generator().manual_seed(0))
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack(packed, 8, 6), latents)


class _Identity(HookedFluxProcessor):
    def hook(self, attn, hidden_states, image, text):
        return image, text


def _call(model: FlowDiffusionModel, rows: int = 3) -> dict[str, torch.Tensor]:
    text = model.encode_prompt(["", "a", "b"][:rows], size=(64, 64))
    return {
        "sample": torch.randn((rows, 16, 8, 8), generator=torch.Generator().manual_seed(0)).to(
            model.device, model.dtype
        ),
        "timestep": torch.tensor(700.0, device=model.device),
        **text.unet_kwargs(),
    }


def test_the_hooked_flux_processor_is_bitwise_stock_on_double_and_single_blocks(tiny_flux_engine: HamEngine) -> None:
    model = tiny_flux_engine.model
    inputs = _call(model)
    with torch.inference_mode():
        stock = model.unet(**inputs)[0]
        model.transformer.set_attn_processor(_Identity(lambda: model.unet.text_tokens))
        try:
            hooked = model.unet(**inputs)[0]
        finally:
            model.transformer.set_attn_processor(FluxAttnProcessor())
    assert torch.equal(hooked, stock)


def test_an_unmodulated_ham_processor_is_stock_and_a_modulated_one_changes_only_the_student(
    tiny_flux_engine: HamEngine,
) -> None:
    model = tiny_flux_engine.model
    inputs = _call(model)
    layers = (DOUBLE[1], SINGLE[3])
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
    assert {type(p) for p in model.transformer.attn_processors.values()} == {FluxAttnProcessor}


def test_all_modulation_off_is_bitwise_the_stock_flux_pipeline_from_the_same_inverted_latent(
    flux: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    result = flux.transfer_latents(content_image, style=style_image, params=OFF)
    model = flux.model
    clip, t5 = model.family.text_encoders
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config),
        vae=model.vae,
        text_encoder=clip,
        tokenizer=model.family.tokenizers[0],
        text_encoder_2=t5,
        tokenizer_2=model.family.tokenizers[1],
        transformer=model.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    empty = model.encode_prompt([""], size=(64, 64))
    with torch.inference_mode():
        stock = pipe(
            prompt_embeds=empty.hidden_states,
            pooled_prompt_embeds=empty.added["pooled_projections"],
            latents=pack(result.content_terminal.to(model.dtype)),
            num_inference_steps=STEPS,
            guidance_scale=model.unet.guidance,
            height=64,
            width=64,
            output_type="latent",
        ).images
    stock = unpack(stock, 8, 8)
    if FULL_PRECISION:
        assert torch.equal(result.student, stock)
    else:  # the stock scheduler rounds its latents to the model dtype each step, the engine keeps float32
        torch.testing.assert_close(result.student, stock.float(), atol=0.1, rtol=0.05)


def test_flux_schedule_is_the_pipelines_dynamically_shifted_one(tiny_flux_engine: HamEngine) -> None:
    model = tiny_flux_engine.model
    small, large = model.schedule(10, (64, 64)), model.schedule(10, (1024, 1024))
    assert small.sigmas[0] == large.sigmas[0] == 1.0
    # More image tokens shift the schedule towards noise (FLUX's mu grows with the token count).
    assert bool((large.sigmas[1:-1] > small.sigmas[1:-1]).all())


def _reconstruction_errors(model: FlowDiffusionModel, convention: str, scale: float, steps: tuple[int, ...]):
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
            schedule = FlowSchedule.from_scheduler(
                model.scheduler, n, "cpu", image_seq_len=16, sigmas=denoiser.flow_sigmas(n)
            )
            latents = schedule.invert(velocity, clean, convention=convention)[0]
            for k in range(n):
                latents = schedule.step(velocity(latents, k, schedule.timesteps[k]), latents, k)
            errors.append(float((latents - clean).abs().mean()))
    return errors


@pytest.mark.parametrize("convention", ["target", "source"])
@pytest.mark.parametrize("scale", [1.0, 0.1], ids=["as-built", "damped"])
def test_flux_inversion_reconstructs_with_an_error_falling_with_the_steps(
    tiny_flux_engine: HamEngine, convention: str, scale: float
) -> None:
    errors = _reconstruction_errors(tiny_flux_engine.model, convention, scale, (5, 10, 20))
    # docs/method.md quotes the measured values: first order.
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.7 * errors[0], errors


def test_gar_acts_on_image_tokens_and_lat_on_text_tokens_of_single_stream_blocks(
    flux: HamEngine, content_image: Image.Image
) -> None:
    events: list[AttentionEvent] = []
    params = TransferParams(steps=STEPS, size=64, gar_layers=(DOUBLE[1], SINGLE[3]), lat_layers=(DOUBLE[1], SINGLE[3]))
    flux.transfer_latents(content_image, style_prompt="an ink engraving", params=params, recorder=events.append)
    assert {(e.module, e.layer) for e in events} == {(m, layer) for m in ("gar", "lat") for layer in params.gar_layers}
    for event in events:
        layout, (q, k, v), (q_after, k_after, v_after) = event.layout, event.before, event.after
        if event.module == "gar":
            assert q.shape[1] == 16  # the 4 x 4 packed image tokens
        else:
            assert k.shape[1] == 512  # T5's tokens
            student, style, content = (layout.row(b, 0) for b in ("student", "style_teacher", "content_teacher"))
            assert torch.equal(k_after[student], k[style]) and torch.equal(v_after[student], v[style])
            expected = torch.lerp(q[content].float(), q[student].float(), params.beta).to(q.dtype)
            assert torch.equal(q_after[student], expected)


def _rows(result) -> tuple[int, int]:
    phases = result.stats.unet_rows_by_phase
    return phases["invert"], phases["sample"]


def test_image_text_and_captioned_styles_run_the_rows_the_docs_state_without_cfg_rows(
    flux: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    n = STEPS
    cold = flux.transfer(content_image, style=style_image, params=SMALL)
    warm = flux.transfer(content_image, style=style_image, params=SMALL)
    assert _rows(cold) == (2 * n, 3 * n) and _rows(warm) == (0, 2 * n)
    assert _max_diff(cold.image, warm.image) <= 1
    # FLUX's guidance is distilled into its embedding: a text style teacher runs without CFG halves.
    text = flux.transfer(content_image, style_prompt="an ink engraving", params=SMALL)
    assert _rows(text) == (0, 3 * n) and not text.stats.cfg and text.stats.mode == "text"
    captioned = flux.transfer(content_image, style=_image("style1.png"), style_prompt="an oil painting", params=SMALL)
    assert _rows(captioned) == (n, 3 * n) and captioned.stats.family == "flux"
    images = [cold.image, text.image, captioned.image]
    assert min(_max_diff(a, b) for i, a in enumerate(images) for b in images[i + 1 :]) > 4


def test_a_k_style_batch_equals_k_single_transfers(flux: HamEngine, content_image: Image.Image) -> None:
    styles = [_image("style0.png"), "a watercolour", Style(image=_image("style2.png"), prompt="an oil painting")]
    batch = flux.transfer_batch(content_image, styles, params=SMALL)
    assert batch.stats.unet_rows_by_phase == {"invert": 3 * STEPS, "sample": 7 * STEPS}
    singles = [
        HamEngine(flux.model).transfer(content_image, style=styles[0], params=SMALL),
        HamEngine(flux.model).transfer(content_image, style_prompt="a watercolour", params=SMALL),
        HamEngine(flux.model).transfer(
            content_image, style=styles[2].image, style_prompt="an oil painting", params=SMALL
        ),
    ]
    for image, single in zip(batch.images, singles, strict=True):
        assert _max_diff(image, single.image) <= PIXEL_BOUND


def test_recorded_teachers_give_the_live_latents_in_3n_plus_2_rows(
    flux: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    live = HamEngine(flux.model).transfer_latents(
        content_image, style=style_image, params=TransferParams(steps=4, size=64, inversion="source", teachers="live")
    )
    recorded = HamEngine(flux.model).transfer_latents(
        content_image, style=style_image, params=TransferParams(steps=4, size=64, inversion="source")
    )
    assert live.stats.unet_rows == 5 * 4 and recorded.stats.unet_rows == 3 * 4 + 2
    assert recorded.stats.teachers == {"content_teacher": "recorded", "style_teacher": "recorded"}
    close = tolerance({"atol": 1e-4, "rtol": 0.0}, {"atol": 0.1, "rtol": 0.05})
    torch.testing.assert_close(recorded.student, live.student, **close)


def test_a_fresh_engine_on_the_same_feature_store_is_warm_for_flux(
    tiny_flux_engine: HamEngine, content_image: Image.Image, style_image: Image.Image, tmp_path: Path
) -> None:
    store = DirectoryFeatureStore(tmp_path / "store")
    model = tiny_flux_engine.model
    cold = HamEngine(model, feature_store=store).transfer(content_image, style=style_image, params=SMALL)
    warm = HamEngine(model, feature_store=store).transfer(content_image, style=style_image, params=SMALL)
    assert (warm.stats.style_cache_tier, warm.stats.content_cache_tier) == ("store", "store")
    assert warm.stats.unet_rows == 2 * STEPS
    assert _max_diff(warm.image, cold.image) <= 1
