"""TransferParams checks that need no model (the class is also the HTTP API's validator)."""

from __future__ import annotations

import pytest

from ham_engine.params import ParamError, TransferParams


@pytest.mark.parametrize(
    ("steps", "step_start", "step_end"),
    [(1, 0.5, 1.0), (4, 0.1, 0.2), (10, 0.95, 1.0)],
)
def test_step_window_holding_no_step_is_a_param_error_naming_step_start(
    steps: int, step_start: float, step_end: float
) -> None:
    with pytest.raises(ParamError, match="holds none of the") as info:
        TransferParams(steps=steps, step_start=step_start, step_end=step_end)
    assert info.value.field == "step_start"


def test_step_window_is_not_checked_when_gar_and_lat_are_off() -> None:
    params = TransferParams(steps=1, step_start=0.5, gar=False, lat=False)
    assert not params.modulates_step(0)


def test_step_window_holding_one_step_is_accepted() -> None:
    params = TransferParams(steps=4, step_start=0.7, step_end=0.8)
    assert [k for k in range(4) if params.modulates_step(k)] == [3]


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers() -> None:
    np = pytest.importorskip("numpy")
    params = TransferParams(steps=np.int64(30), alpha=np.float32(0.5), guidance=np.float64(5.0))
    assert (params.steps, params.alpha, params.guidance) == (30, 0.5, 5.0)
    assert (type(params.steps), type(params.alpha), type(params.guidance)) == (int, float, float)
    with pytest.raises(ParamError, match="alpha"):
        TransferParams(alpha=np.float32("nan"))
    with pytest.raises(ParamError, match="steps"):
        TransferParams(steps=np.float64(30.0))  # a float is not a step count, whatever its type


def test_param_specs_match_validation() -> None:
    """The bounds the API schema, the CLI and the docs show are the ones TransferParams enforces."""
    from ham_engine.params import PARAM_SPECS, ParamError, TransferParams

    assert {spec.name for spec in PARAM_SPECS} == {
        f for f in TransferParams.__dataclass_fields__ if f not in ("gar_layers", "lat_layers")
    }
    # Bounds that the step window's own rule (step_start < step_end) makes unreachable alone.
    cross = {("step_start", "maximum"), ("step_end", "minimum")}
    for spec in PARAM_SPECS:
        assert getattr(TransferParams(), spec.name) == spec.default
        if spec.kind is bool:
            continue
        if spec.choices is not None:
            for choice in spec.choices:  # each allowed (with the source convention recording needs)
                TransferParams(**{"inversion": "source", spec.name: choice})
            with pytest.raises(ParamError) as refused:
                TransferParams(**{spec.name: "none of the choices"})
            assert refused.value.field == spec.name
            continue
        step = 1 if spec.kind is int else 1e-6
        for bound, outside in (("minimum", -step), ("maximum", step)):
            value = getattr(spec, bound)
            if (spec.name, bound) not in cross:
                TransferParams(**{spec.name: spec.kind(value)})  # the bound itself is allowed
            with pytest.raises(ParamError) as refused:
                TransferParams(**{spec.name: spec.kind(value + outside)})
            assert refused.value.field in (spec.name, "step_start"), spec.name


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"inversion": "forward"}, "inversion"),
        ({"inversion": 1}, "inversion"),
        ({"teachers": "cached"}, "teachers"),
        ({"teachers": "recorded"}, "teachers"),  # recording needs the source convention
    ],
)
def test_inversion_and_teachers_outside_their_choices_are_param_errors_naming_the_field(
    changes: dict, field: str
) -> None:
    with pytest.raises(ParamError, match=field) as info:
        TransferParams(**changes)
    assert info.value.field == field


def test_recorded_teachers_with_the_source_inversion_round_trip_through_a_dict() -> None:
    params = TransferParams(inversion="source", teachers="recorded")
    assert TransferParams.from_dict(params.to_dict()) == params
    assert (TransferParams().inversion, TransferParams().teachers) == ("target", "auto")


def test_each_parameter_is_checked_against_its_own_spec_and_the_message_quotes_it() -> None:
    """The bounds live in one place, the spec: its check refuses what lies outside and says what is allowed."""
    from ham_engine.params import PARAM_SPECS

    for spec in PARAM_SPECS:
        spec.check(spec.default)
        if spec.kind is bool:
            with pytest.raises(ParamError, match=f"{spec.name}: must be true or false"):
                spec.check("yes")
        elif spec.choices is not None:
            with pytest.raises(ParamError, match=spec.name) as refused:
                spec.check("none of the choices")
            assert all(repr(choice) in str(refused.value) for choice in spec.choices)
        else:
            with pytest.raises(ParamError) as refused:
                spec.check(spec.kind(spec.maximum) + spec.kind(1))
            assert refused.value.field == spec.name
            assert f"[{spec.minimum}, {spec.maximum}]" in str(refused.value)
    size = next(spec for spec in PARAM_SPECS if spec.name == "size")
    with pytest.raises(ParamError, match=f"multiple of {size.multiple_of}"):
        size.check(size.minimum + 1)
