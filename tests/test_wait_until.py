"""The tests' one waiting helper: returns the condition's value, fails naming what it waited for."""

from __future__ import annotations

import pytest

from tests.fixtures.waiting import wait_until


def test_it_returns_the_first_truthy_value_and_treats_ignored_errors_as_not_yet() -> None:
    calls = iter([ConnectionError("starting"), None, 0, {"status": "done"}])

    def condition() -> object:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert wait_until(condition, 5, "the job", interval=0, ignore=(ConnectionError,)) == {"status": "done"}


def test_a_timeout_names_what_it_waited_for_the_last_error_and_the_detail() -> None:
    def refused() -> bool:
        raise ConnectionError("refused")

    expected = r"(?s)waiting for the server \(last: ConnectionError\('refused'\)\):\nlog"
    with pytest.raises(AssertionError, match=expected):
        wait_until(refused, 0, "the server", ignore=(ConnectionError,), detail=lambda: "log")


def test_check_fails_early_and_other_errors_are_not_swallowed() -> None:
    def dead() -> None:
        raise AssertionError("the process exited")

    with pytest.raises(AssertionError, match="the process exited"):
        wait_until(lambda: False, 60, "never", check=dead)
    with pytest.raises(KeyError):
        wait_until(lambda: {}["x"], 60, "never", ignore=(ConnectionError,))
