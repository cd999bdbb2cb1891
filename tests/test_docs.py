"""The documentation a new user reads first stays true to the code."""

import re
from pathlib import Path

import pytest

from ham_cli.main import build_parser
from ham_core.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_documented_with_its_default() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `HAM_{name.upper()}` |")), None)
        assert row is not None, f"HAM_{name.upper()} is missing from docs/configuration.md"
        if field.default not in (None, ""):
            assert f"`{field.default}`" in row, f"HAM_{name.upper()}: documented default differs from {field.default!r}"


def test_readme_starts_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make up", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert "\nup:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_commands_exist_in_the_cli() -> None:
    readme = (ROOT / "README.md").read_text()
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for command in ("up", "api", "worker", "transfer", "submit"):
        assert f"`ham {command}" in readme
        assert command in subcommands


def test_the_api_docs_carry_the_parameter_table_of_the_code() -> None:
    from ham_engine.params import params_table
    from service.api.submission import REQUEST_SPECS

    assert params_table(REQUEST_SPECS) in (ROOT / "docs" / "api.md").read_text()


def test_every_request_parameter_is_a_flag_of_ham_submit_and_an_engine_one_of_ham_transfer() -> None:
    from ham_engine.params import PARAM_SPECS
    from service.api.submission import REQUEST_SPECS

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command, specs in (("submit", REQUEST_SPECS), ("transfer", PARAM_SPECS)):
        flags = {option for action in commands[command]._actions for option in action.option_strings}
        for spec in specs:
            flag = spec.name.replace("_", "-")
            assert (f"--no-{flag}" if spec.kind is bool else f"--{flag}") in flags, (command, spec.name)


# The commands that take the engine's parameters, with the arguments each one requires.
_COMMANDS = {
    "transfer": ["transfer", "content.png", "--style-prompt", "ink", "-o", "out.png"],
    "submit": ["submit", "content.png", "--style-prompt", "ink", "-o", "out.png"],
    "eval": ["eval", "--content", "contents", "--style", "styles"],
}


def _flag(spec) -> str:
    """How the docs and the user write a parameter: ``--step-start``, ``--no-gar`` (booleans default on)."""
    dashed = spec.name.replace("_", "-")
    return f"--no-{dashed}" if spec.kind is bool else f"--{dashed}"


def test_the_evaluation_docs_list_exactly_the_engine_parameters_as_flags() -> None:
    # From the text a user reads, not from the list the flags are built from.
    from ham_engine.params import PARAM_SPECS

    doc = (ROOT / "docs" / "evaluation.md").read_text()
    paragraph = doc.split("**The engine's parameters**", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"`(--[a-z-]+)`", paragraph.split(";", 1)[0]))
    assert documented == {_flag(spec) for spec in PARAM_SPECS}


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_every_engine_parameter_is_a_flag_that_parses_to_its_typed_value(command: str) -> None:
    from ham_engine.params import PARAM_SPECS

    parser = build_parser()
    for spec in PARAM_SPECS:
        if spec.kind is bool:
            assert getattr(parser.parse_args([*_COMMANDS[command], _flag(spec)]), spec.name) is False, spec.name
            continue
        value = spec.choices[-1] if spec.choices else spec.kind(spec.maximum if spec.maximum is not None else 1)
        parsed = getattr(parser.parse_args([*_COMMANDS[command], _flag(spec), str(value)]), spec.name)
        assert (parsed, type(parsed)) == (value, spec.kind), (command, spec.name)


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_a_choice_parameter_refuses_a_value_outside_its_choices(command: str) -> None:
    from ham_engine.params import PARAM_SPECS

    parser = build_parser()
    for spec in PARAM_SPECS:
        if spec.choices:
            with pytest.raises(SystemExit):
                parser.parse_args([*_COMMANDS[command], _flag(spec), "not-a-choice"])
