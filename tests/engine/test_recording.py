"""Teachers recorded during a "source" inversion stand in for the live teachers, up to float rounding."""

from __future__ import annotations

import gc

import pytest
import torch
from PIL import Image

from ham_engine import images
from ham_engine.attention import AttentionEvent
from ham_engine.engine import HamEngine, Style, TransferCancelled
from ham_engine.inversion import DdimSchedule, ddim_invert
from ham_engine.modulation import channel_stats
from ham_engine.params import TransferParams
from ham_engine.recording import TeacherRecording, check_record_bytes, recording_attention
from ham_engine.request import build_request

STEPS = 4
N = STEPS

# Live and recorded teachers run the same UNet calls at different batch sizes (the inversion
# batch against the sampling batch, a re-projection at batch 1): rows differ by float
# rounding, ~1e-6 per call on this CPU, which the tiny UNet carries to a few 1e-6 on latents
# of magnitude ~6-11 (measured: at most 1.1e-5). Bounded here at 1e-4, far below any change
# of method (GAR or LAT on/off moves latents by ~1).
ROUNDING = {"atol": 1e-4, "rtol": 1e-5}


def _params(**changes) -> TransferParams:
    return TransferParams(**{"steps": STEPS, "size": 64, "inversion": "source", **changes})


# (style image?, style prompt, extra params) -> rows per transfer: live cold, recorded cold and warm.
MODES = {
    # Inversion 2N (content + style), sampling: step 0 live at 3 rows, then the student alone.
    "image": (True, None, {}, 5 * N, 3 * N + 2, 2 * N + 1),
    # A prompted style teacher's calls differ from the empty-prompt inversion: it stays live.
    "image+prompt": (True, "an oil painting", {}, 5 * N, 2 * N + 3 + 2 * (N - 1), 2 * N + 1),
    # Text style under CFG: step 0 has 5 rows, then [uncond | cond] x (style teacher, student).
    "text": (False, "an ink engraving", {}, 6 * N, N + 5 + 4 * (N - 1), N + 5 + 4 * (N - 1)),
    "text, no CFG": (False, "an ink engraving", {"guidance": 1.0}, 4 * N, N + 3 + 2 * (N - 1), N + 3 + 2 * (N - 1)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_recorded_teachers_give_the_live_latents_and_image_in_fewer_rows(
    tiny_engine: HamEngine, content_image: Image.Image, style_image: Image.Image, mode: str
) -> None:
    has_style, prompt, extra, live_rows, cold_rows, warm_rows = MODES[mode]
    style = style_image if has_style else None
    results = {}
    for teachers in ("live", "recorded"):
        # Its own style cache: cold, then warm; no content cache, so that warm inverts (and records) its content.
        engine = HamEngine(tiny_engine.model, content_cache_bytes=0)
        params = _params(teachers=teachers, **extra)
        cold = engine.transfer_latents(content_image, style=style, style_prompt=prompt, params=params)
        warm = engine.transfer_latents(content_image, style=style, style_prompt=prompt, params=params)
        results[teachers] = (cold, warm)
    for which, recorded, live in zip(("cold", "warm"), results["recorded"], results["live"], strict=True):
        torch.testing.assert_close(recorded.student, live.student, **ROUNDING, msg=f"{which} latents")
        pixels = [tiny_engine.model.decode_latents(r.student) for r in (recorded, live)]
        torch.testing.assert_close(*pixels, **ROUNDING, msg=f"{which} image")
        assert recorded.stats.teachers["content_teacher"] == "recorded"
        assert live.stats.teachers["content_teacher"] == "live"
        assert recorded.stats.record_bytes > 0 and live.stats.record_bytes == 0
    # The live source-convention run costs what a target-convention run does.
    assert results["live"][0].stats.unet_rows == live_rows
    cold, warm = results["recorded"]
    assert (cold.stats.unet_rows, warm.stats.unet_rows) == (cold_rows, warm_rows)
    assert cold.stats.unet_calls == warm.stats.unet_calls == 2 * N
    if has_style:
        expected_style = "recorded" if prompt is None else "live"
        assert (cold.stats.teachers["style_teacher"], warm.stats.teachers["style_teacher"]) == (
            expected_style,
            "cached",
        )
        assert (cold.stats.style_cache_hit, warm.stats.style_cache_hit) == (False, True)


def test_a_content_from_the_content_cache_has_no_inversion_so_its_teacher_runs_live(
    tiny_engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    live = HamEngine(tiny_engine.model).transfer_latents(
        content_image, style=style_image, params=_params(teachers="live")
    )
    engine = HamEngine(tiny_engine.model)
    params = _params(teachers="recorded")
    cold = engine.transfer_latents(content_image, style=style_image, params=params)
    warm = engine.transfer_latents(content_image, style=style_image, params=params)
    assert (cold.stats.content_cache_hit, warm.stats.content_cache_hit) == (False, True)
    assert cold.stats.teachers == {"content_teacher": "recorded", "style_teacher": "recorded"}
    assert warm.stats.teachers == {"content_teacher": "live", "style_teacher": "cached"}
    # No inversion at all: per step the content teacher and the student.
    assert warm.stats.unet_rows_by_phase == {"invert": 0, "sample": 2 * N}
    for result in (cold, warm):
        torch.testing.assert_close(result.student, live.student, **ROUNDING)


def test_a_recorded_cold_run_fills_the_style_cache_with_what_a_live_one_would(
    tiny_engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    entries = {}
    for teachers in ("live", "recorded"):
        engine = HamEngine(tiny_engine.model)
        engine.transfer_latents(content_image, style=style_image, params=_params(teachers=teachers))
        ((_, (features, _)),) = engine.style_cache._entries.items()
        entries[teachers] = features
    live, recorded = entries["live"], entries["recorded"]
    assert set(recorded.gar) == set(live.gar) and set(recorded.lat) == set(live.lat)
    for key, (mean, std) in live.gar.items():
        torch.testing.assert_close(recorded.gar[key][0], mean, **ROUNDING)
        torch.testing.assert_close(recorded.gar[key][1], std, **ROUNDING)
    for layer, (k, v) in live.lat.items():
        torch.testing.assert_close(recorded.lat[layer][0], k, **ROUNDING)
        torch.testing.assert_close(recorded.lat[layer][1], v, **ROUNDING)


def _record(
    engine: HamEngine, content: Image.Image, style: Image.Image, params: TransferParams, content_row: int | None = 0
) -> TeacherRecording:
    """A source inversion of [content, style] as the engine runs it, recorded in full."""
    request = build_request(engine.model, content, [Style(style)], params)
    width, height = request.size
    pixels = torch.cat(
        [images.image_to_tensor(content, width, height), images.image_to_tensor(style, width, height, fit="cover")]
    )
    model = engine.model
    clean = model.encode_image(pixels)
    text = model.encode_prompt([""], size=request.size).expand(2, -1, -1)
    schedule = DdimSchedule.from_scheduler(model.scheduler, params.steps, model.device)
    recording = TeacherRecording(
        request.recordable_steps,
        request.gar_layers,
        request.lat_layers,
        budget=2**40,
        content_row=content_row,
        style_rows=(1,),
    )

    def unet(latents: torch.Tensor, index: int, timestep: torch.Tensor) -> torch.Tensor:
        recording.begin_call(index, schedule.steps)
        output = model.unet(latents.to(model.dtype), timestep, **text.unet_kwargs()).sample.float()
        recording.end_call()
        return output

    with torch.inference_mode(), recording_attention(model.unet, recording):
        ddim_invert(unet, clean, schedule, convention="source")
    return recording


def test_recorded_tensors_equal_what_the_live_teachers_compute_at_each_step(
    tiny_engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    params = _params(teachers="live")
    recording = _record(tiny_engine, content_image, style_image, _params(teachers="recorded"))
    events: list[AttentionEvent] = []
    live = HamEngine(tiny_engine.model)
    live.transfer_latents(content_image, style=style_image, params=params, recorder=events.append)
    modules = dict(tiny_engine.model.unet.named_modules())
    assert recording.content.steps == set(range(1, STEPS))
    checked = 0
    for event in events:
        if event.step == 0:
            continue  # z_T: no inversion call makes it, the first step runs live
        layout = event.layout
        content, style = (layout.row(b, 0) for b in ("content_teacher", "style_teacher"))
        q, k, v = event.before
        if event.module == "gar":
            recorded = recording.content.gar_inputs[(event.step, event.layer)]
            attn = modules[event.layer]
            with torch.inference_mode():
                projected = (attn.to_q(recorded), attn.to_k(recorded), attn.to_v(recorded))
            for live, again in zip((q, k, v), projected, strict=True):
                torch.testing.assert_close(again, live[content : content + 1], **ROUNDING)
            mean, std = recording.styles[1].gar[(event.step, event.layer)]
            stats = [channel_stats(x[style : style + 1], dim=1) for x in (q, k, v)]
            torch.testing.assert_close(mean, torch.cat([m for m, _ in stats], -1), **ROUNDING)
            torch.testing.assert_close(std, torch.cat([s for _, s in stats], -1), **ROUNDING)
        else:
            recorded = recording.content.lat_queries[(event.step, event.layer)]
            torch.testing.assert_close(recorded, q[content : content + 1], **ROUNDING)
            style_k, style_v = recording.styles[1].lat[event.layer]
            torch.testing.assert_close(style_k, k[style : style + 1], **ROUNDING)
            torch.testing.assert_close(style_v, v[style : style + 1], **ROUNDING)
        checked += 1
    assert checked == (STEPS - 1) * len(recording.gar_layers + recording.lat_layers)


def test_record_bytes_count_every_tensor_the_recording_holds(
    tiny_engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    params = _params(teachers="recorded")
    recording = _record(tiny_engine, content_image, style_image, params)
    held = recording.content.tensors() + recording.styles[1].tensors()
    assert recording.nbytes == recording.recorded_bytes == sum(t.numel() * t.element_size() for t in held)
    # Independently, from the shapes a live run's layers see: per recorded step and GAR layer
    # the content's [L, C] input (C = the projections' width here) and 2 x 3C float32
    # statistics; per LAT layer and step the content's [L, C] query, and the style's K/V once.
    events: list[AttentionEvent] = []
    HamEngine(tiny_engine.model).transfer_latents(
        content_image, style=style_image, params=_params(teachers="live"), recorder=events.append
    )
    expected = 0
    for event in events:
        q, k, _ = event.before
        if event.step == 0:
            if event.module == "lat":
                expected += 2 * k[:1].numel() * k.element_size()
            continue
        expected += q[:1].numel() * q.element_size()
        if event.module == "gar":
            expected += 2 * 3 * q.shape[-1] * 4
    stats = HamEngine(tiny_engine.model).transfer(content_image, style=style_image, params=params).stats
    assert stats.record_bytes == recording.nbytes == expected


def test_a_recording_without_a_content_row_records_the_style_alone(
    tiny_engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    recording = _record(tiny_engine, content_image, style_image, _params(), content_row=None)
    assert recording.content.tensors() == [] and not recording.content.holds(1)
    style = recording.styles[1]
    assert set(style.gar) == {(k, layer) for k in range(1, STEPS) for layer in recording.gar_layers}
    assert set(style.lat) == set(recording.lat_layers)
    assert recording.recorded_bytes == recording.nbytes > 0


def test_a_recording_over_the_budget_falls_back_to_live_teachers_with_the_same_image(
    tiny_engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    params = _params(teachers="recorded")
    needed = HamEngine(tiny_engine.model).transfer_latents(content_image, style=style_image, params=params)
    size = needed.stats.record_bytes
    exact = HamEngine(tiny_engine.model, record_bytes=size).transfer_latents(
        content_image, style=style_image, params=params
    )
    assert exact.stats.teachers["content_teacher"] == "recorded" and exact.stats.record_fallback is None

    live = HamEngine(tiny_engine.model).transfer_latents(
        content_image, style=style_image, params=_params(teachers="live")
    )
    for budget in (size - 1, 0):
        engine = HamEngine(tiny_engine.model, record_bytes=budget)
        result = engine.transfer_latents(content_image, style=style_image, params=params)
        stats = result.stats
        assert stats.teachers == {"content_teacher": "live", "style_teacher": "live"}
        assert stats.record_bytes == 0 and stats.record_budget_bytes == budget
        assert f"over the budget of {budget}" in stats.record_fallback
        assert stats.unet_rows == live.stats.unet_rows == 5 * N
        # The fallback is the live path: the same calls at the same batch sizes, bit for bit.
        assert torch.equal(result.student, live.student)
        # ... and it still fills the style cache for a repeat.
        assert engine.transfer_latents(content_image, style=style_image, params=params).stats.style_cache_hit


def test_target_convention_and_live_teachers_record_nothing(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    for params in (TransferParams(steps=STEPS, size=64), _params(teachers="live")):
        stats = engine.transfer_latents(content_image, style=style_image, params=params).stats
        assert stats.record_bytes == 0 and stats.record_fallback is None
        assert stats.teachers["content_teacher"] == "live"
        assert stats.unet_rows_by_phase["invert"] == 2 * N and stats.inversion == params.inversion


def test_style_cache_entries_of_the_two_conventions_are_kept_apart(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    engine.transfer_latents(content_image, style=style_image, params=TransferParams(steps=STEPS, size=64))
    source = engine.transfer_latents(content_image, style=style_image, params=_params())
    assert source.stats.style_cache_hit is False  # another trajectory, other features
    assert source.stats.content_cache_hit is False  # likewise the content's inversion
    assert len(engine.style_cache) == 2


def test_recorded_teachers_follow_the_step_window_and_lat_alone(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    # Steps 2-3 only, both recorded: no teacher runs in the sampling batch at all.
    late = engine.transfer_latents(content_image, style=style_image, params=_params(step_start=0.5))
    assert late.stats.unet_rows_by_phase == {"invert": 2 * N, "sample": N}
    # LAT alone: the style's K/V come from the text, recorded once; step 0 runs the content live.
    engine.style_cache.clear()
    engine.content_cache.clear()  # the content is inverted (and its teacher recorded) again
    lat_only = engine.transfer_latents(content_image, style=style_image, params=_params(gar=False))
    assert lat_only.stats.unet_rows_by_phase == {"invert": 2 * N, "sample": 2 + (N - 1)}


def _live_recordings() -> list[TeacherRecording]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is TeacherRecording]  # no __class__ lookups


@pytest.mark.parametrize("stop_after", [2, N + 2])  # during the inversion, during the sampling
def test_cancelling_frees_what_was_recorded(
    engine: HamEngine, content_image: Image.Image, style_image: Image.Image, stop_after: int
) -> None:
    done: list[int] = []
    with pytest.raises(TransferCancelled) as info:
        engine.transfer(
            content_image,
            style=style_image,
            params=_params(teachers="recorded"),
            progress=lambda s, t: done.append(s),
            cancelled=lambda: len(done) >= stop_after,
        )
    # The traceback keeps the transfer's frames, and so the recording, alive: it holds nothing.
    kept = _live_recordings()
    assert kept, "the traceback should still reference the recording"
    assert all(r.nbytes == 0 and not r.content.gar_inputs and not r.styles[1].gar for r in kept)
    del info, kept
    assert _live_recordings() == []
    assert len(engine.style_cache) == 0
    assert engine.transfer(content_image, style=style_image, params=_params()).stats.record_bytes > 0


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", True])
def test_bad_record_budget_is_a_value_error_naming_it(tiny_engine: HamEngine, bad: object) -> None:
    with pytest.raises(ValueError, match="record_bytes"):
        HamEngine(tiny_engine.model, record_bytes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="record_bytes"):
        check_record_bytes(bad)


def test_default_budget_is_a_share_of_the_device_memory(tiny_engine: HamEngine) -> None:
    budget = HamEngine(tiny_engine.model).record_bytes
    assert 2**20 < budget < 2**50
    assert HamEngine(tiny_engine.model, record_bytes=123).record_bytes == 123


def test_recorded_teachers_work_for_the_sdxl_family(
    tiny_xl_engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    results = {}
    for teachers in ("live", "recorded"):
        engine = HamEngine(tiny_xl_engine.model, content_cache_bytes=0)  # warm: style cached, content inverted
        params = _params(teachers=teachers)
        results[teachers] = [engine.transfer_latents(content_image, style=style_image, params=params) for _ in "cw"]
    for recorded, live in zip(results["recorded"], results["live"], strict=True):
        torch.testing.assert_close(recorded.student, live.student, **ROUNDING)
    cold, warm = results["recorded"]
    assert (cold.stats.unet_rows, warm.stats.unet_rows) == (3 * N + 2, 2 * N + 1)
    assert cold.stats.teachers == {"content_teacher": "recorded", "style_teacher": "recorded"}
