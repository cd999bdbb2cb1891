"""HamEngine.transfer end to end on the tiny models (CPU, 64 px, a few steps)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from ham_engine import ParamError, TransferParams
from ham_engine.attention import AttentionEvent
from ham_engine.engine import HamEngine, TransferCancelled
from tests.engine.conftest import tolerance

STEPS = 4
SMALL = TransferParams(steps=STEPS, size=64)
OFF = TransferParams(steps=STEPS, size=64, sini=False, gar=False, lat=False)


def _params(**changes) -> TransferParams:
    return TransferParams(**{**SMALL.to_dict(), **changes})


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _stats(x: torch.Tensor, dim) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=dim, keepdim=True)
    return mean, ((x - mean) ** 2).mean(dim=dim, keepdim=True).sqrt()


def _adain(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    (content_mean, content_std), (style_mean, style_std) = _stats(content, -2), _stats(style, -2)
    return style_std * (content - content_mean) / content_std + style_mean


# Rows batched together differ from rows run alone by float rounding (~1e-6 per UNet call
# here); the random tiny UNet amplifies that through inversion and sampling to ~1e-3 on
# latents of magnitude ~4. Paths that batch differently are compared at this tolerance;
# the attention-level tests pin the maths at the same batch bit for bit.
BATCH_NOISE = {"atol": 3e-3, "rtol": 1e-3}
# GAR/LAT arithmetic on the recorded projections: float32 rounding, or two bf16 ulps
# (a blend with the wrong weights or statistics is off by O(1)).
PROJECTIONS = tolerance({"atol": 1e-5, "rtol": 1e-5}, {"atol": 2e-2, "rtol": 2e-2})


def _stock_processors(engine: HamEngine) -> bool:
    return all(type(p) is AttnProcessor2_0 for p in engine.model.unet.attn_processors.values())


# -- the method ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_engine", "tiny_v_engine"])
def test_all_modulation_off_matches_a_plain_diffusers_ddim_regeneration(
    which: str, request: pytest.FixtureRequest, content_image: Image.Image, style_image: Image.Image
) -> None:
    engine: HamEngine = request.getfixturevalue(which)
    result = engine.transfer_latents(content_image, style=style_image, params=OFF)
    model = engine.model
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(STEPS)
    with torch.inference_mode():
        text = model.encode_prompt([""])
        latents = result.content_terminal
        for t in scheduler.timesteps:
            # As the engine: the UNet in the model dtype, the DDIM arithmetic in float32.
            output = model.unet(latents.to(model.dtype), t, **text.unet_kwargs()).sample.float()
            latents = scheduler.step(output, t, latents).prev_sample
    assert torch.equal(result.student, latents)
    # Nothing reads the style: it is neither inverted nor sampled.
    assert result.stats.unet_rows == 2 * STEPS
    assert result.stats.style_cache_hit is None


def test_sini_with_gamma_one_starts_the_student_from_the_content_latent(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    result = engine.transfer_latents(content_image, style=style_image, params=_params(gamma=1.0))
    assert torch.equal(result.student_terminal, result.content_terminal)


def test_sini_student_start_has_gamma_interpolated_statistics(engine: HamEngine, content_image: Image.Image) -> None:
    params = _params(gamma=0.3, seed=11, gar=False, lat=False)
    result = engine.transfer_latents(content_image, style_prompt="an ink engraving", params=params)
    # A text style teacher starts from seeded noise: that is z_T^s.
    # Drawn on a CPU generator whatever the device (HAM_TEST_DEVICE): a seed is one z_T^s everywhere.
    noise = torch.randn(result.content_terminal.shape, generator=torch.Generator().manual_seed(11))
    content, student = result.content_terminal.cpu(), result.student_terminal.cpu()
    (c_mean, c_std), (s_mean, s_std) = _stats(content, (2, 3)), _stats(noise, (2, 3))
    m_mean, m_std = _stats(student, (2, 3))
    torch.testing.assert_close(m_mean, 0.3 * c_mean + 0.7 * s_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m_std, 0.3 * c_std + 0.7 * s_std, atol=1e-5, rtol=1e-5)


def test_gar_with_alpha_one_and_lat_off_matches_the_unmodulated_transfer(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    gar_only = _params(sini=False, lat=False, alpha=1.0)
    modulated = engine.transfer_latents(content_image, style=style_image, params=gar_only)
    plain = engine.transfer_latents(content_image, style=style_image, params=OFF)
    assert modulated.stats.unet_rows_by_phase["sample"] == 3 * STEPS  # the teachers did run
    torch.testing.assert_close(modulated.student, plain.student, **BATCH_NOISE)


def test_gar_gives_the_student_alpha_own_plus_adain_of_the_teachers_at_every_step(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    events: list[AttentionEvent] = []
    params = _params(lat=False, alpha=0.6)
    engine.transfer_latents(content_image, style=style_image, params=params, recorder=events.append)
    layers = [n for n, _ in engine.model.unet.named_modules() if n.startswith("up_blocks.") and n.endswith("attn1")]
    assert sorted({(e.step, e.layer) for e in events}) == sorted((k, n) for k in range(STEPS) for n in layers)
    for event in events:
        assert event.layout.branches == ("content_teacher", "style_teacher", "student")
        for before, after in zip(event.before, event.after, strict=True):
            content, style, student = before
            torch.testing.assert_close(after[2], 0.6 * student + 0.4 * _adain(content, style), **PROJECTIONS)
            assert torch.equal(after[:2], before[:2])


def test_lat_gives_the_student_the_style_teachers_keys_and_values_and_a_blended_query(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    events: list[AttentionEvent] = []
    params = _params(gar=False, beta=0.25)
    engine.transfer_latents(
        content_image, style=style_image, style_prompt="an oil painting", params=params, recorder=events.append
    )
    assert events and all(e.module == "lat" and e.layer.endswith("attn2") for e in events)
    for event in events:
        (q, k, v), (q_after, k_after, v_after) = event.before, event.after
        # The student's own (empty-prompt) keys differ from the prompted style teacher's.
        assert not torch.equal(k[2], k[1])
        assert torch.equal(k_after[2], k[1]) and torch.equal(v_after[2], v[1])
        torch.testing.assert_close(q_after[2], 0.25 * q[2] + 0.75 * q[0], **PROJECTIONS)


def test_gar_and_lat_act_only_on_the_selected_layers_inside_the_step_window(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    events: list[AttentionEvent] = []
    params = _params(gar_layers=["up_blocks.1.*"], lat_layers=["mid_block.*"], step_end=0.5)
    engine.transfer_latents(content_image, style=style_image, params=params, recorder=events.append)
    gar = {(e.step, e.layer) for e in events if e.module == "gar"}
    lat = {(e.step, e.layer) for e in events if e.module == "lat"}
    up1 = [n for n, _ in engine.model.unet.named_modules() if n.startswith("up_blocks.1.") and n.endswith(".attn1")]
    assert gar == {(k, n) for k in (0, 1) for n in up1}
    assert lat == {(k, "mid_block.attentions.0.transformer_blocks.0.attn2") for k in (0, 1)}


def test_step_window_leaves_the_teachers_out_of_steps_outside_it(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    params = _params(step_start=0.5)
    result = engine.transfer(content_image, style=style_image, params=params)
    # Steps 0-1: the student alone; steps 2-3: content, style and student.
    assert result.stats.unet_rows_by_phase["sample"] == 2 * 1 + 2 * 3


def test_v_prediction_model_runs_the_full_method(tiny_v_engine: HamEngine, content_image: Image.Image) -> None:
    engine = HamEngine(tiny_v_engine.model)
    latents = engine.transfer_latents(content_image, style_prompt="a watercolour", params=SMALL)
    # Finite where it can still fail (uint8 pixels cannot hold a NaN), and not a constant picture.
    assert torch.isfinite(latents.student).all() and latents.student.std() > 0.05
    result = engine.transfer(content_image, style_prompt="a watercolour", params=SMALL)
    assert result.image.size == (64, 64) and result.image.mode == "RGB"
    assert _pixels(result.image).std() > 1.0


# -- guidance modes ----------------------------------------------------------------------


def test_text_guided_transfer_samples_the_style_teacher_with_cfg(engine: HamEngine, content_image: Image.Image) -> None:
    result = engine.transfer(content_image, style_prompt="an ink engraving", params=SMALL)
    assert result.image.size == (64, 64) and result.image.mode == "RGB"
    stats = result.stats
    assert (stats.mode, stats.cfg, stats.style_cache_hit) == ("text", True, None)
    # Inversion: the content alone. Sampling: [uncond | cond] x (style, student) and the
    # content teacher once for both halves.
    assert stats.unet_rows_by_phase == {"invert": STEPS, "sample": 5 * STEPS}
    assert stats.unet_calls == 2 * STEPS
    assert len(engine.style_cache) == 0


def test_text_guided_cfg_runs_rows_whose_halves_are_identical_once(
    engine: HamEngine, content_image: Image.Image
) -> None:
    def sample_rows(params: TransferParams) -> int:
        result = engine.transfer_latents(content_image, style_prompt="an ink engraving", params=params)
        assert result.stats.cfg is True
        return result.stats.unet_rows_by_phase["sample"]

    # A modulated step: content teacher once, style teacher and student in each half.
    assert sample_rows(SMALL) == 5 * STEPS
    # Steps 0-1 outside the window while the style teacher runs: style teacher x2, student once.
    assert sample_rows(_params(step_start=0.5)) == 2 * 3 + 2 * 5
    # Steps 2-3 after the window: the style teacher is done, the student runs alone.
    assert sample_rows(_params(step_end=0.5)) == 2 * 5 + 2 * 1


def test_text_guided_cfg_modulates_each_half_with_the_shared_content_teacher_row(
    engine: HamEngine, content_image: Image.Image
) -> None:
    events: list[AttentionEvent] = []
    params = _params(alpha=0.6, beta=0.25)
    engine.transfer_latents(content_image, style_prompt="an ink engraving", params=params, recorder=events.append)
    assert {e.module for e in events} == {"gar", "lat"}
    for event in events:
        layout = event.layout
        assert layout.rows == (
            ("content_teacher", 0),
            ("style_teacher", 0),
            ("student", 0),
            ("style_teacher", 1),
            ("student", 1),
        )
        (q, k, v), (q_after, k_after, v_after) = event.before, event.after
        for half in (0, 1):
            content, style, student = (layout.row(b, half) for b in layout.branches)
            if event.module == "gar":
                want = 0.6 * q[student] + 0.4 * _adain(q[content], q[style])
                torch.testing.assert_close(q_after[student], want, **PROJECTIONS)
            else:
                torch.testing.assert_close(q_after[student], 0.25 * q[student] + 0.75 * q[content], **PROJECTIONS)
                assert torch.equal(k_after[student], k[style]) and torch.equal(v_after[student], v[style])
        # The prompted cond half and the empty uncond half give the student different keys.
        if event.module == "lat":
            assert not torch.equal(k_after[layout.row("student", 0)], k_after[layout.row("student", 1)])


def test_text_guided_transfer_without_guidance_uses_one_half(engine: HamEngine, content_image: Image.Image) -> None:
    result = engine.transfer(content_image, style_prompt="an ink engraving", params=_params(guidance=1.0))
    assert result.stats.cfg is False
    assert result.stats.unet_rows_by_phase["sample"] == 3 * STEPS


def test_guide_student_switches_cfg_on_the_student_only_under_cfg(
    engine: HamEngine, content_image: Image.Image
) -> None:
    def student(**overrides: object) -> torch.Tensor:
        params = _params(**overrides)
        return engine.transfer_latents(content_image, style_prompt="an ink engraving", params=params).student

    # Under CFG the switch matters; without CFG there is one half and nothing to guide.
    assert not torch.equal(student(guide_student=True), student(guide_student=False))
    assert torch.equal(student(guidance=1.0, guide_student=True), student(guidance=1.0, guide_student=False))


def test_image_and_prompt_transfer_conditions_the_style_teacher_on_the_prompt(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    with_prompt = engine.transfer(content_image, style=style_image, style_prompt="an oil painting", params=SMALL)
    without = engine.transfer(content_image, style=style_image, params=SMALL)
    assert with_prompt.stats.mode == "image+text" and with_prompt.stats.cfg is False
    assert with_prompt.stats.unet_rows_by_phase == {"invert": 2 * STEPS, "sample": 3 * STEPS}
    assert not np.array_equal(_pixels(with_prompt.image), _pixels(without.image))


# -- the style cache ---------------------------------------------------------------------


def test_repeat_style_hits_the_cache_with_fewer_rows_and_the_same_image(
    tiny_engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    engine = HamEngine(tiny_engine.model, content_cache_bytes=0)  # the style cache alone
    cold = engine.transfer_latents(content_image, style=style_image, params=SMALL)
    warm = engine.transfer_latents(content_image, style=style_image, params=SMALL)
    assert (cold.stats.style_cache_hit, warm.stats.style_cache_hit) == (False, True)
    assert (warm.stats.style_cache_tier, warm.stats.content_cache_hit) == ("memory", False)
    assert cold.stats.unet_rows_by_phase == {"invert": 2 * STEPS, "sample": 3 * STEPS}
    assert warm.stats.unet_rows_by_phase == {"invert": STEPS, "sample": 2 * STEPS}
    assert cold.stats.unet_calls == warm.stats.unet_calls == 2 * STEPS
    torch.testing.assert_close(warm.student, cold.student, **BATCH_NOISE)
    cold_pixels = engine.model.decode_latents(cold.student)
    warm_pixels = engine.model.decode_latents(warm.student)
    torch.testing.assert_close(warm_pixels, cold_pixels, **BATCH_NOISE)
    # ... while another style, or no GAR/LAT at all, is far from it.
    plain = engine.transfer_latents(content_image, style=style_image, params=OFF)
    assert (plain.student - cold.student).abs().max() > 100 * BATCH_NOISE["atol"]


def test_repeat_content_and_style_skip_the_inversion_too(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    cold = engine.transfer_latents(content_image, style=style_image, params=SMALL)
    warm = engine.transfer_latents(content_image, style=style_image, params=SMALL)
    assert (cold.stats.content_cache_hit, cold.stats.content_cache_tier) == (False, None)
    assert (warm.stats.content_cache_hit, warm.stats.content_cache_tier) == (True, "memory")
    assert warm.stats.unet_rows_by_phase == {"invert": 0, "sample": 2 * STEPS}
    assert warm.stats.unet_calls == STEPS
    torch.testing.assert_close(warm.content_terminal, cold.content_terminal, rtol=0, atol=0)
    torch.testing.assert_close(warm.student, cold.student, **BATCH_NOISE)
    # A warm content with a new style inverts the style alone: 4N rows.
    flipped = style_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    half = engine.transfer_latents(content_image, style=flipped, params=SMALL)
    assert (half.stats.content_cache_hit, half.stats.style_cache_hit) == (True, False)
    assert half.stats.unet_rows_by_phase == {"invert": STEPS, "sample": 3 * STEPS}
    # The content entry depends on the size and the steps, not on the style or α.
    assert not engine.transfer(content_image, style=style_image, params=_params(size=128)).stats.content_cache_hit
    assert not engine.transfer(content_image, style=style_image, params=_params(steps=3)).stats.content_cache_hit
    assert engine.transfer(content_image, style_prompt="ink", params=_params(alpha=0.1)).stats.content_cache_hit


def test_progress_counts_only_the_sampling_when_nothing_is_inverted(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    engine.transfer(content_image, style=style_image, params=SMALL)
    calls: list[tuple[int, int]] = []
    engine.transfer(content_image, style=style_image, params=SMALL, progress=lambda s, t: calls.append((s, t)))
    assert calls == [(s, STEPS) for s in range(1, STEPS + 1)]


def test_cache_entry_depends_on_size_prompt_and_layers(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    engine.transfer(content_image, style=style_image, params=SMALL)
    variants = [
        {"params": _params(size=128)},
        {"params": SMALL, "style_prompt": "an oil painting"},
        {"params": _params(lat=False)},
        {"params": _params(step_end=0.5)},
    ]
    for variant in variants:
        result = engine.transfer(content_image, style=style_image, **variant)
        assert result.stats.style_cache_hit is False, variant
    # The content, α, β, γ and the seed do not change what the style teacher gives.
    other = _params(alpha=0.5, beta=0.5, gamma=0.9, seed=3)
    assert engine.transfer(content_image.rotate(90), style=style_image, params=other).stats.style_cache_hit


def test_style_cache_respects_its_byte_limit_and_evicts_the_least_recently_used(
    tiny_engine: HamEngine, content_image: Image.Image, style_image: Image.Image, other_style_image: Image.Image
) -> None:
    probe = HamEngine(tiny_engine.model)
    probe.transfer(content_image, style=style_image, params=SMALL)
    entry = probe.style_cache.nbytes
    assert entry > 0

    engine = HamEngine(tiny_engine.model, style_cache_bytes=entry * 3 // 2)  # room for one entry
    engine.transfer(content_image, style=style_image, params=SMALL)
    engine.transfer(content_image, style=other_style_image, params=SMALL)
    assert len(engine.style_cache) == 1 and engine.style_cache.nbytes <= engine.style_cache.max_bytes
    assert engine.transfer(content_image, style=other_style_image, params=SMALL).stats.style_cache_hit
    assert not engine.transfer(content_image, style=style_image, params=SMALL).stats.style_cache_hit

    too_small = HamEngine(tiny_engine.model, style_cache_bytes=entry - 1)
    too_small.transfer(content_image, style=style_image, params=SMALL)
    assert len(too_small.style_cache) == 0
    assert not too_small.transfer(content_image, style=style_image, params=SMALL).stats.style_cache_hit


# -- progress, cancellation, errors, determinism ----------------------------------------------


def test_progress_reports_every_inversion_and_sampling_step(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    calls: list[tuple[int, int]] = []
    engine.transfer(content_image, style=style_image, params=SMALL, progress=lambda s, t: calls.append((s, t)))
    assert calls == [(s, 2 * STEPS) for s in range(1, 2 * STEPS + 1)]


@pytest.mark.parametrize("stop_after", [1, STEPS + 2])  # during the inversion, during the sampling
def test_cancellation_raises_between_steps_and_leaves_the_engine_usable(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image, stop_after: int
) -> None:
    steps: list[int] = []
    with pytest.raises(TransferCancelled):
        engine.transfer(
            content_image,
            style=style_image,
            params=SMALL,
            progress=lambda s, t: steps.append(s),
            cancelled=lambda: len(steps) >= stop_after,
        )
    assert steps == list(range(1, stop_after + 1))
    assert _stock_processors(engine)
    assert len(engine.style_cache) == 0  # a half-recorded style is never cached
    assert engine.transfer(content_image, style=style_image, params=SMALL).image.size == (64, 64)


def test_a_failure_inside_sampling_restores_the_processors_and_leaves_the_engine_usable(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    def progress(step: int, total: int) -> None:
        if step == STEPS + 2:
            raise RuntimeError("the worker lost its storage")

    with pytest.raises(RuntimeError, match="storage"):
        engine.transfer(content_image, style=style_image, params=SMALL, progress=progress)
    assert _stock_processors(engine)
    assert len(engine.style_cache) == 0
    assert engine.transfer(content_image, style=style_image, params=SMALL).stats.style_cache_hit is False


@pytest.mark.parametrize(("size", "expected"), [((1, 1), (128, 128)), ((4000, 10), (128, 64)), ((10, 4000), (64, 128))])
def test_one_pixel_and_extreme_aspect_images_give_sides_of_at_least_64(
    engine: HamEngine, style_image: Image.Image, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    content = Image.new("RGB", size, (200, 30, 30))
    result = engine.transfer(content, style=style_image, params=_params(steps=1, size=128))
    assert result.image.size == expected


@pytest.mark.parametrize("field", ["gar_layers", "lat_layers"])
def test_layer_pattern_matching_nothing_is_a_value_error_naming_the_field(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image, field: str
) -> None:
    with pytest.raises(ValueError, match=field) as info:
        engine.transfer(content_image, style=style_image, params=_params(**{field: ["encoder.*"]}))
    assert isinstance(info.value, ParamError) and info.value.field == field


def test_missing_style_and_prompt_is_a_value_error_naming_the_style(
    engine: HamEngine, content_image: Image.Image
) -> None:
    with pytest.raises(ValueError, match="style"):
        engine.transfer(content_image, style_prompt="   ", params=SMALL)


@pytest.mark.parametrize(
    ("content", "style", "field"),
    [
        ("not an image", None, "content"),
        (Image.new("RGB", (0, 0)), None, "content"),
        (None, "not an image", "style"),
    ],
)
def test_unusable_images_are_value_errors_naming_the_field(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image, content, style, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        engine.transfer(content if content is not None else content_image, style=style or style_image, params=SMALL)


def test_non_rgb_images_are_converted(engine: HamEngine, content_image: Image.Image, style_image: Image.Image) -> None:
    result = engine.transfer(content_image.convert("RGBA"), style=style_image.convert("P"), params=SMALL)
    assert result.image.mode == "RGB" and result.image.size == (64, 64)
    grey = engine.transfer(content_image.convert("L"), style=style_image.convert("LA"), params=SMALL)
    assert grey.image.mode == "RGB"


def test_output_keeps_the_content_aspect_ratio(engine: HamEngine, content_image: Image.Image) -> None:
    wide = content_image.resize((128, 64))
    result = engine.transfer(wide, style_prompt="a mosaic", params=_params(size=128))
    assert result.image.size == (128, 64)
    assert result.stats.size == (128, 64)


def test_same_inputs_and_seed_give_an_identical_image(engine: HamEngine, content_image: Image.Image) -> None:
    first = engine.transfer(content_image, style_prompt="an ink engraving", params=_params(seed=5))
    second = engine.transfer(content_image, style_prompt="an ink engraving", params=_params(seed=5))
    other = engine.transfer(content_image, style_prompt="an ink engraving", params=_params(seed=6))
    assert first.image.tobytes() == second.image.tobytes()
    assert first.image.tobytes() != other.image.tobytes()


def test_concurrent_transfers_share_the_model_safely(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    expected = engine.transfer(content_image, style_prompt="a mosaic", params=SMALL).image.tobytes()
    results: list[bytes] = []

    def run() -> None:
        results.append(engine.transfer(content_image, style_prompt="a mosaic", params=SMALL).image.tobytes())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [expected, expected]
    assert _stock_processors(engine)


def test_stats_report_counts_phases_and_memory(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    rss_before = _current_rss_bytes()
    stats = engine.transfer(content_image, style=style_image, params=SMALL).stats
    assert set(stats.seconds) == {"encode", "invert", "sample", "decode", "total"}
    assert stats.seconds["total"] >= stats.seconds["sample"] > 0
    assert stats.unet_rows == sum(stats.unet_rows_by_phase.values())
    # A CPU has no per-transfer figure: peak_memory_bytes says so, and the process's lifetime
    # peak RSS carries its own name. It is about the RSS before or more (in bytes, not kilobytes;
    # the kernel updates its high-water mark lazily, so allow a little slack).
    assert stats.peak_memory_bytes is None
    assert stats.process_peak_rss_bytes >= 0.9 * rss_before > 0
    assert (stats.steps, stats.size, stats.device, stats.family) == (STEPS, (64, 64), "cpu", "sd")


def _current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# The keys a one-style job record's stats have always had (the worker stores to_dict() as JSON).
ONE_STYLE_KEYS = {
    "unet_calls", "unet_rows", "unet_rows_by_phase", "seconds", "content_cache_hit", "content_cache_tier",
    "peak_memory_bytes", "process_peak_rss_bytes", "steps", "size", "device", "dtype", "model", "family",
    "inversion", "teachers", "record_bytes", "record_budget_bytes", "record_fallback",
    "style_cache_hit", "style_cache_tier", "mode", "cfg",
}  # fmt: skip
STYLE_KEYS = {"style_cache_hit", "style_cache_tier", "mode", "cfg"}


def test_stats_json_keeps_the_record_keys_flat_for_one_style_and_a_styles_list_for_several(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    one = engine.transfer(content_image, style=style_image, params=SMALL).stats
    record = json.loads(json.dumps(one.to_dict()))
    assert set(record) == ONE_STYLE_KEYS
    assert (record["size"], record["style_cache_hit"], record["mode"]) == ([64, 64], one.style_cache_hit, "image")
    batch = engine.transfer_batch(content_image, [style_image, "ink"], params=SMALL).stats
    record = json.loads(json.dumps(batch.to_dict()))
    assert set(record) == ONE_STYLE_KEYS - STYLE_KEYS | {"styles"}
    assert [set(style) for style in record["styles"]] == [STYLE_KEYS, STYLE_KEYS]
    assert [style["mode"] for style in record["styles"]] == ["image", "text"]
    with pytest.raises(ValueError, match="read styles"):
        batch.style_cache_hit  # noqa: B018 - a K-style run has no one style
