"""Model families: SDXL through the same engine core, UNets HAM cannot run refused at load time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from diffusers.models.attention_processor import Attention
from PIL import Image

from ham_engine import TransferParams, tiny
from ham_engine.attention import CROSS_ATTENTION, SELF_ATTENTION, AttentionEvent, attention_layers
from ham_engine.engine import HamEngine, TransferCancelled
from ham_engine.families import PromptEmbeddings, UnsupportedModel
from ham_engine.loading import load_model
from tests.engine.conftest import TEST_DEVICE, tolerance

STEPS = 3
SMALL = TransferParams(steps=STEPS, size=64)
OFF = TransferParams(steps=STEPS, size=64, sini=False, gar=False, lat=False)


@pytest.fixture
def xl(tiny_xl_engine: HamEngine) -> HamEngine:
    return HamEngine(tiny_xl_engine.model)


# -- SDXL --------------------------------------------------------------------------------


def test_tiny_xl_is_an_sdxl_pipeline_with_two_text_encoders(tiny_xl_engine: HamEngine) -> None:
    model = tiny_xl_engine.model
    assert model.family.name == "sdxl" and model.family.default_size == 1024
    first, second = model.family.text_encoders
    assert (type(first).__name__, type(second).__name__) == ("CLIPTextModel", "CLIPTextModelWithProjection")
    assert model.unet.config.addition_embed_type == "text_time"
    assert model.unet.config.cross_attention_dim == first.config.hidden_size + second.config.hidden_size
    assert model.vae.config.scaling_factor == pytest.approx(0.13025)


def test_sdxl_prompts_give_both_encoders_states_pooled_text_and_size_ids(tiny_xl_engine: HamEngine) -> None:
    model = tiny_xl_engine.model
    text = model.encode_prompt(["", "an oil painting", "an ink engraving"], size=(128, 64))
    first, second = model.family.text_encoders
    assert text.shape == (3, 77, first.config.hidden_size + second.config.hidden_size)
    assert text.added["text_embeds"].shape == (3, second.config.projection_dim)
    # (original h, w), crop (0, 0), (target h, w) of a 128 x 64 (w x h) output.
    assert text.added["time_ids"].tolist() == [[64, 128, 0, 0, 64, 128]] * 3
    # The empty prompt is zeros (force_zeros_for_empty_prompt, as SDXL's own CFG uncond).
    assert not text.hidden_states[0].any() and not text.added["text_embeds"][0].any()
    assert not torch.equal(text.hidden_states[1], text.hidden_states[2])
    assert not torch.equal(text.added["text_embeds"][1], text.added["text_embeds"][2])


def test_sdxl_all_modulation_off_matches_diffusers_own_sdxl_ddim_regeneration(
    xl: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    result = xl.transfer_latents(content_image, style=style_image, params=OFF)
    model = xl.model
    first, second = model.family.text_encoders
    pipe = StableDiffusionXLPipeline(
        vae=model.vae,
        text_encoder=first,
        text_encoder_2=second,
        tokenizer=model.family.tokenizers[0],
        tokenizer_2=model.family.tokenizers[1],
        unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler.config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    empty = model.encode_prompt([""], size=(64, 64))
    with torch.inference_mode():
        stock = pipe(
            prompt_embeds=empty.hidden_states,
            pooled_prompt_embeds=empty.added["text_embeds"],
            latents=result.content_terminal.to(model.dtype),
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            height=64,
            width=64,
            output_type="latent",
        ).images
    # The stock pipeline runs its DDIM arithmetic in the model dtype, the engine in float32.
    close = tolerance({"atol": 1e-5, "rtol": 1e-5}, {"atol": 0.1, "rtol": 0.05})
    torch.testing.assert_close(result.student, stock.float(), **close)


def test_sdxl_transfer_runs_the_rows_an_sd_transfer_runs_cold_warm_and_text(
    xl: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    cold = xl.transfer(content_image, style=style_image, params=SMALL)
    warm = xl.transfer(content_image, style=style_image, params=SMALL)
    text = xl.transfer(content_image, style_prompt="an ink engraving", params=SMALL)
    assert (cold.stats.style_cache_hit, warm.stats.style_cache_hit) == (False, True)
    # The repeats find the content's inversion in the content cache: no inversion pass.
    assert (cold.stats.content_cache_hit, warm.stats.content_cache_hit, text.stats.content_cache_hit) == (
        False, True, True
    )
    assert cold.stats.unet_rows == 5 * STEPS and warm.stats.unet_rows == 2 * STEPS
    assert text.stats.unet_rows_by_phase == {"invert": 0, "sample": 5 * STEPS} and text.stats.cfg
    assert cold.image.size == warm.image.size == text.image.size == (64, 64)
    assert cold.stats.family == "sdxl"
    diff = (torch.tensor(list(cold.image.getdata())) - torch.tensor(list(warm.image.getdata()))).abs()
    assert int(diff.max()) <= 1  # warm == cold within 1/255


def test_sdxl_lat_transplants_the_style_teachers_keys_and_values_of_both_halves_under_cfg(
    xl: HamEngine, content_image: Image.Image
) -> None:
    events: list[AttentionEvent] = []
    params = TransferParams(steps=STEPS, size=64, gar=False, beta=0.25)
    xl.transfer_latents(content_image, style_prompt="an ink engraving", params=params, recorder=events.append)
    assert events and {e.module for e in events} == {"lat"}
    for event in events:
        layout = event.layout
        (_, k, v), (_, k_after, v_after) = event.before, event.after
        for half in (0, 1):
            student, style = layout.row("student", half), layout.row("style_teacher", half)
            assert torch.equal(k_after[student], k[style]) and torch.equal(v_after[student], v[style])
        # uncond (zeros) and prompted halves give the student different keys.
        assert not torch.equal(k_after[layout.row("student", 0)], k_after[layout.row("student", 1)])


def test_sdxl_wide_output_conditions_every_unet_call_on_its_own_size(
    xl: HamEngine, content_image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[float]] = []
    unet = xl.model.unet
    original = unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"][0].tolist())
        return original(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    wide = content_image.resize((128, 64))
    result = xl.transfer(wide, style_prompt="a mosaic", params=TransferParams(steps=1, size=128))
    assert result.image.size == (128, 64)
    assert seen and all(ids == [64, 128, 0, 0, 64, 128] for ids in seen)


def test_sdxl_transfer_reports_progress_and_stops_when_cancelled(xl: HamEngine, content_image: Image.Image) -> None:
    calls: list[tuple[int, int]] = []
    xl.transfer(content_image, style_prompt="a mosaic", params=SMALL, progress=lambda s, t: calls.append((s, t)))
    assert calls == [(s, 2 * STEPS) for s in range(1, 2 * STEPS + 1)]
    steps: list[int] = []
    with pytest.raises(TransferCancelled):
        xl.transfer(
            content_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),  # not in the content cache: it inverts
            style_prompt="a mosaic",
            params=SMALL,
            progress=lambda s, t: steps.append(s),
            cancelled=lambda: len(steps) >= STEPS + 1,
        )
    assert steps == list(range(1, STEPS + 2))


# -- attention selection and refusals --------------------------------------------------------


def test_attention_layers_are_picked_by_type_not_by_name() -> None:
    blocks = torch.nn.ModuleDict(
        {
            "looks_like_attn2": Attention(query_dim=16, heads=2, dim_head=8),  # self-attention
            "looks_like_attn1": Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8),
        }
    )
    assert attention_layers(blocks, SELF_ATTENTION) == ["looks_like_attn2"]
    assert attention_layers(blocks, CROSS_ATTENTION) == ["looks_like_attn1"]
    with pytest.raises(ValueError, match="kind"):
        attention_layers(blocks, "attn3")


def _edited_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **unet_changes: object) -> Path:
    monkeypatch.setenv("HAM_TINY_DIR", str(tmp_path / "presets"))
    folder = tmp_path / "edited"
    shutil.copytree(tiny.ensure_preset("tiny"), folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(unet_changes)
    config_path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"in_channels": 9}, "in_channels=9"),  # an inpainting UNet
        ({"class_embed_type": None, "num_class_embeds": 10}, "num_class_embeds=10"),
        ({"addition_embed_type": "image"}, "addition_embed_type='image'"),
        ({"_class_name": "UNet2DModel"}, "UNet2DModel"),
    ],
)
def test_a_unet_ham_cannot_run_is_refused_at_load_time_naming_what_it_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict, named: str
) -> None:
    folder = _edited_tiny(tmp_path, monkeypatch, **changes)
    with pytest.raises(UnsupportedModel, match="not a UNet HAM can run") as info:
        load_model(str(folder), device=TEST_DEVICE)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)


def test_prompt_embeddings_slice_expand_and_concatenate_every_row_field() -> None:
    text = PromptEmbeddings(torch.arange(6.0).view(3, 2, 1), {"time_ids": torch.arange(3.0).view(3, 1)})
    assert text[1:].added["time_ids"].tolist() == [[1.0], [2.0]]
    both = PromptEmbeddings.cat([text[:1], text[2:]])
    assert both.hidden_states.flatten().tolist() == [0.0, 1.0, 4.0, 5.0]
    assert both.added["time_ids"].flatten().tolist() == [0.0, 2.0]
    assert text[:1].expand(4, -1, -1).unet_kwargs()["added_cond_kwargs"]["time_ids"].shape == (4, 1)
    with pytest.raises(ValueError, match="rows"):
        PromptEmbeddings(torch.zeros(2, 1, 1), {"time_ids": torch.zeros(3, 1)})
