"""HAM's attention processors on a small SD-shaped UNet: stock mechanics, GAR, LAT, install/restore."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ham_engine.attention import (
    CONTENT_TEACHER,
    CROSS_ATTENTION,
    SELF_ATTENTION,
    STUDENT,
    STYLE_TEACHER,
    AttentionEvent,
    BranchLayout,
    GarProcessor,
    LatProcessor,
    ModulationContext,
    attention_layers,
    modulated_attention,
    resolve_layers,
)
from ham_engine.feature_cache import StyleFeatures
from ham_engine.params import ParamError

THREE = BranchLayout((CONTENT_TEACHER, STYLE_TEACHER, STUDENT))
TEXT_DIM = 16


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=8,
        )
    model.eval().requires_grad_(False)
    model.set_attn_processor(AttnProcessor2_0())
    return model


def _inputs(layout: BranchLayout, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(layout.batch_size, 4, 8, 8, generator=generator)
    text = torch.randn(layout.batch_size, 7, TEXT_DIM, generator=generator)
    return latents, text


def _run(unet: UNet2DConditionModel, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return unet(latents, torch.tensor(501), encoder_hidden_states=text).sample


def _modulated(
    unet: UNet2DConditionModel,
    context: ModulationContext,
    layout: BranchLayout,
    latents: torch.Tensor,
    text: torch.Tensor,
    modulating: bool = True,
    step: int = 0,
) -> torch.Tensor:
    with modulated_attention(unet, context):
        context.begin_step(step, layout, modulating)
        return _run(unet, latents, text)


def _context(unet: UNet2DConditionModel, gar: bool = True, lat: bool = True, **kwargs) -> ModulationContext:
    return ModulationContext(
        alpha=kwargs.pop("alpha", 0.75),
        beta=kwargs.pop("beta", 0.25),
        gar_layers=resolve_layers(unet, ["up_blocks.*"], SELF_ATTENTION, "gar_layers") if gar else (),
        lat_layers=resolve_layers(unet, ["up_blocks.*"], CROSS_ATTENTION, "lat_layers") if lat else (),
        **kwargs,
    )


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=-2, keepdim=True)
    return mean, ((x - mean) ** 2).mean(dim=-2, keepdim=True).sqrt()


def _adain(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    (content_mean, content_std), (style_mean, style_std) = _stats(content), _stats(style)
    return style_std * (content - content_mean) / content_std + style_mean


def test_layout_names_the_rows_of_each_branch_per_half() -> None:
    layout = BranchLayout((CONTENT_TEACHER, STYLE_TEACHER, STUDENT), halves=2)
    assert layout.batch_size == 6
    assert layout.rows_of(STUDENT) == [2, 5]
    x = torch.arange(6.0).view(6, 1)
    assert layout.take(x, STYLE_TEACHER).flatten().tolist() == [1.0, 4.0]
    layout.put(x, STUDENT, torch.tensor([[[10.0]], [[20.0]]]).view(2, 1))
    assert x.flatten().tolist() == [0, 1, 10, 3, 4, 20]


def test_a_shared_branch_runs_once_in_the_uncond_half_and_serves_both_halves() -> None:
    layout = BranchLayout((CONTENT_TEACHER, STYLE_TEACHER, STUDENT), halves=2, shared=(CONTENT_TEACHER,))
    assert layout.rows == (
        (CONTENT_TEACHER, 0),
        (STYLE_TEACHER, 0),
        (STUDENT, 0),
        (STYLE_TEACHER, 1),
        (STUDENT, 1),
    )
    assert layout.batch_size == 5
    assert [layout.row(CONTENT_TEACHER, h) for h in (0, 1)] == [0, 0]
    assert [layout.row(STUDENT, h) for h in (0, 1)] == [2, 4]
    assert layout.rows_of(CONTENT_TEACHER) == [0] and layout.rows_of(STYLE_TEACHER) == [1, 3]
    x = torch.arange(5.0).view(5, 1)
    assert layout.take(x, CONTENT_TEACHER).flatten().tolist() == [0.0]
    assert layout.take(x, STYLE_TEACHER).flatten().tolist() == [1.0, 3.0]
    layout.put(x, STUDENT, torch.tensor([[10.0], [20.0]]))
    assert x.flatten().tolist() == [0, 1, 10, 3, 20]
    # Outside the step window the student shares too: style teacher x2, student once.
    alone = BranchLayout((STYLE_TEACHER, STUDENT), halves=2, shared=(STUDENT,))
    assert alone.rows == ((STYLE_TEACHER, 0), (STUDENT, 0), (STYLE_TEACHER, 1))


@pytest.mark.parametrize(
    ("branches", "halves", "shared"),
    [
        ((CONTENT_TEACHER, STUDENT), 1, (CONTENT_TEACHER,)),  # one half has nothing to share
        ((STYLE_TEACHER, STUDENT), 2, (CONTENT_TEACHER,)),  # not a branch of the batch
    ],
)
def test_layout_refuses_a_shared_branch_it_cannot_hold(
    branches: tuple[str, ...], halves: int, shared: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match="shared"):
        BranchLayout(branches, halves=halves, shared=shared)


def test_resolve_layers_picks_only_attn1_for_gar_and_only_attn2_for_lat(unet: UNet2DConditionModel) -> None:
    gar = resolve_layers(unet, ["up_blocks.*"], SELF_ATTENTION, "gar_layers")
    lat = resolve_layers(unet, ["up_blocks.*"], CROSS_ATTENTION, "lat_layers")
    assert gar and all(n.startswith("up_blocks.") and n.endswith(".attn1") for n in gar)
    assert lat and all(n.startswith("up_blocks.") and n.endswith(".attn2") for n in lat)
    assert len(gar) == len([n for n in attention_layers(unet, SELF_ATTENTION) if n.startswith("up_blocks.")])


@pytest.mark.parametrize(("kind", "field"), [(SELF_ATTENTION, "gar_layers"), (CROSS_ATTENTION, "lat_layers")])
def test_layer_patterns_matching_nothing_raise_param_error_naming_the_field(
    unet: UNet2DConditionModel, kind: str, field: str
) -> None:
    with pytest.raises(ParamError, match=field) as info:
        resolve_layers(unet, ["decoder.*", "up_blocks.9.*"], kind, field)
    assert info.value.field == field


def test_unmodulated_step_is_bitwise_the_stock_attention(unet: UNet2DConditionModel) -> None:
    latents, text = _inputs(THREE)
    stock = _run(unet, latents, text)
    out = _modulated(unet, _context(unet), THREE, latents, text, modulating=False)
    assert torch.equal(out, stock)


def test_gar_with_alpha_one_and_lat_off_is_bitwise_the_stock_attention(unet: UNet2DConditionModel) -> None:
    latents, text = _inputs(THREE)
    stock = _run(unet, latents, text)
    out = _modulated(unet, _context(unet, lat=False, alpha=1.0), THREE, latents, text)
    assert torch.equal(out, stock)


def test_gar_gives_the_student_alpha_own_plus_adain_of_content_and_style(unet: UNet2DConditionModel) -> None:
    events: list[AttentionEvent] = []
    context = _context(unet, lat=False, alpha=0.6, recorder=events.append)
    latents, text = _inputs(THREE)
    out = _modulated(unet, context, THREE, latents, text)
    assert [e.layer for e in events] == list(context.gar_layers)
    for event in events:
        assert event.module == "gar"
        for before, after in zip(event.before, event.after, strict=True):
            content, style, student = before
            want = 0.6 * student + 0.4 * _adain(content, style)
            torch.testing.assert_close(after[2], want, atol=1e-5, rtol=1e-5)
            # Teachers attend normally.
            assert torch.equal(after[0], content) and torch.equal(after[1], style)
    stock = _run(unet, latents, text)
    # Teacher rows depend only on their own inputs; the student's must change.
    assert torch.equal(out[:2], stock[:2])
    assert not torch.allclose(out[2], stock[2])


def test_gar_takes_statistics_separately_for_each_cfg_half(unet: UNet2DConditionModel) -> None:
    layout = BranchLayout((CONTENT_TEACHER, STYLE_TEACHER, STUDENT), halves=2)
    events: list[AttentionEvent] = []
    context = _context(unet, lat=False, alpha=0.5, recorder=events.append)
    latents, text = _inputs(layout, seed=2)
    _modulated(unet, context, layout, latents, text)
    for event in events:
        query_before, query_after = event.before[0], event.after[0]
        for half in (0, 1):
            content, style, student = query_before[3 * half : 3 * half + 3]
            want = 0.5 * student + 0.5 * _adain(content, style)
            torch.testing.assert_close(query_after[3 * half + 2], want, atol=1e-5, rtol=1e-5)


def test_a_shared_content_teacher_row_modulates_both_halves_as_its_two_identical_rows_would(
    unet: UNet2DConditionModel,
) -> None:
    full = BranchLayout((CONTENT_TEACHER, STYLE_TEACHER, STUDENT), halves=2)
    shared = BranchLayout(full.branches, halves=2, shared=(CONTENT_TEACHER,))
    latents, text = _inputs(full, seed=7)
    # The content teacher's cond row as the engine would feed it: the same as its uncond row.
    latents[3], text[3] = latents[0], text[0]
    keep = torch.tensor([0, 1, 2, 4, 5])
    events: list[AttentionEvent] = []
    reference = _modulated(unet, _context(unet, alpha=0.5, beta=0.25), full, latents, text)
    out = _modulated(
        unet, _context(unet, alpha=0.5, beta=0.25, recorder=events.append), shared, latents[keep], text[keep]
    )
    torch.testing.assert_close(out, reference[keep], atol=1e-5, rtol=1e-5)
    assert {e.module for e in events} == {"gar", "lat"}
    for event in events:
        (q, k, v), (q_after, k_after, v_after) = event.before, event.after
        for half in (0, 1):
            content, style, student = (shared.row(b, half) for b in shared.branches)
            if event.module == "gar":
                want = 0.5 * q[student] + 0.5 * _adain(q[content], q[style])
                torch.testing.assert_close(q_after[student], want, atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(q_after[student], 0.25 * q[student] + 0.75 * q[content])
                assert torch.equal(k_after[student], k[style]) and torch.equal(v_after[student], v[style])


def test_lat_gives_the_student_the_style_teachers_keys_values_and_a_blended_query(
    unet: UNet2DConditionModel,
) -> None:
    events: list[AttentionEvent] = []
    context = _context(unet, gar=False, beta=0.25, recorder=events.append)
    latents, text = _inputs(THREE, seed=3)
    _modulated(unet, context, THREE, latents, text)
    assert [e.layer for e in events] == list(context.lat_layers)
    for event in events:
        assert event.module == "lat"
        (q, k, v), (q_after, k_after, v_after) = event.before, event.after
        assert torch.equal(k_after[2], k[1]) and torch.equal(v_after[2], v[1])
        torch.testing.assert_close(q_after[2], 0.25 * q[2] + 0.75 * q[0])
        assert torch.equal(q_after[:2], q[:2]) and torch.equal(k_after[:2], k[:2]) and torch.equal(v_after[:2], v[:2])


def test_cached_style_features_stand_in_for_the_style_teacher_rows(unet: UNet2DConditionModel) -> None:
    latents, text = _inputs(THREE, seed=4)
    record = StyleFeatures()
    live = _modulated(unet, _context(unet, style_records=(record,)), THREE, latents, text, step=3)
    assert set(record.gar) == {(3, name) for name in _context(unet).gar_layers}
    assert set(record.lat) == set(_context(unet).lat_layers)

    two = BranchLayout((CONTENT_TEACHER, STUDENT))
    keep = torch.tensor([0, 2])
    cached = _modulated(unet, _context(unet, cached_styles=(record,)), two, latents[keep], text[keep], step=3)
    torch.testing.assert_close(cached, live[keep], atol=1e-5, rtol=1e-5)


def test_modulated_step_without_any_style_source_is_refused(unet: UNet2DConditionModel) -> None:
    with pytest.raises(ValueError, match="style"):
        _context(unet).begin_step(0, BranchLayout((CONTENT_TEACHER, STUDENT)), modulating=True)


def test_modulated_step_with_a_shared_student_row_is_refused(unet: UNet2DConditionModel) -> None:
    layout = BranchLayout((CONTENT_TEACHER, STYLE_TEACHER, STUDENT), halves=2, shared=(CONTENT_TEACHER, STUDENT))
    with pytest.raises(ValueError, match="student"):
        _context(unet).begin_step(0, layout, modulating=True)
    _context(unet).begin_step(0, layout, modulating=False)  # unmodulated, its halves are identical


def test_original_processors_are_restored_even_when_the_block_raises(unet: UNet2DConditionModel) -> None:
    before = dict(unet.attn_processors)
    context = _context(unet)
    with pytest.raises(RuntimeError, match="boom"), modulated_attention(unet, context):
        processors = unet.attn_processors
        assert isinstance(processors[f"{context.gar_layers[0]}.processor"], GarProcessor)
        assert isinstance(processors[f"{context.lat_layers[0]}.processor"], LatProcessor)
        raise RuntimeError("boom")
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)


def test_contexts_do_not_share_state(unet: UNet2DConditionModel) -> None:
    first, second = _context(unet, alpha=0.1), _context(unet, alpha=0.9)
    latents, text = _inputs(THREE, seed=5)
    a = _modulated(unet, first, THREE, latents, text)
    b = _modulated(unet, second, THREE, latents, text)
    again = _modulated(unet, _context(unet, alpha=0.1), THREE, latents, text)
    assert torch.equal(a, again)
    assert not torch.equal(a, b)


def _attention_paths() -> list[tuple[Attention, dict[str, torch.Tensor]]]:
    """Attention modules that take the processor's other paths, with inputs for a 3-branch batch.

    The UNet's transformer blocks use none of these, so they are pinned here: a 4-D input with
    spatial and group norms, a residual and an output rescale; and a cross-attention with a
    normalised context, q/k norms and an attention mask.
    """
    generator = torch.Generator().manual_seed(6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        spatial = Attention(
            query_dim=32,
            heads=4,
            dim_head=8,
            bias=True,
            norm_num_groups=8,
            spatial_norm_dim=6,
            residual_connection=True,
            rescale_output_factor=2.0,
        )
        cross = Attention(
            query_dim=32,
            cross_attention_dim=16,
            heads=4,
            dim_head=8,
            cross_attention_norm="layer_norm",
            qk_norm="layer_norm",
        )
    mask = torch.zeros(THREE.batch_size, 1, 7)
    mask[:, :, 5:] = -10_000.0  # the last two context tokens are masked out
    return [
        (
            spatial,
            {
                "hidden_states": torch.randn(THREE.batch_size, 32, 4, 4, generator=generator),
                "temb": torch.randn(THREE.batch_size, 6, 2, 2, generator=generator),
            },
        ),
        (
            cross,
            {
                "hidden_states": torch.randn(THREE.batch_size, 16, 32, generator=generator),
                "encoder_hidden_states": torch.randn(THREE.batch_size, 7, 16, generator=generator),
                "attention_mask": mask,
            },
        ),
    ]


@pytest.mark.parametrize("processor_type", [GarProcessor, LatProcessor])
def test_processors_keep_the_stock_mechanics_on_every_attention_path(processor_type: type) -> None:
    for module, inputs in _attention_paths():
        module.eval().requires_grad_(False)
        with torch.inference_mode():
            module.set_processor(AttnProcessor2_0())
            stock = module(**inputs)
            context = ModulationContext(alpha=0.5, beta=0.5)
            module.set_processor(processor_type("layer", context))
            context.begin_step(0, THREE, modulating=False)
            assert torch.equal(module(**inputs), stock)
            context.begin_step(0, THREE, modulating=True)
            modulated = module(**inputs)
        # Teachers attend normally through every path; only the student's row changes.
        assert torch.equal(modulated[:2], stock[:2])
        assert not torch.allclose(modulated[2], stock[2])
